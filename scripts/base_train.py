"""Pretraining baseline: the nanochat training loop on one machine, one or more processes.

    python -m scripts.base_train --depth 4 --data-dir DIR --tokenizer-dir DIR --run NAME
    torchrun --standalone --nproc_per_node=2 -m scripts.base_train -- --depth 4 ...   (gloo on CPU)

Evaluates validation bits-per-byte every --eval-every steps, checkpoints every --save-every
steps to runs/NAME, and --resume continues from the newest checkpoint with the same next
batch (the loader cursor of every rank is in the checkpoint).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields

import torch

from nanochat import checkpoint
from nanochat.common import device_setup, device_teardown, print0
from nanochat.dataloader import DataLoader
from nanochat.dataset import DatasetError
from nanochat.paths import resolve
from nanochat.tokenizer import Tokenizer, TokenizerError
from nanochat.train import TrainConfig, build_model, run, val_bpb


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:  # `torchrun ... -m scripts.base_train -- --depth 4` passes the "--" on
        argv = argv[1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="baseline", help="run name: checkpoints go to runs/NAME")
    p.add_argument("--run-dir", default=None, help="explicit checkpoint dir (overrides --run)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--tokenizer-dir", default="tokenizer")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name == "vocab_size":  # always the tokenizer's
            continue
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(getattr(defaults, f.name)),
            default=getattr(defaults, f.name),
        )
    p.add_argument(
        "--save-every", type=int, default=100, help="checkpoint interval in steps (and at the end)"
    )
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many steps of this invocation"
    )
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument(
        "--loop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start another epoch when the data ends",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint of the run"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, autocast_ctx, rank, world = device_setup(args.device, args.threads)
    try:
        return train(args, device, autocast_ctx, rank, world)
    except (DatasetError, TokenizerError, ValueError) as e:
        print(f"error (rank {rank}): {e}", file=sys.stderr)
        return 2
    finally:
        device_teardown()


def train(args, device, autocast_ctx, rank: int, world: int) -> int:
    data_dir, run_dir = resolve(args.data_dir), resolve(args.run_dir or f"runs/{args.run}")
    tok = Tokenizer.load(resolve(args.tokenizer_dir))
    cfg = TrainConfig(
        **{f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "vocab_size"},
        vocab_size=tok.vocab_size,
    )
    grad_accum = cfg.grad_accum_steps(world)
    model, optimizers = build_model(cfg, device)

    step, cursor, history = 0, None, []
    if args.resume:
        found = checkpoint.latest(run_dir)
        if found is None:
            raise ValueError(f"--resume: no checkpoint in {run_dir}")
        model_state, optim_states, meta = checkpoint.load(found, map_location=device)
        if meta["train_config"] != cfg.to_dict():
            changed = {k for k, v in cfg.to_dict().items() if meta["train_config"].get(k) != v}
            print0(f"warning: resuming with changed settings {sorted(changed)}")
        if len(meta["cursor"]) != world:
            raise ValueError(
                f"{found} was written by {len(meta['cursor'])} processes; resume with as many"
            )
        model.load_state_dict(model_state)
        for opt, state in zip(optimizers, optim_states, strict=True):
            opt.load_state_dict(state)
        checkpoint.set_rng_state(meta["rng"])
        step, cursor, history = meta["step"], meta["cursor"], meta["history"]
        print0(f"resumed {found} at step {step}, next batch from {cursor[rank]} (rank {rank})")

    print0(
        f"model d{cfg.depth}: {model.num_params():,} params, {model.estimate_flops():.3g} FLOPs/token | "
        f"vocab {cfg.vocab_size}, T={cfg.sequence_len}, B={cfg.device_batch_size} x {world} procs x "
        f"{grad_accum} accum = {cfg.total_batch_size:,} tokens/step | {cfg.num_iterations} steps | "
        f"device {device}, {torch.get_num_threads()} threads/proc"
    )

    def make_loader(**kw) -> DataLoader:
        return DataLoader(
            tok, data_dir, cfg.device_batch_size, cfg.sequence_len, rank=rank, world=world,
            device=device, packing=cfg.packing, **kw,
        )  # fmt: skip

    loader = make_loader(cursor=cursor, loop=args.loop)

    def validate(step: int) -> float:
        # the same measurement as the ServerApp's per-round validation (pilot/control/validation.py)
        bpb = val_bpb(model, tok, data_dir, cfg, rank=rank, world=world, autocast_ctx=autocast_ctx)
        print0(f"step {step:5d} | val bpb {bpb:.4f}")
        return bpb

    def log(s: int, loss: float, tok_s: float, lrm: float) -> None:
        if s % args.log_every == 0 or s == cfg.num_iterations:
            print0(
                f"step {s:5d}/{cfg.num_iterations} | loss {loss:.4f} | lrm {lrm:.3f} | {tok_s:,.0f} tok/s | {time.time() - t0:.0f}s"
            )

    t0 = time.time()
    end = (
        cfg.num_iterations
        if args.max_steps is None
        else min(cfg.num_iterations, step + args.max_steps)
    )
    if step == 0:
        history.append({"step": 0, "val_bpb": validate(0)})
    losses, tokens, stopped_by = [], 0, "steps"
    while step < end:
        boundary = min(
            end,
            (step // cfg.eval_every + 1) * cfg.eval_every,
            (step // args.save_every + 1) * args.save_every,
        )
        result = run(
            model,
            optimizers,
            loader,
            cfg,
            start_step=step,
            max_steps=boundary - step,
            on_step=log,
            autocast_ctx=autocast_ctx,
        )
        step, stopped_by = result.end_step, result.stopped_by
        losses += result.losses
        tokens += result.tokens
        done = stopped_by != "steps" or step >= end
        if step % cfg.eval_every == 0 or done:
            history.append(
                {
                    "step": step,
                    "val_bpb": validate(step),
                    "train_loss": result.losses[-1] if result.losses else None,
                }
            )
        if (step % args.save_every == 0 or done) and rank == 0:
            meta = {
                "step": step,
                "cursor": result.cursor,
                "train_config": cfg.to_dict(),
                "model_config": vars(model.config),
                "history": history,
                "rng": checkpoint.rng_state(),
            }
            path = checkpoint.save(
                run_dir,
                model.state_dict(),
                [o.state_dict() for o in optimizers],
                meta,
                keep=args.keep,
            )
            print0(f"step {step:5d} | checkpoint {path}")
        if done:
            break

    elapsed = time.time() - t0
    print0("\n=== summary ===")
    print0(
        f"steps {len(losses)} this run (global step {step}/{cfg.num_iterations}), stopped by {stopped_by}"
    )
    print0(f"tokens {tokens:,} in {elapsed:.0f}s = {tokens / max(elapsed, 1e-9):,.0f} tok/s")
    if losses:
        print0(f"train loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        stats = result.stats  # the loader's running totals, summed over ranks
        cropped = stats["cropped_tokens"] / max(1, stats["cropped_tokens"] + stats["tokens"])
        print0(
            f"data: {stats['docs']:,} documents read, {cropped:.0%} of their tokens cropped by BOS-aligned packing"
        )
    print0("val bpb: " + ", ".join(f"{h['step']}: {h['val_bpb']:.4f}" for h in history))
    print0(f"checkpoints in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
