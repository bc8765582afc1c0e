"""The training loop: loss falls, exact resume through a checkpoint, stop reasons, bpb."""

import math
import time

import pytest
import torch

from nanochat import checkpoint
from nanochat.common import device_teardown, exit_rank
from nanochat.dataloader import DataLoader
from nanochat.dataset import chunk_table
from nanochat.tokenizer import Tokenizer
from nanochat.train import (
    TrainConfig,
    build_model,
    compiled,
    evaluate_bpb,
    lr_multiplier,
    muon_momentum,
    run,
    weight_decay_multiplier,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)


def config(**kw):
    base = dict(
        depth=2,
        vocab_size=1024,
        sequence_len=64,
        device_batch_size=8,
        total_batch_size=512,
        num_iterations=30,
    )
    return TrainConfig(**{**base, **kw})


def test_loss_falls_and_bpb_improves(tok, demo_data):
    cfg = config()
    model, opts = build_model(cfg)
    token_bytes = tok.token_bytes()
    bpb0 = evaluate_bpb(model, DataLoader(tok, demo_data, 8, 64, split="val"), token_bytes, steps=4)
    seen = []
    result = run(
        model,
        opts,
        DataLoader(tok, demo_data, 8, 64, loop=True),
        cfg,
        on_step=lambda *a: seen.append(a),
    )
    assert result.stopped_by == "steps" and result.steps == result.end_step == 30
    assert result.tokens == 30 * 512
    assert abs(result.losses[0] - math.log(1024)) < 0.1
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 1.5
    assert [s[0] for s in seen] == list(range(1, 31)) and seen[-1][2] > 0  # step, loss, tok/s, lr
    bpb1 = evaluate_bpb(model, DataLoader(tok, demo_data, 8, 64, split="val"), token_bytes, steps=4)
    assert bpb1 < bpb0 - 0.3


def test_resume_from_checkpoint_is_exact(tok, demo_data, tmp_path):
    cfg = config(num_iterations=6, total_batch_size=1024, warmdown_ratio=0.5, weight_decay=0.1)
    model, opts = build_model(cfg)
    straight = run(model, opts, DataLoader(tok, demo_data, 8, 64, loop=True), cfg)

    model, opts = build_model(cfg)
    first = run(model, opts, DataLoader(tok, demo_data, 8, 64, loop=True), cfg, max_steps=3)
    assert first.stopped_by == "steps" and first.end_step == 3
    checkpoint.save(
        tmp_path,
        model.state_dict(),
        [o.state_dict() for o in opts],
        {"step": first.end_step, "cursor": first.cursor, "rng": checkpoint.rng_state()},
    )

    model_state, optim_states, meta = checkpoint.load(tmp_path)
    model, opts = build_model(config(seed=7))
    model.load_state_dict(model_state)
    for opt, state in zip(opts, optim_states, strict=True):
        opt.load_state_dict(state)
    checkpoint.set_rng_state(meta["rng"])
    loader = DataLoader(tok, demo_data, 8, 64, cursor=meta["cursor"])
    second = run(model, opts, loader, cfg, start_step=meta["step"])
    assert second.start_step == 3 and second.end_step == 6
    assert first.losses + second.losses == pytest.approx(straight.losses, abs=1e-5)
    assert second.cursor == straight.cursor and second.consumed == straight.consumed


def test_stop_reasons(tok, demo_data):
    cfg = config()
    model, opts = build_model(cfg)
    assert (
        run(
            model, opts, DataLoader(tok, demo_data, 8, 64, loop=True), cfg, deadline=time.time()
        ).stopped_by
        == "deadline"
    )
    calls = iter([False, False, True])
    r = run(
        model,
        opts,
        DataLoader(tok, demo_data, 8, 64, loop=True),
        cfg,
        should_stop=lambda: next(calls),
    )
    assert (r.stopped_by, r.steps) == ("stop", 2)
    two_chunks = chunk_table(demo_data)[:2]
    r = run(model, opts, DataLoader(tok, demo_data, 8, 64, chunks=two_chunks), cfg, start_step=5)
    assert r.stopped_by == "data" and r.steps > 0 and r.start_step == 5
    assert list(r.consumed.values()) == [c.rows for c in two_chunks]


def test_schedules():
    cfg = TrainConfig(num_iterations=100, warmup_ratio=0.1, warmdown_ratio=0.2, final_lr_frac=0.1)
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(50, cfg) == 1.0
    assert lr_multiplier(90, cfg) == pytest.approx(0.5 + 0.5 * 0.1)
    assert lr_multiplier(100, cfg) == pytest.approx(0.1)
    assert muon_momentum(0, cfg) == pytest.approx(0.85) and muon_momentum(
        300, cfg
    ) == pytest.approx(0.95)
    assert weight_decay_multiplier(25, cfg) == 0.75
    with pytest.raises(ValueError, match="not a multiple"):
        TrainConfig(total_batch_size=1000).grad_accum_steps()
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_checkpoint_files(tmp_path):
    assert checkpoint.latest(tmp_path) is None
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, {"w": torch.full((2,), float(step))}, [], {"step": step}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000002.pt", "step_000000003.pt"]
    model_state, optim_states, meta = checkpoint.load(checkpoint.latest(tmp_path))
    assert meta["step"] == 3 and torch.equal(model_state["w"], torch.full((2,), 3.0))
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "empty")


def test_compiled_step_trains_like_eager_and_auto_stays_eager_on_cpu(tok, demo_data):
    """torch.compile (aot_eager: dynamo + AOTAutograd, no C++ build on this box) gives the same
    losses and weights as the eager step; "auto" compiles only on CUDA."""
    results = {}
    for backend in ("off", "aot_eager"):
        cfg = config(num_iterations=3, compile=backend)
        model, opts = build_model(cfg)
        res = run(model, opts, DataLoader(tok, demo_data, 8, 64), cfg)
        results[backend] = (res.losses, model.lm_head.weight.detach().clone())
    assert results["off"][0] == pytest.approx(results["aot_eager"][0], rel=1e-5)
    assert torch.allclose(results["off"][1], results["aot_eager"][1], atol=1e-5)
    model, _ = build_model(config())
    assert compiled(model, "auto") is model and compiled(model, "off") is model
    with pytest.raises(ValueError, match="compile='fast'.*inductor"):
        compiled(model, "fast")


def _ddp_worker(rank, world, port, data_dir, tokenizer_dir, out):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tok = Tokenizer.load(tokenizer_dir)
    cfg = config(device_batch_size=4)
    model, opts = build_model(cfg)
    loader = DataLoader(tok, data_dir, 4, 64, rank=rank, world=world, loop=True)
    calls = iter([False, False, True] if rank == 1 else [False] * 10)  # only rank 1 asks to stop
    result = run(model, opts, loader, cfg, should_stop=lambda: next(calls))
    if rank == 0:
        torch.save({"result": vars(result), "w": model.lm_head.weight.detach()}, out)
    else:
        torch.save({"w": model.lm_head.weight.detach()}, out + ".1")
    device_teardown()
    exit_rank()


def test_ddp_run_agrees_on_stop_and_gathers_state(demo_data, tokenizer_dir, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "r.pt")
    mp.spawn(
        _ddp_worker, args=(2, port, str(demo_data), str(tokenizer_dir), out), nprocs=2, join=True
    )
    r = torch.load(out, weights_only=False)
    result = r["result"]
    assert result["stopped_by"] == "stop" and result["steps"] == 2
    assert result["tokens"] == 2 * 512  # 2 ranks x 4 rows x 64 tokens per step
    assert len(result["cursor"]) == 2 and result["cursor"][0] != result["cursor"][1]
    keys = {f"{c.shard}:{c.row_group}" for c in chunk_table(demo_data)}
    assert set(result["consumed"]) == keys  # both ranks' chunks, merged
    assert torch.equal(r["w"], torch.load(out + ".1", weights_only=True)["w"])  # replicas agree
