"""A site's round update on the wire: its pseudo-gradient ``base - trained`` (``base`` the
weights its TRAIN order carried), not its weights.

The server keeps fp32 master weights and rebuilds the site's model as ``base - update`` in
fp32 (``decode_update``), so the global model is never re-rounded to the wire's precision:
only the update is. Update dtypes (run config ``update_dtype``):

- ``fp32``: exact, 4 bytes per parameter.
- ``bf16`` (default): 2 bytes per parameter.
- ``int8``: 1 byte per parameter plus one fp32 scale per row (symmetric, absmax per row of a
  matrix, per tensor for vectors), ~0.25x of fp32. The site keeps the rounding error and adds it
  to its next update (error feedback), so no part of an update is lost for good.

Non-floating tensors travel as they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from pilot.control.aggregate import ReplyError, State, decode_arrays, encode_arrays
from pilot.control.wire import RawArray

UPDATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
SCALE_SUFFIX = "::scale"  # the array holding a quantised tensor's per-row scales
_QMAX = 127


def check_update_dtype(name: str) -> str:
    """``name`` if it is an update dtype, else ValueError naming the choices."""
    if name not in UPDATE_DTYPES:
        raise ValueError(
            f"update_dtype {name!r} is not supported; use one of {list(UPDATE_DTYPES)}"
        )
    return name


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a matrix of rows: a matrix by its first dimension, a vector as one row."""
    return t.reshape(t.shape[0], -1) if t.ndim >= 2 else t.reshape(1, -1)


def quantize(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``d`` -> (int8 of d's shape, fp32 scale per row)."""
    rows = _rows(d)
    scale = rows.abs().amax(dim=1).clamp_min(1e-30) / _QMAX
    q = (rows / scale[:, None]).round_().clamp_(-_QMAX, _QMAX).to(torch.int8)
    return q.reshape(d.shape), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (_rows(q).float() * scale.float()[:, None]).reshape(q.shape)


def encode_update(
    base: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    dtype: str,
    feedback: dict[str, torch.Tensor] | None = None,
) -> list[RawArray]:
    """The pseudo-gradient ``base - trained`` as raw arrays in ``dtype``. With int8,
    ``feedback`` (kept by the caller between rounds) is added first and left holding this
    update's rounding error."""
    check_update_dtype(dtype)
    out: list[RawArray] = []
    for key, t in trained.items():
        if not t.is_floating_point():
            out += encode_arrays({key: t}, torch.float32)
            continue
        d = base[key].float() - t.detach().float().cpu()
        if dtype != "int8":
            out += encode_arrays({key: d}, UPDATE_DTYPES[dtype])
            continue
        if feedback is not None and key in feedback:
            d += feedback[key]
        q, scale = quantize(d)
        if feedback is not None:
            feedback[key] = d - dequantize(q, scale)
        out += encode_arrays({key: q, key + SCALE_SUFFIX: scale}, torch.float32)
    return out


def decode_update(arrays: list[RawArray], base: Mapping[str, torch.Tensor], dtype: str) -> State:
    """The site's model rebuilt in fp32 as ``base - update``; ReplyError unless the update
    matches ``base`` key for key and shape for shape, in ``dtype``, with finite values."""
    raw = decode_arrays(arrays)
    scales = {k.removesuffix(SCALE_SUFFIX): v for k, v in raw.items() if k.endswith(SCALE_SUFFIX)}
    tensors = {k: v for k, v in raw.items() if not k.endswith(SCALE_SUFFIX)}
    missing, extra = sorted(set(base) - set(tensors)), sorted(set(tensors) - set(base))
    if missing or extra or set(scales) - set(base):
        raise ReplyError(
            f"update keys differ from the model: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    out: State = {}
    for key, ref in base.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise ReplyError(f"{key}: shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if not ref.is_floating_point():
            if t.dtype != ref.dtype:
                raise ReplyError(f"{key}: dtype {t.dtype}, expected {ref.dtype}")
            out[key] = t.clone()
            continue
        out[key] = ref.float() - _delta(key, t, scales.get(key), dtype)
    return out


def _delta(key: str, t: torch.Tensor, scale: torch.Tensor | None, dtype: str) -> torch.Tensor:
    """One tensor's update in fp32, checked."""
    if t.dtype != UPDATE_DTYPES[dtype]:
        raise ReplyError(f"{key}: update dtype {t.dtype}, expected {UPDATE_DTYPES[dtype]}")
    if dtype == "int8":
        rows = _rows(t).shape[0]
        if scale is None or tuple(scale.shape) != (rows,):
            raise ReplyError(f"{key}: int8 update without its {rows} row scales")
        d = dequantize(t, scale)
    else:
        d = t.float()
    if not bool(torch.isfinite(d).all()):
        raise ReplyError(f"{key}: contains NaN or Inf")
    return d


def update_bytes(state: Mapping[str, torch.Tensor], dtype: str) -> int:
    """Bytes of ``state``'s update on the wire in ``dtype`` (scales included)."""
    total = 0
    for t in state.values():
        if not t.is_floating_point():
            total += t.numel() * t.element_size()
            continue
        total += t.numel() * UPDATE_DTYPES[dtype].itemsize
        if dtype == "int8":
            total += math.prod(_rows(t).shape[:1]) * 4
    return total
