"""Validation bits-per-byte of a base_train checkpoint.

python -m scripts.base_loss --checkpoint runs/NAME [--data-dir DIR --tokenizer-dir DIR]
"""

from __future__ import annotations

import argparse
import sys

import torch

from nanochat import checkpoint
from nanochat.common import device_setup, device_teardown, print0
from nanochat.dataloader import DataLoader
from nanochat.dataset import DatasetError
from nanochat.gpt import GPT, GPTConfig
from nanochat.paths import resolve
from nanochat.tokenizer import Tokenizer, TokenizerError
from nanochat.train import evaluate_bpb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--checkpoint", default="runs/baseline", help="checkpoint file or run dir (newest is used)"
    )
    p.add_argument("--data-dir", default="data")
    p.add_argument("--tokenizer-dir", default="tokenizer")
    p.add_argument("--split", choices=["val", "train"], default="val")
    p.add_argument("--eval-tokens", type=int, default=2**17)
    p.add_argument("--device-batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    device, autocast_ctx, rank, world = device_setup(args.device, args.threads)
    try:
        model_state, _, meta = checkpoint.load(resolve(args.checkpoint), map_location=device)
        model = GPT(GPTConfig(**meta["model_config"])).to(device)
        model.init_weights()  # rotary buffers; weights come from the checkpoint next
        model.load_state_dict(model_state)
        tok = Tokenizer.load(resolve(args.tokenizer_dir))
        if tok.vocab_size != model.config.vocab_size:
            raise TokenizerError(
                f"tokenizer has {tok.vocab_size} tokens, the model {model.config.vocab_size}"
            )
        B, T = args.device_batch_size, model.config.sequence_len
        loader = DataLoader(
            tok,
            resolve(args.data_dir),
            B,
            T,
            rank=rank,
            world=world,
            split=args.split,
            device=device,
        )
        steps = max(1, args.eval_tokens // (B * T * world))
        with torch.no_grad():
            bpb = evaluate_bpb(model, loader, tok.token_bytes(), steps, autocast_ctx)
    except (DatasetError, TokenizerError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        device_teardown()
    print0(
        f"checkpoint step {meta['step']} ({resolve(args.checkpoint)}): {args.split} bpb {bpb:.4f} over {steps * B * T * world:,} tokens"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
