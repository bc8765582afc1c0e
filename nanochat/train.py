"""The one training loop, shared by scripts/base_train.py (torchrun baseline) and the Flower
ClientApp. Schedules (LR, Muon momentum, weight decay) are functions of the GLOBAL step, so a
site that resumes at step k continues the run's schedule instead of restarting it."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from nanochat.common import is_ddp
from nanochat.dataloader import PACKINGS, DataLoader
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer


@dataclass
class TrainConfig:
    # model
    depth: int = 4
    vocab_size: int = 8192
    sequence_len: int = 256
    # training rows: "greedy" (documents in order, the first that does not fit cropped) or
    # "bestfit" (the longest of the next few documents that fits; nanochat.dataloader)
    packing: str = "greedy"
    # batch: total_batch_size tokens per optimizer step, reached by gradient accumulation
    device_batch_size: int = 8
    total_batch_size: int = 4096
    # schedule
    num_iterations: int = 1000  # length of the LR / weight-decay schedule in steps
    embedding_lr: float = 0.2  # AdamW, wte (scaled by (n_embd/768)^-0.5)
    unembedding_lr: float = 0.004  # AdamW, lm_head (same scaling)
    matrix_lr: float = 0.02  # Muon, all transformer matrices
    weight_decay: float = 0.0  # Muon, decays linearly to 0 over num_iterations
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    momentum_warmup_steps: int = 300  # Muon momentum 0.85 -> 0.95
    # evaluation
    eval_every: int = 100
    eval_tokens: int = 65536
    seed: int = 42
    # torch.compile backend for the training forward/backward: "auto" (inductor on CUDA, eager
    # elsewhere: on CPU inductor's C++ build costs ~40 s per process here and a Flower site
    # starts a fresh process every round), "off", or a backend name ("inductor", "aot_eager").
    compile: str = "auto"

    def __post_init__(self):
        if self.packing not in PACKINGS:  # at run start, not in a site's first batch
            raise ValueError(f"packing must be one of {PACKINGS}, not {self.packing!r}")

    def grad_accum_steps(self, world: int = 1) -> int:
        per_step = self.device_batch_size * self.sequence_len * world
        if self.total_batch_size % per_step:
            raise ValueError(
                f"total_batch_size={self.total_batch_size} is not a multiple of device_batch_size"
                f" * sequence_len * world = {per_step}"
            )
        return self.total_batch_size // per_step

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        return cls(**d)


@dataclass
class TrainResult:
    steps: int  # optimizer steps taken in this call
    tokens: int  # tokens trained on, over all ranks
    losses: list[float]  # mean training loss per step (averaged over ranks)
    start_step: int
    end_step: int
    stopped_by: str  # "steps" | "deadline" | "stop" | "data"
    started_at: float
    ended_at: float
    cursor: list[dict]  # loader cursor of every rank, index = rank
    consumed: dict[str, int]  # rows consumed per chunk, merged over ranks
    stats: dict = field(default_factory=dict)  # loader stats summed over ranks
    step_s: list[float] = field(default_factory=list)  # wall seconds of each step (this rank)


def compiled(model: GPT, backend: str) -> torch.nn.Module:
    """The module the training step calls: `model` itself, or torch.compile of it for
    `backend` (see TrainConfig.compile). Weights are shared, so state dicts, checkpoints and
    optimizers keep using the plain `model`."""
    if backend == "auto":
        backend = "inductor" if next(model.parameters()).is_cuda else "off"
    if backend == "off":
        return model
    backends = torch._dynamo.list_backends(exclude_tags=())
    if backend not in backends:
        raise ValueError(
            f"TrainConfig.compile={backend!r}: use auto, off or one of {sorted(backends)}"
        )
    # Fixed shapes (B, T) every step: dynamic=False compiles one graph, no shape guards.
    return torch.compile(model, backend=backend, dynamic=False)


def model_config(cfg: TrainConfig) -> GPTConfig:
    return GPTConfig.from_depth(cfg.depth, vocab_size=cfg.vocab_size, sequence_len=cfg.sequence_len)


def empty_model(cfg: TrainConfig, device: str | torch.device = "cpu") -> GPT:
    """cfg's GPT allocated once, on ``device`` (built on the meta device, no init pass), its
    rotary buffers set and its weights uninitialised: for a caller that loads weights."""
    with torch.device("meta"):
        model = GPT(model_config(cfg))
    model.to_empty(device=device)
    model.init_buffers()
    return model


def build_model(
    cfg: TrainConfig,
    device: str | torch.device = "cpu",
    weights: dict[str, torch.Tensor] | None = None,
) -> tuple[GPT, list[torch.optim.Optimizer]]:
    """cfg's GPT and its [AdamW, Muon]: freshly initialised (seeded by cfg.seed), or started
    from ``weights`` (a round's global model; a bf16 transfer is cast back to fp32)."""
    if weights is None:
        torch.manual_seed(cfg.seed)
    model = empty_model(cfg, device)
    if weights is None:
        model.init_weights()
    else:
        model.load_state_dict(weights)
    return model, optimizers_for(model, cfg)


def optimizers_for(model: GPT, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """Fresh [AdamW, Muon] for ``model`` with cfg's learning rates."""
    return model.setup_optimizers(
        unembedding_lr=cfg.unembedding_lr,
        embedding_lr=cfg.embedding_lr,
        matrix_lr=cfg.matrix_lr,
        weight_decay=cfg.weight_decay,
    )


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, constant, then linear warmdown to final_lr_frac (nanochat)."""
    n = cfg.num_iterations
    warmup = round(cfg.warmup_ratio * n)
    warmdown = round(cfg.warmdown_ratio * n)
    if step < warmup:
        return (step + 1) / warmup
    if step <= n - warmdown:
        return 1.0
    progress = max(0.0, (n - step) / warmdown)
    return progress + (1 - progress) * cfg.final_lr_frac


def muon_momentum(step: int, cfg: TrainConfig) -> float:
    frac = min(step / cfg.momentum_warmup_steps, 1.0) if cfg.momentum_warmup_steps else 1.0
    return (1 - frac) * 0.85 + frac * 0.95


def weight_decay_multiplier(step: int, cfg: TrainConfig) -> float:
    return max(0.0, 1 - step / cfg.num_iterations)


def apply_schedules(optimizers: list[torch.optim.Optimizer], step: int, cfg: TrainConfig) -> float:
    """Set every group's lr/weight decay (and Muon's momentum) for global step; returns the LR
    multiplier. Groups carry initial_lr / initial_weight_decay from setup_optimizers."""
    lrm = lr_multiplier(step, cfg)
    wdm = weight_decay_multiplier(step, cfg)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            group["weight_decay"] = group["initial_weight_decay"] * wdm
            if "momentum" in group:  # Muon
                group["momentum"] = muon_momentum(step, cfg)
    return lrm


def _all_reduce(values: list[float], op: dist.ReduceOp, device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


STOP_CODES = {1: "data", 2: "stop", 3: "deadline", 4: "steps"}


def run(
    model: GPT,
    optimizers: list[torch.optim.Optimizer],
    loader: DataLoader | Iterator,
    cfg: TrainConfig,
    *,
    start_step: int = 0,
    max_steps: int | None = None,
    deadline: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, float, float, float], None] | None = None,
    ddp: bool | None = None,
    autocast_ctx=None,
) -> TrainResult:
    """Train from global step start_step until one of: the schedule ends (cfg.num_iterations)
    or max_steps steps are taken ("steps"), the next step would end after the wall-clock
    deadline (epoch seconds, "deadline"), should_stop() returns True ("stop"), or the loader
    is exhausted ("data"). With ddp (default: whether a process group exists) gradients are
    averaged by the optimizers, stop decisions are agreed by all ranks (so collectives never
    hang, and no rank reads a batch it will not train on, except at the end of the data), and
    the returned losses/tokens/cursor/consumed cover all ranks. on_step(step, loss,
    tokens_per_s, lr_mult) is called on every rank after each step with the global step just
    completed."""
    ddp = is_ddp() if ddp is None else ddp
    world = dist.get_world_size() if ddp else 1
    device = next(model.parameters()).device
    autocast_ctx = autocast_ctx or contextlib.nullcontext()
    grad_accum = cfg.grad_accum_steps(world)
    tokens_per_step = cfg.total_batch_size
    step_model = compiled(model, cfg.compile)

    model.train()
    step = start_step
    losses: list[float] = []
    step_s: list[float] = []
    started_at = time.time()
    last_step_s = 0.0
    stopped_by = "steps"
    while True:
        # Decide locally, then agree: the highest-priority reason of any rank wins. Stop
        # reasons are agreed before any rank reads the next batches, data exhaustion after.
        code = 0
        if step >= cfg.num_iterations or (max_steps is not None and step - start_step >= max_steps):
            code = 4
        elif deadline is not None and time.time() + last_step_s > deadline:
            code = 3
        elif should_stop is not None and should_stop():
            code = 2
        if ddp:
            code = int(_all_reduce([code], dist.ReduceOp.MAX, device)[0])
        batches = []
        if not code:
            try:
                batches = [next(loader) for _ in range(grad_accum)]
            except StopIteration:
                code = 1
            if ddp:
                code = int(_all_reduce([code], dist.ReduceOp.MAX, device)[0])
        if code:
            stopped_by = STOP_CODES[code]
            break

        t0 = time.time()
        lrm = apply_schedules(optimizers, step, cfg)
        loss_sum = torch.zeros((), device=device)
        for x, y in batches:
            with autocast_ctx:
                loss = step_model(x.to(device), y.to(device))
            loss_sum += loss.detach()
            (loss / grad_accum).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        mean_loss = loss_sum.item() / grad_accum
        if ddp:
            mean_loss = _all_reduce([mean_loss], dist.ReduceOp.SUM, device)[0] / world
        step += 1
        losses.append(mean_loss)
        last_step_s = time.time() - t0
        step_s.append(last_step_s)
        if on_step is not None:
            on_step(step, mean_loss, tokens_per_step / max(last_step_s, 1e-9), lrm)

    cursor = loader.cursor() if hasattr(loader, "cursor") else None
    consumed = loader.consumed() if hasattr(loader, "consumed") else {}
    stats = dict(getattr(loader, "stats", {}))
    if ddp:
        cursors = _gather(cursor)
        consumed = {k: v for part in _gather(consumed) for k, v in part.items()}
        stats = {k: sum(s[k] for s in _gather(stats)) for k in stats}
    else:
        cursors = [cursor]
    n_steps = step - start_step
    return TrainResult(
        steps=n_steps,
        tokens=n_steps * tokens_per_step,
        losses=losses,
        start_step=start_step,
        end_step=step,
        stopped_by=stopped_by,
        started_at=started_at,
        ended_at=time.time(),
        cursor=cursors,
        consumed=consumed,
        stats=stats,
        step_s=step_s,
    )


@torch.no_grad()
def evaluate_bpb(
    model: GPT,
    loader: DataLoader | Iterator,
    token_bytes: torch.Tensor,
    steps: int,
    autocast_ctx=None,
) -> float:
    """Bits per byte over `steps` batches: summed token losses (nats) / ln 2 / summed UTF-8
    bytes of the target tokens. Special-token targets (0 bytes) carry no loss or bytes, so
    the number is independent of the vocabulary. Summed over ranks under DDP; stops early if
    the loader runs out."""
    autocast_ctx = autocast_ctx or contextlib.nullcontext()
    device = next(model.parameters()).device
    token_bytes = token_bytes.to(device)
    was_training = model.training
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(steps):
        try:
            x, y = next(loader)
        except StopIteration:
            break
        x, y = x.to(device), y.to(device)
        with autocast_ctx:
            loss2d = model(x, y, loss_reduction="none")
        valid = y >= 0
        b = torch.where(valid, token_bytes[y.clamp(min=0)], 0)
        nats += (loss2d.double() * (b > 0)).sum()
        nbytes += b.sum()
    if is_ddp():
        totals = torch.stack([nats, nbytes])
        dist.all_reduce(totals)
        nats, nbytes = totals[0], totals[1]
    model.train(was_training)
    if nbytes.item() == 0:
        raise ValueError("evaluate_bpb saw no target bytes: is the validation loader empty?")
    return nats.item() / (math.log(2) * nbytes.item())


def eval_steps(cfg: TrainConfig, world: int = 1) -> int:
    """Validation batches per evaluation: cfg.eval_tokens over all ranks, at least one."""
    return max(1, cfg.eval_tokens // (cfg.device_batch_size * cfg.sequence_len * world))


def val_bpb(
    model: GPT,
    tokenizer: Tokenizer,
    data_dir,
    cfg: TrainConfig,
    *,
    rank: int = 0,
    world: int = 1,
    autocast_ctx=None,
) -> float:
    """The run's validation metric: evaluate_bpb over the first cfg.eval_tokens tokens of the
    held-out (last) shard, read from its start every time. The torchrun baseline, the
    ServerApp's per-round validation and bench/parity.py all call this, so their numbers are
    the same measurement (same shard, same tokens, same budget)."""
    device = next(model.parameters()).device
    loader = DataLoader(
        tokenizer, data_dir, cfg.device_batch_size, cfg.sequence_len,
        rank=rank, world=world, split="val", device=device,
    )  # fmt: skip
    return evaluate_bpb(
        model, loader, tokenizer.token_bytes(), eval_steps(cfg, world), autocast_ctx
    )
