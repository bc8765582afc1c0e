"""Parity benchmark: the validation bpb of curtailment-aware training against centralized
training at equal tokens (pilot/analysis/parity.py has the three ways; this is its CLI).

    python bench/parity.py [--trace F] [--sites F] [--outer none|nesterov] [--round-s S]
        [--join-rule stale|close|both] [--data sites|stream] [--steps N] [--seed N]

(a) centralized (nanochat.train's loop), (b) curtailment-aware across the sites of the trace
(the policy's schedule from pilot.analysis.simulate, the ServerApp's round rules, the real averaging
and outer step), (c) continuous federated across all sites at (b)'s per-site speed. The same
model config, data and token count for all; default: a d2 model on the offline demo corpus
and its 8192-token tokenizer under $CURTAIL_HOME (built on first use), ~6 min on 2 CPU cores.
Prints each final bpb and the ratios to (a), writes a loss-vs-tokens plot, and ends with
    bpb_central=.. bpb_curtailed=.. bpb_federated=.. ratio_curtailed=.. ratio_federated=..
and, with ``--updates fp32 bf16 int8``, (b) again with each site update dtype (the live wire
format, int8 with error feedback): ``bpb_update_<d>=.. ratio_update_<d>=..`` (to fp32's).
(b) there is the live join rule's (--join-rule both also runs the other one and prints it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanochat.dataloader import PACKINGS  # noqa: E402
from nanochat.paths import curtail_home  # noqa: E402
from nanochat.tokenizer import Tokenizer  # noqa: E402
from nanochat.train import TrainConfig  # noqa: E402
from pilot.analysis import parity, schedule  # noqa: E402

LIVE_JOIN_RULE = "stale"  # pilot/flower/loop.py: a joiner starts from the round's opening model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", default=None, help="trace file (default: the sites file's)")
    p.add_argument("--sites", default=str(REPO / "configs" / "cpu-demo-sites.toml"))
    p.add_argument("--policy", default=None, help="prototype | forecast | oracle")
    p.add_argument("--start", default=None, help="ISO time (default: the trace's start)")
    p.add_argument("--hours", type=float, default=None, help="span (default: to the trace end)")
    p.add_argument("--outer", choices=["none", "nesterov"], default="none")
    p.add_argument("--outer-lr", type=float, default=None, help="default 1.0 none, 0.7 nesterov")
    p.add_argument("--outer-momentum", type=float, default=0.9)
    p.add_argument("--round-s", type=float, default=3600.0, help="FEDERATED round (sim s)")
    p.add_argument("--local-round-s", type=float, default=None, help="LOCAL (3x --round-s)")
    p.add_argument("--join-min-s", type=float, default=360.0)
    p.add_argument("--join-rule", choices=[*schedule.JOIN_RULES, "both"], default="both")
    # stream (default): every way reads the same batches in the same order, so the ratios
    # measure curtailment and averaging alone; sites: each site its own chunks, as live
    p.add_argument("--data", choices=parity.DATA_ORDERS, default="stream")
    p.add_argument("--steps", type=int, default=300, help="central steps = the token budget")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--packing", choices=PACKINGS, default=TrainConfig.packing)
    p.add_argument("--batch", type=int, default=4, help="device batch size (rows)")
    p.add_argument("--total-batch", type=int, default=512, help="tokens per step")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--evals", type=int, default=6, help="validation points per curve")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None, help="default: $CURTAIL_HOME/data/demo")
    p.add_argument("--tokenizer-dir", default=None, help="default: $CURTAIL_HOME/tokenizer/demo")
    p.add_argument("--plot", default="parity.png")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument(
        "--updates", nargs="*", default=[], choices=["fp32", "bf16", "int8"],
        help="also run (b) with each site update dtype and print its bpb against fp32's",
    )  # fmt: skip
    return p.parse_args(argv)


def prepared(args: argparse.Namespace) -> tuple[Path, Path]:
    """The data and tokenizer dirs; the demo corpus and tokenizer are built on first use."""
    if args.data_dir and args.tokenizer_dir:
        return Path(args.data_dir), Path(args.tokenizer_dir)
    from pilot.launch.cli import load_preset, prepare_data

    launch = load_preset("cpu-demo")[1]["launch"]
    prepare_data(launch, allowed=True, say=print)
    home = curtail_home()
    return (
        Path(args.data_dir or home / launch["data_dir"]),
        Path(args.tokenizer_dir or home / launch["tokenizer_dir"]),
    )


def plans(args: argparse.Namespace) -> dict[str, list]:
    """{"curtailed/<rule>": rounds, "federated": rounds}, step counts filled in."""
    from pilot.analysis.simulate import run
    from pilot.config.sites import load_sites
    from pilot.energy.traces import load_trace, parse_time

    sites = load_sites(args.sites)
    trace = load_trace(args.trace or sites.trace)
    start = parse_time(args.start) if args.start else float(trace.start)
    end = start + args.hours * 3600 if args.hours else float(trace.end)
    spans = schedule.intervals(run(trace, sites, args.policy or sites.policy, start=start, end=end))
    kw = {
        "round_min_s": args.round_s,
        "round_max_s": args.local_round_s or 3 * args.round_s,
        "join_min_s": args.join_min_s,
    }
    rules = schedule.JOIN_RULES if args.join_rule == "both" else (args.join_rule,)
    out = {
        f"curtailed/{rule}": schedule.steps_for(
            schedule.plan_rounds(spans, join_rule=rule, **kw), args.steps
        )
        for rule in rules
    }
    # (c): every site, all the time, at (b)'s per-site step rate -> a span S times shorter
    seconds = sum(b - a for ivs in spans.values() for a, b in ivs)
    cont = schedule.continuous(sites.names, start, start + seconds / len(sites.names))
    out["federated"] = schedule.steps_for(schedule.plan_rounds(cont, **kw), args.steps)
    return out


def plot(path: Path, results: list[parity.Result]) -> None:
    """Validation bpb (top) and train loss (bottom) against tokens trained, every way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    for res in results:
        top.plot([t for t, _ in res.val], [b for _, b in res.val], "-o", ms=3, label=res.name)
        bottom.plot([t for t, _ in res.train], [x for _, x in res.train], lw=0.8, label=res.name)
    top.set_ylabel("val bits/byte (global model)")
    bottom.set_ylabel("train loss (central: per step;\nfederated: round mean)")
    bottom.set_xlabel("tokens trained")
    top.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    try:
        data_dir, tok_dir = prepared(args)
        rounds = plans(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = Tokenizer.load(tok_dir)
    cfg = TrainConfig(
        depth=args.depth, vocab_size=tok.vocab_size, sequence_len=args.seq_len,
        device_batch_size=args.batch, total_batch_size=args.total_batch,
        eval_tokens=args.eval_tokens, seed=args.seed, compile="off", packing=args.packing,
    )  # fmt: skip
    outer_lr = (
        args.outer_lr if args.outer_lr is not None else (0.7 if args.outer == "nesterov" else 1.0)
    )
    setup = parity.Setup(
        data_dir, tok, cfg, data=args.data, outer=args.outer, outer_lr=outer_lr,
        outer_momentum=args.outer_momentum, evals=args.evals,
    )  # fmt: skip
    parity.set_threads(args.threads)
    print(
        f"d{args.depth} T={args.seq_len} {args.total_batch} tokens/step x {args.steps} steps = "
        f"{args.steps * args.total_batch:,} tokens | outer {args.outer} (lr {outer_lr:g}) | "
        f"round {args.round_s:g} s | data {args.data} | packing {args.packing} | seed {args.seed}"
    )
    results = [parity.central(setup, args.steps)]
    results += [parity.federated(setup, r, name) for name, r in rounds.items()]
    live_name = (
        f"curtailed/{LIVE_JOIN_RULE}"
        if f"curtailed/{LIVE_JOIN_RULE}" in rounds
        else next(iter(rounds))
    )
    updates = {
        d: parity.federated(
            dataclasses.replace(setup, update_dtype=d), rounds[live_name], f"{live_name}/{d}"
        )
        for d in args.updates
    }
    results += list(updates.values())
    for res in results:
        report(res, results[0])
    plot(Path(args.plot), results)
    if args.json:
        Path(args.json).write_text(json.dumps([vars(r) for r in results], indent=1) + "\n")
    by = {r.name: r for r in results}
    live = by.get(f"curtailed/{LIVE_JOIN_RULE}") or results[1]
    a, b, c = results[0].bpb, live.bpb, by["federated"].bpb
    print(f"plot: {args.plot} | {time.time() - t0:.0f} s")
    print(
        f"bpb_central={a:.4f} bpb_curtailed={b:.4f} bpb_federated={c:.4f} "
        f"ratio_curtailed={b / a:.4f} ratio_federated={c / a:.4f}"
    )
    if updates:
        ref = updates.get("fp32", live).bpb
        print(
            " ".join(
                f"bpb_update_{d}={r.bpb:.4f} ratio_update_{d}={r.bpb / ref:.4f}"
                for d, r in updates.items()
            )
        )
    return 0


def report(res: parity.Result, central: parity.Result) -> None:
    print(
        f"{res.name:18s} val bpb {res.bpb:.4f} (x{res.bpb / central.bpb:.4f}) | "
        f"{res.tokens:,} tokens, {res.global_steps} global steps, {res.rounds} rounds | "
        f"cropped {res.cropped_share:.1%} of tokens read | {res.seconds:.0f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
