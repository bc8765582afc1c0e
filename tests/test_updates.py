"""A site's pseudo-gradient on the wire (pilot.control.updates): the server rebuilds the site's
model in fp32 from it, int8 carries its rounding error to the next round, and anything
malformed is refused."""

import pytest
import torch

from pilot.control.aggregate import ReplyError, encode_arrays
from pilot.control.updates import decode_update, encode_update, update_bytes


def _pair(seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    base = {
        "w": torch.randn(64, 256, generator=g),
        "b": torch.randn(256, generator=g),
        "count": torch.tensor([3]),
    }
    trained = {k: v - 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in base.items()}  # fmt: skip
    return base, trained


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_the_server_rebuilds_the_sites_model_from_its_update(dtype):
    base, trained = _pair()
    local = decode_update(encode_update(base, trained, dtype), base, dtype)
    assert set(local) == set(base) and local["w"].dtype == torch.float32
    assert torch.equal(local["count"], trained["count"])
    # the error is the update's rounding, relative to the small update, never the weights'
    step = (base["w"] - trained["w"]).abs().max()
    tol = {"fp32": 1e-6, "bf16": step * 2**-8, "int8": step / 127}[dtype]
    assert (local["w"] - trained["w"]).abs().max() <= tol + 1e-7
    # bf16 weights would be off by ~|w| * 2**-8, far more than a bf16 update is
    assert (
        trained["w"].bfloat16().float() - trained["w"]
    ).abs().max() > 10 * tol or dtype == "fp32"


def test_int8_error_feedback_keeps_the_sum_of_updates_on_track():
    base, trained = _pair(1)
    true = base["w"] - trained["w"]
    feedback: dict = {}
    sent = torch.zeros_like(true)
    for _ in range(50):
        local = decode_update(encode_update(base, trained, "int8", feedback), base, "int8")
        sent += base["w"] - local["w"]
    # without feedback the per-round rounding would add up; with it the total stays within one
    # quantisation step of 50 true updates
    assert (sent - 50 * true).abs().max() <= true.abs().amax(dim=1).max() / 127 + 1e-6


def test_bf16_and_int8_updates_are_half_and_about_a_quarter_of_fp32():
    base, _ = _pair()
    fp32, bf16, int8 = (update_bytes(base, d) for d in ("fp32", "bf16", "int8"))
    assert bf16 / fp32 == pytest.approx(0.5, abs=0.01)
    assert int8 / fp32 <= 0.27
    wire = sum(len(a[4]) for a in encode_update(base, _pair()[1], "int8"))
    assert wire == int8  # the estimate is what is sent


@pytest.mark.parametrize(
    "spoil, message",
    [
        (
            lambda a: [
                x if x[0] != "w" else encode_arrays({"w": torch.zeros(3, 3)}, torch.bfloat16)[0]
                for x in a
            ],
            "shape",
        ),  # fmt: skip
        (lambda a: [x for x in a if x[0] != "b"], "missing"),
        (lambda a: a + encode_arrays({"extra": torch.zeros(2)}, torch.bfloat16), "unexpected"),
        (
            lambda a: [
                x
                if x[0] != "b"
                else encode_arrays({"b": torch.full((256,), float("nan"))}, torch.bfloat16)[0]
                for x in a
            ],
            "NaN",
        ),  # fmt: skip
        (
            lambda a: [
                x if x[0] != "b" else encode_arrays({"b": torch.zeros(256)}, torch.float32)[0]
                for x in a
            ],
            "dtype",
        ),  # fmt: skip
    ],
)
def test_a_malformed_update_is_refused_with_what_is_wrong(spoil, message):
    base, trained = _pair()
    with pytest.raises(ReplyError, match=message):
        decode_update(spoil(encode_update(base, trained, "bf16")), base, "bf16")


def test_an_int8_update_without_its_scales_is_refused():
    base, trained = _pair()
    arrays = [a for a in encode_update(base, trained, "int8") if a[0] != "w::scale"]
    with pytest.raises(ReplyError, match="row scales"):
        decode_update(arrays, base, "int8")
