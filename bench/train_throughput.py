"""Training throughput (tokens/s) of our step vs a plain PyTorch reference, on CPU.

Ours: nanochat.gpt.GPT (SDPA attention, F.rms_norm) + Muon/AdamW, driven by nanochat.train.run.
Reference: the same model math written naively in this file (explicit attention matrix with
a mask, hand-written RMSNorm and rotary), plain torch.optim.AdamW, a bare Python loop.

    python bench/train_throughput.py [--depth 2 --seq-len 256 --batch 8 --steps 5 --repeats 3 --threads 1]

The last line is key=value pairs: ours_tok_s=... ref_tok_s=... ratio=...
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn

from nanochat.gpt import GPTConfig
from nanochat.train import TrainConfig, build_model, run


class NaiveGPT(nn.Module):
    """Same architecture as nanochat.gpt.GPT, written the obvious way."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        d, h = cfg.n_embd, cfg.n_head
        self.wte = nn.Embedding(cfg.vocab_size, d)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    name: nn.Linear(i, o, bias=False)
                    for name, i, o in [
                        ("q", d, d),
                        ("k", d, d),
                        ("v", d, d),
                        ("proj", d, d),
                        ("fc", d, 4 * d),
                        ("out", 4 * d, d),
                    ]
                }
            )
            for _ in range(cfg.n_layer)
        )
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        hd = d // h
        inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        freqs = torch.outer(torch.arange(cfg.sequence_len).float(), inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    @staticmethod
    def rmsnorm(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)

    def rotary(self, x):  # x (B, H, T, D)
        T, half = x.size(2), x.size(3) // 2
        cos, sin = self.cos[:T], self.sin[:T]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], -1)

    def forward(self, idx, targets):
        B, T = idx.shape
        H = self.cfg.n_head
        x = self.rmsnorm(self.wte(idx))
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        for layer in self.layers:
            h = self.rmsnorm(x)
            q, k, v = (layer[n](h).view(B, T, H, -1).transpose(1, 2) for n in ("q", "k", "v"))
            q, k = self.rmsnorm(self.rotary(q)), self.rmsnorm(self.rotary(k))
            att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
            att = att.masked_fill(mask, float("-inf")).softmax(-1)
            x = x + layer["proj"]((att @ v).transpose(1, 2).reshape(B, T, -1))
            x = x + layer["out"](torch.relu(layer["fc"](self.rmsnorm(x))) ** 2)
        logits = 15 * torch.tanh(self.lm_head(self.rmsnorm(x)) / 15)
        return nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def batches(vocab: int, B: int, T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randint(0, vocab, (B, T + 1), generator=g)
        yield x[:, :-1], x[:, 1:]


def bench_ours(cfg: TrainConfig, steps: int, warmup: int) -> float:
    model, opts = build_model(cfg)
    data = batches(cfg.vocab_size, cfg.device_batch_size, cfg.sequence_len)
    run(model, opts, data, cfg, max_steps=warmup)
    result = run(model, opts, data, cfg, start_step=warmup, max_steps=steps)
    return result.tokens / (result.ended_at - result.started_at)


def bench_reference(cfg: TrainConfig, steps: int, warmup: int) -> float:
    torch.manual_seed(cfg.seed)
    model = NaiveGPT(GPTConfig.from_depth(cfg.depth, cfg.vocab_size, cfg.sequence_len))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = batches(cfg.vocab_size, cfg.device_batch_size, cfg.sequence_len)
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.time()
        x, y = next(data)
        model(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * cfg.device_batch_size * cfg.sequence_len / (time.time() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--repeats", type=int, default=3, help="rounds, alternating ours and reference")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        depth=args.depth,
        vocab_size=args.vocab_size,
        sequence_len=args.seq_len,
        device_batch_size=args.batch,
        total_batch_size=args.batch * args.seq_len,
        num_iterations=args.warmup + args.steps,
    )
    # Alternate the two and keep each one's best round: on a shared machine, the least
    # disturbed round is the closest to the code's own speed.
    ref = ours = 0.0
    for _ in range(args.repeats):
        ref = max(ref, bench_reference(cfg, args.steps, args.warmup))
        ours = max(ours, bench_ours(cfg, args.steps, args.warmup))
    print(
        f"config: depth {args.depth}, vocab {args.vocab_size}, B={args.batch}, T={args.seq_len}, {args.threads} thread(s)"
    )
    print(f"ours (SDPA + Muon/AdamW, nanochat.train.run): {ours:,.0f} tok/s")
    print(f"reference (naive attention + AdamW, plain loop): {ref:,.0f} tok/s")
    print(
        f"ours_tok_s={ours:.0f} ref_tok_s={ref:.0f} ratio={ours / ref:.3f} threads={args.threads}"
    )


if __name__ == "__main__":
    main()
