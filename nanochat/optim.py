"""Optimizers: Muon for the transformer's matrices, AdamW for embeddings and unembedding.

Both are distributed-aware without a DDP wrapper: when a torch.distributed process group
exists, step() first averages the gradients over ranks. Muon then shards its expensive part,
the Newton-Schulz orthogonalisation, over ranks (parameter i is orthogonalised by rank
i % world and broadcast from there), like nanochat's DistMuon. Every rank keeps the full
momentum state, so state_dict() is identical on all ranks and rank 0 alone can checkpoint it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

# Quintic Newton-Schulz coefficients from modded-nanogpt: chosen to push singular values into
# roughly [0.7, 1.2] in five steps rather than to converge exactly to 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonalise G (replace its singular values by ~1).

    Runs in bf16 on GPU (stable for this iteration and much faster); fp32 on CPU, where bf16
    matmuls are slow.
    """
    a, b, c = NS_COEFFS
    X = G.bfloat16() if G.is_cuda else G.float()
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # iterate on the wide orientation: X @ X.T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_grads(params: Iterable[torch.Tensor]) -> None:
    """All-reduce .grad of every param to its mean over ranks (gloo has no AVG op: SUM + scale)."""
    world = dist.get_world_size()
    grads = [p.grad for p in params if p.grad is not None]
    works = [dist.all_reduce(g, op=dist.ReduceOp.SUM, async_op=True) for g in grads]
    for work, g in zip(works, grads, strict=True):
        work.wait()
        g.div_(world)


class AdamW(torch.optim.AdamW):
    """torch AdamW that averages gradients over ranks first when a process group exists."""

    @torch.no_grad()
    def step(self, closure=None):
        if _distributed():
            average_grads(p for group in self.param_groups for p in group["params"])
        return super().step(closure)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-schulz (Keller Jordan, modded-nanogpt).

    SGD with Nesterov momentum whose update for each 2-D matrix is replaced by the nearest
    (semi-)orthogonal matrix, scaled by sqrt(max(1, rows/cols)) so tall and wide matrices take
    steps of the same RMS size. Weight decay is decoupled (p *= 1 - lr * wd). The momentum
    warm-up (0.85 -> 0.95 over the first 300 steps) is set per step by the training loop.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
    ):
        params = list(params)
        if any(p.ndim != 2 for p in params):
            raise ValueError("Muon only handles 2-D parameters; give vectors/embeddings to AdamW")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            weight_decay=weight_decay,
        )
        # One group per matrix shape (sorted: group order must be the same in every process
        # for load_state_dict to line up).
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [{"params": [p for p in params if tuple(p.shape) == s]} for s in shapes]
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        distributed = _distributed()
        if distributed:
            average_grads(p for group in self.param_groups for p in group["params"])
            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            rank, world = 0, 1
        index = 0  # global parameter index across groups: owner rank = index % world
        pending = []
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                owner = index % world
                index += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mom)  # every rank keeps the full momentum state
                if owner == rank:
                    g = p.grad.lerp(buf, mom) if group["nesterov"] else buf
                    update = zeropower_via_newtonschulz5(g, steps=group["ns_steps"])
                    if wd:
                        p.mul_(1 - lr * wd)
                    p.add_(update, alpha=-lr * max(1.0, p.size(-2) / p.size(-1)) ** 0.5)
                if distributed:
                    pending.append(dist.broadcast(p, src=owner, async_op=True))
        for work in pending:
            work.wait()
