"""One command that brings the whole local stack up, watches it, and tears it down.

    curtail-llm up [--preset cpu-demo] [--trace FILE] [--redis-url URL] [--speedup S] ...
    python -m pilot.launch ...                (same thing)
    curtail-llm prepare [--preset P]      (only build the demo corpus and tokenizer)
    curtail-llm redis [--port N]          (only an embedded Valkey, for a by-hand deployment)

Order of bring-up (each step checked before the next starts; pilot/launch/stack.py's Stack):
  1. Redis: an embedded Valkey on loopback with a random password, or --redis-url (pinged);
  2. a Flower SuperLink on loopback with a private FLWR_HOME holding `local-deployment`;
  3. `flwr run . local-deployment --stream` with the preset's run-config; the ServerApp's
     provisioner starts/stops SuperNodes itself as curtailment windows open and close;
  4. the energy simulation on the trace (or, for sites with a live source, on their
     provider at speed-up 1, recorded in <run-dir>/signals), publishing per-site signals
     into Redis; started last, as the ServerApp waits for its clock;
  5. the carbon report of the run into <run-dir>.
The Redis URL (it carries the password) reaches children only through CURTAIL_REDIS_URL.
Every child lives in its own process group; teardown is terminate -> wait -> kill for all of
them on success, failure, Ctrl-C and SIGTERM (see pilot/infra/procs.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from pilot.config.paths import curtail_home
from pilot.launch.args import DEFAULTS, parse_args
from pilot.launch.errors import Interrupted
from pilot.launch.plan import load_preset, make_plan
from pilot.launch.prepare import prepare_data
from pilot.launch.stack import make_report, raise_interrupted, run_stack
from pilot.launch.view import LiveView


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        from pilot.analysis.export import main as export

        return export(argv[1:], prog="curtail-llm export")
    args = parse_args(argv)
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, raise_interrupted)
    # A shell starts background jobs with SIGINT ignored, and Python then leaves it ignored:
    # Ctrl-C (or a SIGINT to our process group) must still tear the stack down.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if args.command == "redis":
            from pilot.infra.valkey import URL_FILE, print_url, serve

            url_file = curtail_home() / URL_FILE
            return print_url(url_file) if args.url else serve(url_file, args.port)
        if args.command == "prepare":
            _, preset = load_preset(getattr(args, "preset", DEFAULTS["preset"]))
            prepare_data(preset["launch"], True, print)
            return 0
        return up(args)
    except (KeyboardInterrupt, Interrupted):
        print("curtail-llm: interrupted; everything it started has been stopped", file=sys.stderr)
        return 130
    except ValueError as e:  # LaunchError and the config/trace errors of other modules
        print(f"curtail-llm: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: everything is torn down already; keep the details on disk
        where = Path(tempfile.gettempdir()) / f"curtail-llm-{os.getpid()}.traceback"
        where.write_text(traceback.format_exc())
        print(
            f"curtail-llm: internal error: {type(e).__name__}: {e} (traceback: {where})",
            file=sys.stderr,
        )
        return 1


def up(args: argparse.Namespace) -> int:
    """Plan, prepare, run the stack and report: 0 when the run completed and was reported."""
    plan = make_plan(args)
    view = LiveView(
        plan.run_name, live=plan.live, trace=plan.trace_data, sites_config=plan.sites_config
    )
    say = view.say
    signals = (
        f"trace {', '.join(Path(t).name for t in plan.trace)}"
        if plan.trace
        else f"live signals ({', '.join(sorted({s.source for s in plan.sites_config.sites}))})"
    )
    say(
        f"run {plan.run_name}: preset {plan.preset}, {signals},"
        f" speed-up {plan.speedup:g}x, files in {plan.run_dir}"
    )
    prepare_data(plan.launch, plan.prepare, say)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with view:
        outcome = run_stack(plan, view)
    say(
        f"run {outcome.status} after {time.monotonic() - t0:.0f} s"
        + (f": {outcome.detail}" if outcome.detail and outcome.status != "completed" else "")
    )
    # A failed or timed-out run still gets a report of what it did (its run_end event, if
    # any, says why it ended).
    if (plan.run_dir / "events.jsonl").exists():
        reported = make_report(plan, say)
    else:
        say(f"no events were recorded in {plan.run_dir}: nothing to report")
        reported = False
    if outcome.status != "completed":
        say(f"the run did not complete; logs of every process are in {plan.run_dir / 'logs'}")
        return 1
    return 0 if reported else 1


if __name__ == "__main__":
    sys.exit(main())
