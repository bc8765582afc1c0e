"""Muon + AdamW: orthogonalisation, exact state round-trip, distributed averaging."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.common import device_teardown, exit_rank
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import Muon, zeropower_via_newtonschulz5
from pilot.infra.procs import free_port

torch.set_num_threads(1)


def test_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    # rectangular: a random square matrix has near-zero singular values that 5 steps cannot lift
    for shape in [(32, 128), (128, 32), (64, 256)]:
        G = torch.randn(shape)
        X = zeropower_via_newtonschulz5(G)
        assert X.shape == G.shape
        s = torch.linalg.svdvals(X)
        assert s.min() > 0.5 and s.max() < 1.3  # quintic NS lands in ~[0.7, 1.2], not exactly 1


def make(seed=0):
    torch.manual_seed(seed)
    model = GPT(
        GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    )
    model.init_weights()
    return model


def train_steps(model, optimizers, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.randint(0, 64, (4, 16), generator=g)
        model(idx, idx.roll(-1, 1)).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)


def test_state_dict_round_trip_is_exact():
    model = make()
    opts = model.setup_optimizers(weight_decay=0.1)
    train_steps(model, opts, 3, seed=1)
    states = [copy.deepcopy(o.state_dict()) for o in opts]

    clone = make(seed=123)  # different init: everything must come from the saved states
    clone.load_state_dict(model.state_dict())
    clone_opts = clone.setup_optimizers(weight_decay=0.1)
    for opt, state in zip(clone_opts, states, strict=True):
        opt.load_state_dict(state)
    muon_state = clone_opts[1].state_dict()["state"]
    assert muon_state and all("momentum_buffer" in s for s in muon_state.values())

    train_steps(model, opts, 2, seed=2)
    train_steps(clone, clone_opts, 2, seed=2)
    for (name, a), b in zip(model.state_dict().items(), clone.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def _dist_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = make()
    opts = model.setup_optimizers()
    torch.manual_seed(100 + rank)  # every rank sees different data, hence different grads
    idx = torch.randint(0, 64, (4, 16))
    model(idx, idx.roll(-1, 1)).backward()
    for opt in opts:
        opt.step()
    if rank == 0:
        torch.save(model.state_dict(), out)
    device_teardown()
    exit_rank()


def test_distributed_step_equals_step_on_mean_gradient(tmp_path):
    """Two gloo ranks (Muon's orthogonalisation sharded across them) take the same step as
    one process whose gradient is the mean of the two ranks' gradients."""
    out = tmp_path / "rank0.pt"
    mp.spawn(_dist_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)

    model = make()
    opts = model.setup_optimizers()
    grads = []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        idx = torch.randint(0, 64, (4, 16))
        model(idx, idx.roll(-1, 1)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    for p, g0, g1 in zip(model.parameters(), *grads, strict=True):
        p.grad = (g0 + g1) / 2
    for opt in opts:
        opt.step()
    dist_state = torch.load(out, weights_only=True)
    for name, p in model.state_dict().items():
        assert torch.allclose(p, dist_state[name], atol=1e-6), name
