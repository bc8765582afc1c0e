"""Aggregation math, reply validation and the model wire format (pure torch).

- ``weighted_average``: work-weighted FedAvg of model states, computed block by block so the
  accumulator stays in cache: one pass over every input, one write of the output, close to a
  plain memory copy of the same bytes (see bench/aggregate.py).
- ``OuterOptimizer``: ``none`` (the average becomes the global model) or ``nesterov``
  (DiLoCo: pseudo-gradient = global - average, SGD with Nesterov momentum; momentum is part
  of the checkpoint).
- ``validate_state``: a reply is used only if its keys, shapes, dtypes and values are sane.
- ``encode_state``/``decode_state``: tensors to and from the raw-bytes wire form of
  ``pilot.control.wire`` (``encode_arrays``/``decode_arrays`` without the Flower record).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from pilot.control.wire import WIRE_STYPE, RawArray, raw_to_record, record_to_raw

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

State = dict[str, torch.Tensor]

# Elements per block in weighted_average: 1 MiB of fp32 accumulator, small enough to stay in
# L2 while every input streams through once, large enough that per-op overhead vanishes
# (measured: 1<<18 beat 1<<16 and 1<<20 on this machine's 2 cores).
_BLOCK = 1 << 18
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ReplyError(ValueError):
    """A reply that must not be aggregated: the message says what is wrong with it."""


def transfer_dtype(name: str) -> torch.dtype:
    """``"fp32"|"float32"|"bf16"|"bfloat16"`` -> torch dtype (config value check)."""
    aliases = {"fp32": "float32", "bf16": "bfloat16"}
    key = aliases.get(name, name)
    if key not in _DTYPES:
        raise ValueError(f"transfer_dtype {name!r} is not supported; use 'fp32' or 'bf16'")
    return _DTYPES[key]


def weighted_average(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], out: State | None = None
) -> State:
    """Sum_i w_i * state_i / Sum_i w_i, in float32, for floating tensors.

    Non-floating tensors (counters, masks) are taken from the first state. Weights must be
    finite, non-negative and not all zero. ``out`` (fp32 tensors of the same shapes) is
    written in place when given: reusing a buffer across rounds saves the page faults of a
    fresh allocation, which cost as much as the averaging itself.
    """
    if not states or len(states) != len(weights):
        raise ValueError(
            f"need one weight per state, got {len(states)} states, {len(weights)} weights"
        )
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero: {list(weights)}")
    total = float(sum(weights))
    factors = [float(w) / total for w in weights]
    result: State = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            result[key] = first.clone()
            continue
        srcs = [s[key].reshape(-1) for s in states]
        acc = (
            out[key].view(-1)
            if out is not None and key in out
            else torch.empty(first.numel(), dtype=torch.float32)
        )
        for lo in range(0, acc.numel(), _BLOCK):
            hi = min(lo + _BLOCK, acc.numel())
            blk = acc[lo:hi]
            # copy_ then mul_ so that bf16 inputs are scaled in fp32, not rounded first
            blk.copy_(srcs[0][lo:hi]).mul_(factors[0])
            for src, f in zip(srcs[1:], factors[1:], strict=True):
                blk.add_(src[lo:hi], alpha=f)
        result[key] = acc.view(first.shape)
    return result


class OuterOptimizer:
    """Server-side outer step applied to the global model after averaging."""

    def __init__(self, kind: str = "none", lr: float = 1.0, momentum: float = 0.9):
        if kind not in ("none", "nesterov"):
            raise ValueError(f"outer optimizer {kind!r} is not supported; use 'none' or 'nesterov'")
        self.kind, self.lr, self.momentum = kind, float(lr), float(momentum)
        self.buf: State = {}

    def step(self, global_state: State, average: State) -> State:
        """Return the new global state. ``average`` is consumed (reused as scratch)."""
        if self.kind == "none":
            return average
        new: State = {}
        for key, g0 in global_state.items():
            avg = average[key]
            if not g0.is_floating_point():
                new[key] = avg
                continue
            # pseudo-gradient g = global - average, computed in the average's buffer
            grad = avg.neg_().add_(g0.to(avg.dtype))
            buf = self.buf.get(key)
            if buf is None:
                buf = self.buf[key] = torch.zeros_like(grad)
            buf.mul_(self.momentum).add_(grad)
            # Nesterov: update = g + mu * buf (as torch.optim.SGD(nesterov=True))
            grad.add_(buf, alpha=self.momentum)
            new[key] = g0.to(torch.float32, copy=True).sub_(grad, alpha=self.lr)
        return new

    def state_dict(self) -> dict:
        return {"kind": self.kind, "lr": self.lr, "momentum": self.momentum, "buf": self.buf}

    def load_state_dict(self, d: Mapping) -> None:
        if d["kind"] != self.kind:
            raise ValueError(
                f"checkpoint has outer optimizer {d['kind']!r}, config says "
                f"{self.kind!r}; use the same run config to resume"
            )
        self.buf = {k: v.to(torch.float32) for k, v in d["buf"].items()}


def validate_state(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> None:
    """Raise ReplyError unless ``state`` matches ``reference`` key-for-key and shape-for-shape,
    floating tensors have the transfer ``dtype`` and every value is finite."""
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        raise ReplyError(
            f"keys differ from the global model: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for key, ref in reference.items():
        t = state[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise ReplyError(f"{key}: shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if ref.is_floating_point():
            if t.dtype != dtype:
                raise ReplyError(f"{key}: dtype {t.dtype}, expected {dtype}")
            if not bool(torch.isfinite(t).all()):
                raise ReplyError(f"{key}: contains NaN or Inf")
        elif t.dtype != ref.dtype:
            raise ReplyError(f"{key}: dtype {t.dtype}, expected {ref.dtype}")


def encode_arrays(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> list[RawArray]:
    """Model state -> raw arrays (floating tensors cast to ``dtype``), see pilot.control.wire."""
    out: list[RawArray] = []
    for key, t in state.items():
        t = t.detach().cpu()
        if t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        data = t.view(torch.uint8).numpy().tobytes()
        out.append((key, str(t.dtype).removeprefix("torch."), tuple(t.shape), WIRE_STYPE, data))
    return out


def encode_state(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> ArrayRecord:
    """Model state -> Flower ArrayRecord of raw tensor bytes (floating tensors cast to
    ``dtype``)."""
    return raw_to_record(encode_arrays(state, dtype))


def decode_arrays(arrays: Iterable[RawArray]) -> State:
    """Raw arrays -> tensors; raises ReplyError when malformed.

    The tensors share the arrays' read-only buffers: read them, copy before writing.
    """
    out: State = {}
    for key, dtype, shape, stype, data in arrays:
        if stype != WIRE_STYPE:
            raise ReplyError(f"{key}: serialisation {stype!r}, expected {WIRE_STYPE!r}")
        dt = getattr(torch, dtype, None)
        if not isinstance(dt, torch.dtype):
            raise ReplyError(f"{key}: unknown dtype {dtype!r}")
        n = math.prod(shape)
        if len(data) != n * dt.itemsize:
            raise ReplyError(f"{key}: {len(data)} bytes for shape {tuple(shape)} {dtype}")
        if n == 0:
            out[key] = torch.empty(tuple(shape), dtype=dt)
            continue
        with warnings.catch_warnings():
            # The buffer is the received bytes object (read-only); nothing writes through it.
            warnings.simplefilter("ignore", UserWarning)
            out[key] = torch.frombuffer(data, dtype=dt).view(tuple(shape))
    return out


def decode_state(record: ArrayRecord) -> State:
    """Flower ArrayRecord (from ``encode_state``) -> tensors; raises ReplyError when malformed.

    The tensors share the message's read-only buffers: read them, copy before writing.
    """
    return decode_arrays(record_to_raw(record))


def state_bytes(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> int:
    """Bytes of ``state`` on the wire with floating tensors in ``dtype``."""
    return sum(
        t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
        for t in state.values()
    )
