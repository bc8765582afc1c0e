"""The nanochat GPT.

- rotary position embeddings (no learned positions)
- QK-norm: queries and keys are RMS-normalised after rotary
- weightless RMSNorm everywhere (F.rms_norm, no gain parameters)
- ReLU^2 MLP, no biases anywhere
- untied token embedding (wte) and unembedding (lm_head)
- logits soft-capped with tanh at 15
- multi-query / grouped-query attention when n_kv_head < n_head
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.optim import AdamW, Muon

HEAD_DIM = 128  # from_depth keeps heads 128 wide and grows their number with width
LOGIT_SOFTCAP = 15.0


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 20
    n_head: int = 10  # query heads
    n_kv_head: int = 10  # key/value heads (GQA when fewer than n_head)
    n_embd: int = 1280

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int = 65536, sequence_len: int = 2048) -> GPTConfig:
        """nanochat's single knob: width = 64 * depth ("aspect ratio" 64), 128-wide heads."""
        n_embd = 64 * depth
        n_head = max(1, math.ceil(n_embd / HEAD_DIM))
        return cls(
            sequence_len=sequence_len,
            vocab_size=vocab_size,
            n_layer=depth,
            n_head=n_head,
            n_kv_head=n_head,
            n_embd=n_embd,
        )

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError("head_dim must be even for rotary embeddings")


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head's channels; x is (B, T, H, D)."""
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], 3).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm keeps attention logits bounded
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.n_head != self.n_kv_head
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(norm(x), cos_sin)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "h": nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables are buffers (not parameters, not saved); 10x headroom over the
        # training length so evaluation at longer contexts needs no recompute.
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._rotary_tables(self.rotary_seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(
        self, seq_len: int, base: float = 10000.0, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        head_dim = self.config.n_embd // self.config.n_head
        channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel_range / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]  # (1, T, 1, D/2)

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's init: unit-normal embeddings, a near-zero lm_head (uniform initial
        predictions), uniform matrices with the std of 1/sqrt(n_embd), and zeroed output
        projections so every block starts as the identity on the residual stream."""
        cfg = self.config
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        s = 3**0.5 * cfg.n_embd**-0.5  # uniform(-s, s) has std n_embd^-0.5
        for block in self.transformer.h:
            for w in (block.attn.c_q.weight, block.attn.c_k.weight, block.attn.c_v.weight):
                nn.init.uniform_(w, -s, s)
            nn.init.uniform_(block.mlp.c_fc.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self.init_buffers()

    def init_buffers(self) -> None:
        """The rotary tables, on the weights' device: to_empty() after a meta-device build
        leaves buffers uninitialised, and they are not in the state_dict to load."""
        device = self.transformer.wte.weight.device
        self.cos, self.sin = self._rotary_tables(self.rotary_seq_len, device=device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 per weight (fwd + bwd) for every matrix except the
        embedding lookup, plus the attention score/value matmuls at full sequence length."""
        cfg = self.config
        nparams_matmul = self.num_params() - self.transformer.wte.weight.numel()
        head_dim = cfg.n_embd // cfg.n_head
        return 6 * nparams_matmul + 12 * cfg.n_layer * cfg.n_head * head_dim * cfg.sequence_len

    def setup_optimizers(
        self,
        unembedding_lr: float = 0.004,
        embedding_lr: float = 0.2,
        matrix_lr: float = 0.02,
        weight_decay: float = 0.0,
    ) -> list[torch.optim.Optimizer]:
        """[AdamW(lm_head, wte), Muon(all transformer matrices)].

        The AdamW learning rates were tuned at width 768 and scale as 1/sqrt(width). Each
        group records its initial_lr so schedules can multiply it by the global step's factor.
        """
        dmodel_lr_scale = (self.config.n_embd / 768) ** -0.5
        adamw = AdamW(
            [
                {"params": list(self.lm_head.parameters()), "lr": unembedding_lr * dmodel_lr_scale},
                {
                    "params": list(self.transformer.wte.parameters()),
                    "lr": embedding_lr * dmodel_lr_scale,
                },
            ],
            betas=(0.8, 0.95),
            eps=1e-10,
            weight_decay=0.0,  # no decay on embeddings, as nanochat
        )
        muon = Muon(
            list(self.transformer.h.parameters()),
            lr=matrix_lr,
            momentum=0.95,
            weight_decay=weight_decay,
        )
        optimizers: list[torch.optim.Optimizer] = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
                group["initial_weight_decay"] = group["weight_decay"]
        return optimizers

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_reduction: str = "mean",
    ) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, V), or the cross-entropy loss when targets
        are given (targets == -1 are ignored; loss_reduction="none" gives (B, T) losses)."""
        B, T = idx.size()
        if T > self.rotary_seq_len:
            raise ValueError(
                f"sequence of {T} tokens exceeds the rotary table ({self.rotary_seq_len})"
            )
        cos_sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos_sin)
        x = norm(x)
        logits = self.lm_head(x)
        logits = LOGIT_SOFTCAP * torch.tanh(logits.float() / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)),
            targets.reshape(-1),
            ignore_index=-1,
            reduction=loss_reduction,
        )
        return loss.view(B, T) if loss_reduction == "none" else loss
