"""Model-quality parity at equal tokens: centralized vs curtailment-aware vs continuous
federated training, with the real code paths and no Flower (bench/parity.py is the CLI).

(a) ``central``: nanochat.train.run over the training shards in order, one model.
(b)/(c) ``federated``: the rounds of a plan (pilot.analysis.schedule: from the policy's schedule on a
trace, or continuous), each site a model with its own inner optimizer state kept across
rounds (as on a site's disk), trained sequentially in this process by nanochat.train.run from
the round's global model, then pilot.control.aggregate.weighted_average (weights = tokens) and the
OuterOptimizer, exactly as the ServerApp's _close_round.

Every way trains the same token count; each way's LR schedule spans its own global steps
(num_iterations = the steps its global model takes), so every run ends its warmdown. All
three are measured with nanochat.train.val_bpb (the baseline's and the ServerApp's metric).

Data order: ``sites`` (as the live system) gives each site its own slice of the training
chunks (chunks[i::S]); ``stream`` (bench/parity.py's default) feeds every site from one loader
in central order, so (b) sees exactly (a)'s batches and only curtailment and averaging differ.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanochat.dataloader import DataLoader
from nanochat.dataset import chunk_table
from nanochat.tokenizer import Tokenizer
from nanochat.train import TrainConfig, build_model, run, val_bpb
from pilot.analysis.schedule import PlannedRound
from pilot.control.aggregate import OuterOptimizer, weighted_average
from pilot.control.updates import decode_update, encode_update

DATA_ORDERS = ("sites", "stream")


@dataclass
class Setup:
    data_dir: Path
    tokenizer: Tokenizer
    cfg: TrainConfig  # num_iterations is set per way
    data: str = "stream"
    outer: str = "none"
    outer_lr: float = 1.0
    outer_momentum: float = 0.9
    evals: int = 6  # validation points on each curve (the last one is the final bpb)
    update_dtype: str = "fp32"  # what a site's update travels in (pilot.control.updates)


@dataclass
class Result:
    name: str
    bpb: float = float("nan")
    tokens: int = 0
    global_steps: int = 0
    rounds: int = 0
    seconds: float = 0.0
    read: int = 0  # tokens the loaders packed into rows
    cropped: int = 0  # tokens the loaders read and cut off
    val: list[tuple[int, float]] = field(default_factory=list)  # (tokens, val bpb)
    train: list[tuple[int, float]] = field(default_factory=list)  # (tokens, train loss)

    @property
    def cropped_share(self) -> float:
        return self.cropped / max(1, self.read + self.cropped)


def _loader(setup: Setup, chunks=None) -> DataLoader:
    c = setup.cfg
    # loop: a long run may read the corpus more than once; every way reads it alike
    return DataLoader(
        setup.tokenizer, setup.data_dir, c.device_batch_size, c.sequence_len,
        chunks=chunks, loop=True, packing=c.packing,
    )  # fmt: skip


def _marks(total_tokens: int, n: int) -> list[int]:
    """Token counts after which a curve is evaluated: n evenly spaced, the last = total."""
    return [round(total_tokens * (i + 1) / n) for i in range(n)]


class _Curve:
    """Evaluates the model each time the token count passes the next mark."""

    def __init__(self, setup: Setup, result: Result, total_tokens: int):
        self.setup, self.result = setup, result
        self.marks = _marks(total_tokens, max(1, setup.evals))

    def __call__(self, model, tokens: int) -> None:
        if self.marks and tokens >= self.marks[0]:
            while self.marks and tokens >= self.marks[0]:
                self.marks.pop(0)
            bpb = val_bpb(model, self.setup.tokenizer, self.setup.data_dir, self.setup.cfg)
            self.result.val.append((tokens, bpb))
            self.result.bpb = bpb


def central(setup: Setup, steps: int) -> Result:
    """(a): one model, the training shards in order, `steps` steps."""
    cfg = dataclasses.replace(setup.cfg, num_iterations=steps)
    res = Result("central", global_steps=steps, rounds=1)
    t0 = time.time()
    model, optimizers = build_model(cfg)
    loader = _loader(setup)
    curve = _Curve(setup, res, steps * cfg.total_batch_size)
    step = 0
    for mark in _marks(steps, max(1, setup.evals)):
        out = run(model, optimizers, loader, cfg, start_step=step, max_steps=mark - step)
        step = out.end_step
        res.train += [
            (res.tokens + (i + 1) * cfg.total_batch_size, x) for i, x in enumerate(out.losses)
        ]
        res.tokens += out.tokens
        curve(model, res.tokens)
    res.read, res.cropped = loader.stats["tokens"], loader.stats["cropped_tokens"]
    res.seconds = time.time() - t0
    return res


def federated(setup: Setup, rounds: list[PlannedRound], name: str) -> Result:
    """(b) or (c): the plan's rounds, averaged by tokens, outer step after each round."""
    sites = sorted({s for r in rounds for s in r.work})
    cfg = dataclasses.replace(
        setup.cfg, num_iterations=sum(max(w.steps for w in r.work.values()) for r in rounds)
    )
    res = Result(name, global_steps=cfg.num_iterations, rounds=len(rounds))
    t0 = time.time()
    global_model, _ = build_model(cfg)  # same seeded init as (a)
    state = {k: v.detach().clone() for k, v in global_model.state_dict().items()}
    # one model + inner optimizer per site, kept across rounds (DiLoCo's inner state)
    trainers = {s: build_model(cfg) for s in sites}
    loaders = _site_loaders(setup, sites)
    feedback: dict[str, dict] = {s: {} for s in sites}  # each site's int8 rounding error
    outer = OuterOptimizer(setup.outer, setup.outer_lr, setup.outer_momentum)
    total = sum(w.steps for r in rounds for w in r.work.values()) * cfg.total_batch_size
    curve = _Curve(setup, res, total)
    step = 0
    for r in rounds:
        states, weights, losses = [], [], []
        for site, w in sorted(r.work.items()):
            model, optimizers = trainers[site]
            model.load_state_dict(state)
            out = run(model, optimizers, loaders[site], cfg, start_step=step, max_steps=w.steps)
            # the site's update through the wire format the live system uses, and back
            arrays = encode_update(state, model.state_dict(), setup.update_dtype, feedback[site])
            states.append(decode_update(arrays, state, setup.update_dtype))
            weights.append(float(out.tokens))
            losses += out.losses
        state = outer.step(state, weighted_average(states, weights))
        step += max(w.steps for w in r.work.values())
        res.tokens += int(sum(weights))
        # the round-mean train loss, as the ServerApp's aggregate event reports it
        res.train.append((res.tokens, sum(losses) / len(losses)))
        global_model.load_state_dict(state)
        curve(global_model, res.tokens)
    distinct = {id(ld): ld for ld in loaders.values()}.values()
    res.read = sum(ld.stats["tokens"] for ld in distinct)
    res.cropped = sum(ld.stats["cropped_tokens"] for ld in distinct)
    res.seconds = time.time() - t0
    return res


def _site_loaders(setup: Setup, sites: list[str]) -> dict[str, DataLoader]:
    if setup.data == "stream":
        shared = _loader(setup)
        return dict.fromkeys(sites, shared)
    if setup.data != "sites":
        raise ValueError(f"data order {setup.data!r}: use one of {DATA_ORDERS}")
    table = chunk_table(setup.data_dir)
    return {s: _loader(setup, table[i :: len(sites)]) for i, s in enumerate(sites)}


def set_threads(n: int) -> None:
    """A fixed intra-op thread count: CPU results are bit-identical only at the same count."""
    torch.set_num_threads(n)
