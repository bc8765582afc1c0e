"""The command line of `curtail-llm`: its subcommands and the `up` options."""

from __future__ import annotations

import argparse
from typing import Any

# The `up` options sit on both the top-level parser and `up`, so `curtail-llm --x` and
# `curtail-llm up --x` both work; one not given leaves no attribute, and DEFAULTS fills it in.
_UNSET = argparse.SUPPRESS

# command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="curtail-llm",
        description="Run the curtailment-aware training stack locally, end to end.",
    )
    sub = p.add_subparsers(dest="command")
    up = sub.add_parser("up", help="bring the local stack up, run a preset, report (default)")
    for parser in (p, up):
        add_up_args(parser)
    prep = sub.add_parser("prepare", help="only build the preset's demo corpus and tokenizer")
    prep.add_argument("--preset", default=argparse.SUPPRESS, help="preset (default cpu-demo)")
    red = sub.add_parser(
        "redis",
        help="run an embedded Valkey (loopback, generated password) until Ctrl-C; its URL goes"
        " to $CURTAIL_HOME/redis.url",
    )
    red.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    red.add_argument(
        "--url",
        action="store_true",
        help="print the running one's URL, for export CURTAIL_REDIS_URL=$(curtail-llm redis --url)",
    )
    # listed for --help only: main() hands `export ...` to pilot.analysis.export's own parser
    sub.add_parser("export", help="write a run's model and tokenizer in nanochat's layout")
    args = p.parse_args(argv)
    args.command = args.command or "up"
    return args


def add_up_args(p: argparse.ArgumentParser) -> None:
    """The `up` options, none with a parser default (see _UNSET)."""
    _add_run_args(p)
    _add_stack_args(p)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """What runs: the preset, its sites and trace, and the simulated span."""
    d = _UNSET
    p.add_argument("--preset", default=d, help="preset name in configs/ (default cpu-demo)")
    p.add_argument(
        "--trace",
        nargs="+",
        default=d,
        metavar="FILE",
        help="MCI trace: one wide CSV, or WattTime CSVs (one per region, REGION=path or named"
        " after the region)",
    )
    p.add_argument("--sites", default=d, help="sites TOML (default: the preset's)")
    p.add_argument("--redis-url", default=d, help="use this Redis instead of an embedded one")
    p.add_argument("--speedup", type=float, default=d, help="simulated seconds per wall second")
    p.add_argument("--run-name", default=d, help="runs/<run-name>/ (default: preset-time)")
    p.add_argument("--steps", type=int, default=d, help="training steps (schedule length)")
    p.add_argument(
        "--start",
        default=d,
        help="simulated start, ISO time with offset (default: the trace start)",
    )
    p.add_argument(
        "--hours",
        type=float,
        default=d,
        help="simulate only this many hours of the trace (default: to its end)",
    )


def _add_stack_args(p: argparse.ArgumentParser) -> None:
    """How the stack runs: the SuperLink's port and security, overrides, output, time limit."""
    d = _UNSET
    p.add_argument("--port", type=int, default=d, help="SuperLink port (0: a free one)")
    p.add_argument(
        "--tls",
        action="store_true",
        default=d,
        help="serve the SuperLink over TLS (a private CA unless the preset names certificates)",
    )
    p.add_argument(
        "--supernode-auth",
        action="store_true",
        default=d,
        help="only registered SuperNodes may connect (implies --tls)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=d,
        metavar="KEY=VALUE",
        help="extra run-config override for the Flower app (repeatable)",
    )
    p.add_argument(
        "--no-prepare",
        action="store_true",
        default=d,
        help="fail instead of building a missing demo corpus/tokenizer",
    )
    p.add_argument(
        "--no-live",
        action="store_true",
        default=d,
        help="plain progress lines instead of the live table",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=d,
        help="give up (and tear down) after this many wall seconds",
    )


DEFAULTS: dict[str, Any] = {
    "preset": "cpu-demo",
    "trace": None,
    "sites": None,
    "redis_url": None,
    "speedup": None,
    "run_name": None,
    "steps": None,
    "start": None,
    "hours": None,
    "port": None,
    "tls": None,
    "supernode_auth": None,
    "set": [],
    "no_prepare": False,
    "no_live": False,
    "timeout": None,
}
