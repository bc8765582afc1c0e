"""One site's share of a round: the torch side of the ClientApp's ``train`` handler.

``run_job(job, weights)`` builds the model from the global weights, restores this site's
inner optimizer state from node-local disk (DiLoCo keeps inner state between rounds), trains
with ``nanochat.train.run`` until the round deadline, the site's Redis stop key, or the end of
its data assignment, saves the inner state again and returns the new weights and a summary.

One process per GPU (DDP over NCCL, spawned like torchrun) when the site has several GPUs;
otherwise a single in-process worker (CPU: gloo is not needed for one process).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pilot.flower import inner_state
from pilot.flower.messages import TrainReport
from pilot.flower.trainer.channel import Job
from pilot.infra.procs import free_port
from pilot.infra.signals import ENV_URL as ENV_REDIS

if TYPE_CHECKING:  # hints only: the helpers below import these when a job runs
    from nanochat.dataloader import DataLoader
    from nanochat.gpt import GPT
    from nanochat.tokenizer import Tokenizer
    from nanochat.train import TrainConfig, TrainResult

# How often a training process asks Redis for its stop key: cheap enough per step, but a
# step can be milliseconds on a tiny model, so rate-limit instead of asking every step.
STOP_POLL_S = 0.5
# A rank that has read its whole assignment before the deadline asks the ServerApp for more
# (pilot.infra.signals lease:requests) when at least this much of the round is left, and waits this
# long for the answer (the server answers within a control-loop tick, ~0.5 s).
REFILL_MIN_LEFT_S = 2.0
REFILL_WAIT_S = 10.0


def _connect_signals(run: str):
    """pilot.infra.signals.Signals of this run when CURTAIL_REDIS_URL is set, else None (a site
    without Redis still trains; it just cannot be stopped early or publish metrics)."""
    url = os.environ.get(ENV_REDIS)
    if not url:
        return None
    from pilot.infra.signals import Signals, connect

    return Signals(connect(url), run)


class _Energy:
    """Total GPU energy over the job from NVML counters (mJ), when available."""

    def __init__(self, device: torch.device):
        self.handles: list[Any] = []
        self.start = 0
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            idx = (
                [int(i) for i in visible.split(",") if i.strip()]
                if visible
                else list(range(torch.cuda.device_count()))
            )
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in idx]
            self.nvml = pynvml
            self.start = self._total()
        except Exception:  # noqa: BLE001 - no NVML (driver, library, permissions): model it
            self.handles = []

    def _total(self) -> int:
        return sum(self.nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles)

    def joules(self) -> float | None:
        if not self.handles:
            return None
        return (self._total() - self.start) / 1000.0


def _stopper(sig, site: str, round_n: int) -> Callable[[], bool]:
    """True once the server asked this site to stop (it must leave) or ended the round early
    (e.g. it shortened the round when a second site joined)."""
    last, stopped = 0.0, False

    def should_stop() -> bool:
        nonlocal last, stopped
        now = time.monotonic()
        if sig is None or stopped or now - last < STOP_POLL_S:
            return stopped
        last = now
        try:
            stopped = sig.stop_reason(site) is not None or sig.round_ended(round_n)
        except Exception:  # noqa: BLE001 - Redis hiccup: keep training, the deadline still holds
            stopped = False
        return stopped

    return should_stop


def _refiller(sig, job: Job, rank: int, world: int) -> Callable[[], tuple[list, dict]] | None:
    """DataLoader.refill for this rank: more chunks of the round's data, leased mid-round."""
    if sig is None:
        return None

    def refill() -> tuple[list, dict]:
        if job.deadline_wall - time.time() < REFILL_MIN_LEFT_S:
            return [], {}
        got = sig.request_lease(job.site, job.round, rank, world, timeout_s=REFILL_WAIT_S)
        if not got:
            return [], {}
        return [tuple(c) for c in got["chunks"]], dict(got["start_rows"])

    return refill


@dataclass
class _Warm:
    """What a trainer keeps between rounds for one (run, train config, world)."""

    key: tuple[str, str, int]
    model: GPT
    optimizers: list[torch.optim.Optimizer]
    round: int  # the round its inner optimizer state comes from (-1: fresh)
    # an int8 update's rounding error, added to the next update (pilot.control.updates)
    feedback: dict[str, torch.Tensor] = field(default_factory=dict)


class Worker:
    """One rank's training, kept warm between rounds by a persistent trainer: while the run,
    train config and world stay the same, the model and its optimizers stay in memory and a
    new round copies the global weights in place (no rebuild, no reload of the inner state).
    The inner state also goes to node-local disk after each round, off the training path (a
    thread writes it while the next order is awaited), so a restarted trainer can take it up."""

    def __init__(self, device: torch.device, autocast_ctx, rank: int = 0, world: int = 1):
        self.device, self.autocast_ctx, self.rank, self.world = device, autocast_ctx, rank, world
        self.warm: _Warm | None = None
        self._saving: threading.Thread | None = None
        self._tokenizers: dict[str, Tokenizer] = {}

    def _tokenizer(self, path: str) -> Tokenizer:
        """The tokenizer in ``path``, loaded once per trainer (it does not change in a run)."""
        from nanochat.tokenizer import Tokenizer

        if path not in self._tokenizers:
            self._tokenizers[path] = Tokenizer.load(path)
        return self._tokenizers[path]

    def wait_saved(self) -> None:
        """Block until the last round's inner state is on disk."""
        if self._saving is not None:
            self._saving.join()
            self._saving = None

    def train(
        self, job: Job, weights: dict[str, torch.Tensor], received_at: float | None = None
    ) -> tuple[dict[str, torch.Tensor] | None, TrainReport]:
        """Train the round; returns (new weights on rank 0 else None, this rank's report).
        ``received_at``: when the order was in (default: now)."""
        from nanochat.train import TrainConfig

        t0 = time.time()
        self.wait_saved()
        save_wait_s = time.time() - t0
        cfg = TrainConfig.from_dict(job.train_config)
        torch.manual_seed(cfg.seed + job.global_step + self.rank)
        try:
            restored = self._prepare(job, cfg, weights)
            res, joules = self._run(job, cfg)
        except BaseException:
            self.warm = None  # half-trained state is never reused
            raise
        assert self.warm is not None
        self.warm.round = job.round
        optimizers, rank, world = self.warm.optimizers, self.rank, self.world
        self._saving = threading.Thread(
            target=inner_state.save, args=(optimizers, job, rank, world), name="save-inner"
        )
        self._saving.start()
        report = _report(job, res, joules, self.device, world, restored)
        report.received_at, report.save_wait_s = received_at or t0, save_wait_s
        if rank != 0:
            return None, report
        return {k: v.detach().cpu() for k, v in self.warm.model.state_dict().items()}, report

    def _prepare(self, job: Job, cfg: TrainConfig, weights: dict[str, torch.Tensor]) -> bool:
        """The warm model holding ``weights`` and its optimizers; True if their inner state is
        the site's own from a recent round (memory first, then node-local disk)."""
        from nanochat.train import build_model, optimizers_for

        key = (job.run, json.dumps(job.train_config, sort_keys=True), self.world)
        warm = self.warm
        if warm is not None and warm.key == key:
            with torch.no_grad():
                warm.model.load_state_dict(weights)  # in place; a bf16 transfer is cast back
            if inner_state.is_fresh(warm.round, job.round):
                return True
            warm.optimizers, warm.round = optimizers_for(warm.model, cfg), -1
            return False
        self.warm = None  # free the old model before building the new one
        model, optimizers = build_model(cfg, self.device, weights)
        self.warm = _Warm(key, model, optimizers, -1)
        return inner_state.restore(optimizers, job, self.rank, self.world)

    def _run(self, job: Job, cfg: TrainConfig) -> tuple[TrainResult, float | None]:
        from nanochat.train import run

        assert self.warm is not None
        rank, world = self.rank, self.world
        # Every rank polls the stop key (the stop vote in nanochat.train.run is joint) and asks
        # for its own data refills; only rank 0 publishes metrics and power.
        sig = _connect_signals(job.run)
        publish = sig is not None and rank == 0
        refill = _refiller(sig, job, rank, world)
        loader = _loader(
            job, cfg, self._tokenizer(job.tokenizer_dir), self.device, rank, world, refill
        )

        def on_step(step: int, loss: float, tok_s: float, lrm: float) -> None:
            if publish:
                sig.log_step(job.site, step=step, loss=loss, tok_s=tok_s, lr=lrm, round=job.round)

        energy = _Energy(self.device)
        # The simulation's GPU actor turns the state word into the site's power model.
        if publish:
            sig.set_power(job.site, "train")
        try:
            res = run(
                self.warm.model,
                self.warm.optimizers,
                loader,
                cfg,
                start_step=job.global_step,
                max_steps=job.max_steps,
                deadline=job.deadline_wall,
                should_stop=_stopper(sig, job.site, job.round),
                on_step=on_step,
                ddp=world > 1,
                autocast_ctx=self.autocast_ctx,
            )
        finally:
            if publish:
                sig.set_power(job.site, "idle")
        return res, energy.joules()


def _loader(
    job: Job,
    cfg: TrainConfig,
    tokenizer: Tokenizer,
    device: torch.device,
    rank: int,
    world: int,
    refill: Callable | None,
) -> DataLoader:
    """This rank's DataLoader over the site's data assignment."""
    from nanochat.dataloader import DataLoader

    return DataLoader(
        tokenizer,
        job.data_dir,
        cfg.device_batch_size,
        cfg.sequence_len,
        chunks=job.assignment["chunks"],
        start_rows=job.assignment["start_rows"],
        rank=rank,
        world=world,
        device=device,
        refill=refill,
        packing=cfg.packing,
    )


def _report(
    job: Job,
    res: TrainResult,
    energy_j: float | None,
    device: torch.device,
    world: int,
    restored: bool,
) -> TrainReport:
    """The summary of one rank's training (nanochat.train.run's result) for the ServerApp."""
    return TrainReport(
        site=job.site,
        tokens=res.tokens,
        steps=res.steps,
        loss=statistics.fmean(res.losses) if res.losses else None,
        energy_j=energy_j,
        # read, not trained on: cut off by the packing, or still held by best-fit at the end
        cropped_tokens=int(res.stats.get("cropped_tokens", 0) + res.stats.get("held_tokens", 0)),
        consumed=res.consumed,
        intervals=[(res.started_at, res.ended_at)] if res.steps else [],
        stopped_by=res.stopped_by,
        start_step=res.start_step,
        end_step=res.end_step,
        losses=res.losses,
        device=device.type,
        world=world,
        inner_restored=restored,
        warmup_s=_warmup(res.step_s),
    )


def _warmup(step_s: list[float]) -> float:
    """The first step's excess over the median of the others: compilation and warm-up, which
    the step clock counts as training (0 with fewer than two steps)."""
    if len(step_s) < 2:
        return 0.0
    return max(0.0, step_s[0] - statistics.median(step_s[1:]))


def _spawned(rank: int, world: int, port: int, job: Job, workdir: str) -> None:
    """Entry of one DDP process (torch.multiprocessing.spawn): torchrun's env, then the job."""
    from nanochat.common import device_setup, device_teardown, exit_rank

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    device, autocast_ctx, _, _ = device_setup()
    try:
        weights = torch.load(Path(workdir) / "global.pt", map_location="cpu", weights_only=True)
        worker = Worker(device, autocast_ctx, rank, world)
        state, result = worker.train(job, weights)
        worker.wait_saved()
        if rank == 0:
            torch.save({"state": state, "result": asdict(result)}, Path(workdir) / "result.pt")
    finally:
        device_teardown()
    exit_rank()  # reached only on success: an error propagates to the spawner


def world_size(job: Job) -> int:
    """Processes for this job: one per visible GPU, never more than assigned chunks (every
    rank reads its own chunks), 1 on CPU."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return max(1, min(gpus, len(job.assignment["chunks"])))


def run_job(
    job: Job,
    weights: dict[str, torch.Tensor],
    worker: Worker | None = None,
    received_at: float | None = None,
) -> tuple[dict[str, torch.Tensor], TrainReport]:
    """Train this site's share of the round; returns (new weights, summary). A persistent
    trainer passes its warm single-process ``worker``; without one, a fresh worker trains and
    its inner state is on disk on return."""
    world = world_size(job)
    if world == 1:
        own = worker is None
        if worker is None:
            from nanochat.common import device_setup

            device, autocast_ctx, _, _ = device_setup(threads=job.cpu_threads or None)
            worker = Worker(device, autocast_ctx)
        state, result = worker.train(job, weights, received_at)
        if own:
            worker.wait_saved()
        assert state is not None
        return state, result

    import torch.multiprocessing as mp

    Path(job.state_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=job.state_dir) as workdir:
        torch.save(weights, Path(workdir) / "global.pt")
        mp.spawn(_spawned, args=(world, free_port(), job, workdir), nprocs=world, join=True)
        out = torch.load(Path(workdir) / "result.pt", map_location="cpu", weights_only=True)
    result = TrainReport(**out["result"])
    result.received_at = received_at or result.received_at
    return out["state"], result
