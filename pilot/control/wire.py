"""The model's wire form, torch-free: a tensor is a Flower ``Array`` of raw little-endian bytes
(serialisation ``WIRE_STYPE``). A site's relay passes these bytes between Flower and its
trainer without decoding them; ``pilot.control.aggregate`` turns them into tensors and back.

NumPy (and so Flower's default ``Array`` serialisation) has no bfloat16, and raw bytes avoid
the ``np.save`` round trip for fp32 too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

WIRE_STYPE = "torch.raw"

# (name, dtype, shape, serialisation, raw bytes): one tensor as Flower's Array carries it
RawArray = tuple[str, str, tuple[int, ...], str, bytes]


def record_to_raw(record: Any) -> list[RawArray]:
    """A Flower ArrayRecord's arrays as they are, without decoding them."""
    return [(k, a.dtype, tuple(a.shape), a.stype, a.data) for k, a in record.items()]


def raw_to_record(arrays: Sequence[RawArray]) -> Any:
    """Raw arrays back into a Flower ArrayRecord (the bytes are not copied or checked)."""
    from flwr.app import Array, ArrayRecord

    rec = ArrayRecord()
    for name, dtype, shape, stype, data in arrays:
        rec[name] = Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data)
    return rec
