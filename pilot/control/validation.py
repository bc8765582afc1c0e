"""Validation of the global model after every aggregation, off the control loop's path.

Where: on the ServerApp's own device, in one background thread. The server holds the fresh
global model the moment it aggregates (no transfer), runs for the whole run, and needs no site:
a designated site would have to stay provisioned outside its curtailment windows (emissions
the policy exists to avoid) or validation would stall whenever that site is released. A thread
rather than a process: the snapshot is shared memory, and torch releases the GIL inside its
kernels, so the loop (which mostly waits on Redis and the Grid) keeps its pace.

What: ``nanochat.train.val_bpb`` -- the torchrun baseline's measurement, over the first
``eval_tokens`` tokens of the held-out shard, so live and baseline curves are comparable.

The control loop ``submit``s a snapshot (a copy: the strategy recycles the old global
buffers for the next average) and later ``drain``s finished results, in submission order, to
emit them as ``validation`` events from its own thread (EventLog is not thread-safe).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class Validation:
    """One evaluated global model; ``row`` is the round's metrics row, completed with bpb."""

    round: int
    t: float  # simulated time of the aggregation that produced the model
    global_step: int
    tokens: int
    row: dict[str, Any] = field(default_factory=dict)
    bpb: float | None = None
    seconds: float = 0.0  # wall seconds the evaluation took
    error: str | None = None
    evaluated: bool = False  # False: a round without a new model, only its row passes through


class Validator:
    """Evaluates submitted global-model snapshots one at a time in a daemon thread."""

    def __init__(self, train: dict, data_dir: str | Path, tokenizer_dir: str | Path, device=None):
        from nanochat.train import TrainConfig

        self.cfg = TrainConfig.from_dict(dict(train))
        self.data_dir, self.tokenizer_dir = Path(data_dir), Path(tokenizer_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._todo: queue.Queue = queue.Queue()
        self._done: queue.Queue = queue.Queue()
        self._pending = 0
        self._thread = threading.Thread(target=self._work, name="validator", daemon=True)
        self._thread.start()

    @property
    def eval_tokens(self) -> int:
        return self.cfg.eval_tokens

    def submit(self, job: Validation, state: dict[str, torch.Tensor] | None) -> None:
        """Queue ``state`` for evaluation (copied now), or with None only ``job`` itself, so
        that it comes back in order behind the evaluations queued before it."""
        snapshot = None if state is None else {k: v.detach().clone() for k, v in state.items()}
        self._pending += 1
        self._todo.put((job, snapshot))

    def drain(self) -> list[Validation]:
        """Finished evaluations, oldest first; never blocks."""
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                break
        self._pending -= len(out)
        return out

    def close(self, timeout_s: float = 300.0) -> list[Validation]:
        """Wait for every submitted evaluation (the last round's included), stop the thread
        and return what had not been drained yet."""
        out: list[Validation] = []
        deadline = time.time() + timeout_s
        while self._pending > len(out) and time.time() < deadline:
            try:
                out.append(self._done.get(timeout=max(0.0, deadline - time.time())))
            except queue.Empty:
                break
        self._pending -= len(out)
        self._todo.put(None)
        return out

    def _work(self) -> None:
        model = tokenizer = None
        while (item := self._todo.get()) is not None:
            job, snapshot = item
            if snapshot is None:
                self._done.put(job)
                continue
            t0 = time.time()
            job.evaluated = True
            try:
                if model is None:
                    model, tokenizer = self._build()
                model.load_state_dict(snapshot)
                job.bpb = self._evaluate(model, tokenizer)
            except Exception as e:  # noqa: BLE001 - reported as the event's error, run goes on
                log.warning("validation of round %d failed: %s", job.round, e)
                job.error = f"{type(e).__name__}: {e}"
            job.seconds = time.time() - t0
            self._done.put(job)

    def _build(self):
        from nanochat.tokenizer import Tokenizer
        from nanochat.train import empty_model

        # the weights come from each snapshot
        return empty_model(self.cfg, self.device), Tokenizer.load(self.tokenizer_dir)

    def _evaluate(self, model, tokenizer) -> float:
        from nanochat.train import val_bpb

        # bf16 autocast on CUDA, as nanochat.common.device_setup gives the baseline
        cuda = self.device.type == "cuda"
        autocast_ctx = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if cuda else None
        return val_bpb(model, tokenizer, self.data_dir, self.cfg, autocast_ctx=autocast_ctx)


class RoundValidation:
    """The strategy's side: after each closed round, queue the global model (or, for a round
    that aggregated nothing, only its metrics row, so rows stay in round order); when an
    evaluation is done, emit its ``validation`` event and write the round's metrics row with
    ``val_bpb`` (one row per round, logged once its bpb is known). ``eval_tokens = 0`` in
    [train] turns validation off: rows are written at once."""

    def __init__(self, train: dict, data_dir: Path, tokenizer_dir: Path, events, runlog):
        self.events, self.runlog = events, runlog
        enabled = int(train.get("eval_tokens", 0)) > 0
        self.validator = Validator(train, data_dir, tokenizer_dir) if enabled else None

    def after_round(self, job: Validation, state: dict[str, torch.Tensor] | None) -> None:
        """``state``: the new global model, or None when the round aggregated no work."""
        if self.validator is None:
            self.runlog.log(job.row)
        else:
            self.validator.submit(job, state)

    def poll(self) -> None:
        if self.validator is not None:
            self._record(self.validator.drain())

    def close(self) -> None:
        """At the end of the run: wait for the outstanding evaluations and record them."""
        if self.validator is not None:
            self._record(self.validator.close())

    def _record(self, done: list[Validation]) -> None:
        for job in done:
            if job.evaluated:
                job.row["val_bpb"] = job.bpb
                self.events.emit(
                    "validation",
                    round=job.round,
                    model_t=job.t,
                    global_step=job.global_step,
                    tokens=job.tokens,
                    bpb=job.bpb,
                    eval_tokens=self.validator.eval_tokens,
                    seconds=job.seconds,
                    device=str(self.validator.device),
                    **({"error": job.error} if job.error else {}),
                )
            self.runlog.log(job.row)
