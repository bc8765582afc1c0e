"""Aggregation math, outer Nesterov step, reply validation and the wire format."""

import math

import pytest
import torch

from pilot.control.aggregate import (
    OuterOptimizer,
    ReplyError,
    decode_state,
    encode_state,
    state_bytes,
    transfer_dtype,
    validate_state,
    weighted_average,
)


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 700_000, generator=g),
        "b": torch.randn(5, generator=g),
        "n": torch.tensor([seed], dtype=torch.int64),
    }


def test_weighted_average_matches_formula_across_blocks():
    states = [_state(i) for i in range(3)]
    weights = [100.0, 300.0, 600.0]
    avg = weighted_average(states, weights)
    for key in ("w", "b"):
        want = sum(w * s[key].double() for s, w in zip(states, weights, strict=True)) / 1000.0
        torch.testing.assert_close(avg[key].double(), want, rtol=0, atol=1e-6)
        assert avg[key].dtype == torch.float32
    assert avg["n"].item() == 0  # non-floating tensors come from the first state


def test_weighted_average_single_state_and_out_buffer():
    s = _state(7)
    out = {k: torch.full_like(v, 9.0) for k, v in s.items() if v.is_floating_point()}
    avg = weighted_average([s], [42.0], out=out)
    assert avg["w"].data_ptr() == out["w"].data_ptr()
    torch.testing.assert_close(avg["w"], s["w"])


def test_weighted_average_bf16_inputs_scaled_in_fp32():
    a = {"x": torch.full((10,), 1.0 + 2**-7, dtype=torch.bfloat16)}
    avg = weighted_average([a, a], [1.0, 2.0])
    assert avg["x"].dtype == torch.float32
    torch.testing.assert_close(avg["x"], torch.full((10,), 1.0 + 2**-7))


@pytest.mark.parametrize("weights", [[0.0, 0.0], [1.0, -1.0], [math.nan, 1.0], [1.0]])
def test_weighted_average_rejects_bad_weights(weights):
    with pytest.raises(ValueError):
        weighted_average([_state(0), _state(1)], weights)


def test_outer_none_is_fedavg():
    g, avg = _state(0), _state(1)
    new = OuterOptimizer("none").step(g, {k: v.clone() for k, v in avg.items()})
    torch.testing.assert_close(new["w"], avg["w"])


def test_outer_nesterov_matches_torch_sgd_and_roundtrips_momentum():
    lr, mu = 0.7, 0.9
    g = {"w": torch.randn(4, 4), "n": torch.tensor([3])}
    outer = OuterOptimizer("nesterov", lr=lr, momentum=mu)
    # reference: torch SGD(nesterov) on a parameter whose gradient is global - average
    p = torch.nn.Parameter(g["w"].clone())
    sgd = torch.optim.SGD([p], lr=lr, momentum=mu, nesterov=True)
    state = g
    for r in range(3):
        avg = {"w": state["w"] - 0.1 * (r + 1) * torch.ones(4, 4), "n": torch.tensor([3])}
        p.grad = (state["w"] - avg["w"]).clone()
        sgd.step()
        state = outer.step(state, avg)
        torch.testing.assert_close(state["w"], p.detach(), rtol=1e-6, atol=1e-6)
        if r == 1:  # checkpoint/resume of the momentum mid-way
            saved = outer.state_dict()
            outer = OuterOptimizer("nesterov", lr=lr, momentum=mu)
            outer.load_state_dict(saved)
    with pytest.raises(ValueError, match="outer optimizer"):
        OuterOptimizer("none").load_state_dict(outer.state_dict())


def test_outer_nesterov_lr1_mu0_equals_fedavg():
    g, avg = _state(2), _state(3)
    new = OuterOptimizer("nesterov", lr=1.0, momentum=0.0).step(
        g, {k: v.clone() for k, v in avg.items()}
    )
    torch.testing.assert_close(new["w"], avg["w"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_wire_roundtrip_and_bytes(dtype):
    dt = transfer_dtype(dtype)
    s = _state(4)
    rec = encode_state(s, dt)
    back = decode_state(rec)
    assert back["w"].dtype == dt and back["n"].dtype == torch.int64
    torch.testing.assert_close(
        back["w"].float(), s["w"], rtol=1e-2 if dtype == "bf16" else 0, atol=0
    )
    assert rec.count_bytes() >= state_bytes(s, dt)
    assert state_bytes(s, torch.bfloat16) * 2 - 8 == state_bytes(s, torch.float32)
    validate_state(back, s, dt)


def test_decode_rejects_truncated_and_foreign_arrays():
    from flwr.app import Array, ArrayRecord

    rec = encode_state({"w": torch.ones(4)}, torch.float32)
    bad = ArrayRecord(
        {"w": Array(dtype="float32", shape=(4,), stype="torch.raw", data=rec["w"].data[:-4])}
    )
    with pytest.raises(ReplyError, match="bytes"):
        decode_state(bad)
    with pytest.raises(ReplyError, match="serialisation"):
        decode_state(ArrayRecord({"w": Array(torch.ones(4).numpy())}))
    with pytest.raises(ReplyError, match="dtype"):
        decode_state(
            ArrayRecord({"w": Array(dtype="evil", shape=(4,), stype="torch.raw", data=b"\0" * 16)})
        )


def test_validate_state_rejects_bad_replies():
    ref = _state(5)
    good = {k: v.clone() for k, v in ref.items()}
    validate_state(good, ref, torch.float32)
    with pytest.raises(ReplyError, match="missing"):
        validate_state({k: v for k, v in good.items() if k != "b"}, ref, torch.float32)
    with pytest.raises(ReplyError, match="unexpected"):
        validate_state({**good, "z": torch.ones(1)}, ref, torch.float32)
    with pytest.raises(ReplyError, match="shape"):
        validate_state({**good, "b": torch.ones(6)}, ref, torch.float32)
    with pytest.raises(ReplyError, match="dtype"):
        validate_state({**good, "b": good["b"].double()}, ref, torch.float32)
    with pytest.raises(ReplyError, match="dtype"):
        validate_state(good, ref, torch.bfloat16)
    for poison in (math.nan, math.inf):
        w = good["w"].clone()
        w[2, 123_456] = poison
        with pytest.raises(ReplyError, match="NaN or Inf"):
            validate_state({**good, "w": w}, ref, torch.float32)


def test_transfer_dtype_names():
    assert transfer_dtype("fp32") is torch.float32
    assert transfer_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="transfer_dtype"):
        transfer_dtype("fp8")
