"""nanochat GPT: sizes, shapes, init, causality, GQA."""

import math

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig

torch.set_num_threads(1)


def test_d20_parameter_count_on_meta_device():
    cfg = GPTConfig.from_depth(20)
    assert (cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.n_layer) == (1280, 10, 10, 20)
    with torch.device("meta"):
        model = GPT(cfg)
    # 2 * vocab * width (wte + lm_head) + 12 * width^2 per layer (q,k,v,proj = 4, MLP = 8)
    assert model.num_params() == 2 * 65536 * 1280 + 20 * 12 * 1280**2 == 560_988_160
    assert model.estimate_flops() > 6 * (560_988_160 - 65536 * 1280)


@pytest.mark.parametrize("depth,width,heads", [(2, 128, 1), (4, 256, 2), (3, 192, 2), (12, 768, 6)])
def test_from_depth(depth, width, heads):
    cfg = GPTConfig.from_depth(depth, vocab_size=1000, sequence_len=64)
    assert (cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.vocab_size) == (width, heads, depth, 1000)


def small_model(**kw):
    torch.manual_seed(0)
    cfg = GPTConfig(
        **{
            "sequence_len": 32,
            "vocab_size": 97,
            "n_layer": 2,
            "n_head": 4,
            "n_kv_head": 4,
            "n_embd": 64,
            **kw,
        }
    )
    model = GPT(cfg)
    model.init_weights()
    return model


def test_forward_shapes_and_initial_loss():
    model = small_model()
    idx = torch.randint(0, 97, (3, 32))
    logits = model(idx)
    assert logits.shape == (3, 32, 97) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0  # soft-cap
    loss = model(idx, idx)
    assert abs(loss.item() - math.log(97)) < 0.05  # tiny lm_head init: near-uniform predictions
    per_token = model(idx, idx, loss_reduction="none")
    assert per_token.shape == (3, 32)
    assert torch.allclose(per_token.mean(), loss, atol=1e-5)
    ignored = idx.clone()
    ignored[:, :16] = -1
    assert torch.isfinite(model(idx, ignored))


def test_init_blocks_start_as_identity_and_no_biases():
    model = small_model()
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().sum() == 0
        assert block.mlp.c_proj.weight.abs().sum() == 0
    assert model.lm_head.weight.std() < 0.01
    assert all(p.ndim == 2 for p in model.parameters())  # weightless norms, no biases


def test_attention_is_causal():
    model = small_model()
    for block in model.transformer.h:  # make blocks non-trivial
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.02)
    a = torch.randint(0, 97, (1, 32))
    b = a.clone()
    b[0, 20:] = (b[0, 20:] + 1) % 97
    la, lb = model(a), model(b)
    assert torch.allclose(la[0, :20], lb[0, :20], atol=1e-5)
    assert not torch.allclose(la[0, 20:], lb[0, 20:])


def test_grouped_query_attention():
    model = small_model(n_head=4, n_kv_head=2)
    assert model.transformer.h[0].attn.c_k.weight.shape == (32, 64)
    idx = torch.randint(0, 97, (2, 16))
    assert model(idx).shape == (2, 16, 97)


def test_bad_config_rejected():
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3, n_embd=64)


def test_optimizer_groups_and_lr_scaling():
    model = small_model()
    adamw, muon = model.setup_optimizers(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02)
    scale = (64 / 768) ** -0.5
    assert [g["lr"] for g in adamw.param_groups] == pytest.approx([0.004 * scale, 0.2 * scale])
    n_adam = sum(p.numel() for g in adamw.param_groups for p in g["params"])
    n_muon = sum(p.numel() for g in muon.param_groups for p in g["params"])
    assert n_adam + n_muon == model.num_params()
    assert all(g["initial_lr"] == g["lr"] for g in muon.param_groups)
