"""One command that brings the whole local stack up, watches it, and tears it down.

    curtail-llm up [--preset cpu-demo] [--trace FILE] [--redis-url URL] [--speedup S] ...
    python -m pilot.launch ...                (same thing)
    curtail-llm prepare [--preset P]      (only build the demo corpus and tokenizer)
    curtail-llm redis [--port N]          (only an embedded Valkey, for a by-hand deployment)

Order of bring-up (each step checked before the next starts):
  1. Redis: an embedded Valkey on loopback with a random password, or --redis-url (pinged);
  2. the energy simulation on the trace (or, for sites with a live source, on their
     provider at speed-up 1, recorded in <run-dir>/signals), publishing per-site signals
     into Redis;
  3. a Flower SuperLink on loopback with a private FLWR_HOME holding `local-deployment`;
  4. `flwr run . local-deployment --stream` with the preset's run-config; the ServerApp's
     provisioner starts/stops SuperNodes itself as curtailment windows open and close;
  5. the carbon report of the run into <run-dir>.
The Redis URL (it carries the password) reaches children only through CURTAIL_REDIS_URL.
Every child lives in its own process group; teardown is terminate -> wait -> kill for all of
them on success, failure, Ctrl-C and SIGTERM (see pilot/infra/procs.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pilot.config.paths import REPO, curtail_home, prepared, resolve
from pilot.config.presets import PresetError, find_preset
from pilot.events.reader import load_events
from pilot.infra.procs import ChildExited, ProcessSet
from pilot.infra.signals import ENV_URL as ENV_REDIS
from pilot.launch.view import LiveView

CONNECTION = "local-deployment"  # name of the Flower connection in our private FLWR_HOME


class LaunchError(ValueError):
    """A problem the user can fix; the message says what to do. Printed as one line."""


class Interrupted(BaseException):
    """SIGTERM/SIGHUP, turned into an exception so `finally` blocks tear the stack down."""


# ----------------------------------------------------------------------------------------
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
    d = argparse.SUPPRESS  # so `curtail-llm --x` and `curtail-llm up --x` both work
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


# ----------------------------------------------------------------------------------------
# the plan: everything checked before anything starts


@dataclass
class Plan:
    preset: str
    preset_path: Path
    launch: dict[str, Any]  # the preset's [launch] table
    trace: list[str]  # absolute paths (WattTime files may be written REGION=path); [] all live
    sites: Path
    speedup: float
    start: str | None
    hours: float | None
    run_name: str
    run_dir: Path
    port: int
    run_config: dict[str, Any]
    redis_url: str | None = field(repr=False)  # secret: never printed
    trace_data: Any = field(
        default=None, repr=False
    )  # pilot.energy.traces.Trace, for the live view
    sites_config: Any = field(default=None, repr=False)  # pilot.config.sites.SitesConfig
    prepare: bool = True
    live: bool = True
    timeout: float | None = None
    tls: bool = False
    supernode_auth: bool = False
    certs: dict[str, Path] = field(default_factory=dict)  # the preset's ssl_* files, if given


SSL_KEYS = ("ssl_ca_certfile", "ssl_certfile", "ssl_keyfile")  # [launch] keys = SuperLink flags


def load_preset(name: str) -> tuple[Path, dict[str, Any]]:
    """A preset by name (configs/<name>.toml) or by path (relative to the working directory)."""
    try:
        path = find_preset(name, Path.cwd())
    except PresetError as e:
        raise LaunchError(str(e)) from None
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise LaunchError(f"preset {path} is not valid TOML ({e}): fix the file") from None
    if "launch" not in doc:
        raise LaunchError(f"preset {path} has no [launch] table: start from configs/cpu-demo.toml")
    return path, doc


def make_plan(args: argparse.Namespace) -> Plan:
    opts = {**DEFAULTS, **vars(args)}
    preset_path, preset = load_preset(opts["preset"])
    launch = preset.get("launch", {})

    from pilot.config.sites import load_sites

    if not opts["sites"] and not launch.get("sites"):
        raise LaunchError(f"preset {preset_path} has no [launch] sites: pass --sites FILE")
    sites = resolve(opts["sites"], Path.cwd()) if opts["sites"] else resolve(launch["sites"], REPO)
    if not sites.is_file():
        raise LaunchError(
            f"sites file not found: {sites} — pass an existing sites TOML with --sites"
        )
    sites_cfg = load_sites(sites)  # ConfigError (a ValueError) names the field
    # a trace only for the sites that replay one; live sites read their provider
    trace: list[str] = []
    trace_obj = None
    if sites_cfg.trace_regions:
        if not opts["trace"] and not launch.get("trace"):
            raise LaunchError(f"preset {preset_path} has no [launch] trace: pass --trace FILE")
        if opts["trace"]:
            trace = [trace_path(t, Path.cwd()) for t in opts["trace"]]
        else:
            trace = [trace_path(launch["trace"], REPO)]
        trace_obj = check_trace_covers_sites(trace, sites_cfg)

    speedup = float(opts["speedup"] or launch.get("speedup", 1.0))
    if speedup <= 0:
        raise LaunchError(f"--speedup must be > 0 (got {speedup})")
    # The preset's replay window belongs to the preset's own trace; another --trace is
    # replayed from its start unless --start/--hours say otherwise.
    own = {} if opts["trace"] else launch
    start = opts["start"] if opts["start"] is not None else own.get("start")
    hours = opts["hours"] if opts["hours"] is not None else own.get("hours")
    if hours is not None and float(hours) <= 0:
        raise LaunchError(f"--hours must be > 0 (got {hours})")
    if sites_cfg.live and (speedup != 1 or start is not None):
        raise LaunchError(
            f"{sites} names live signal sources: they run in real time from now, so drop"
            " --speedup/--start (or the preset's speedup/start)"
        )
    if trace_obj is not None and (start is not None or hours is not None):
        check_span(trace_obj, start, None if hours is None else float(hours))

    run_name = opts["run_name"] or f"{preset_path.stem}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", run_name):
        raise LaunchError(f"--run-name {run_name!r}: use letters, digits, '.', '_' or '-'")
    run_dir = resolve(launch.get("runs_dir", "runs"), curtail_home()) / run_name
    if trace_obj is not None and not sites_cfg.live:
        start, hours = continue_replay(run_dir, trace_obj, start, hours)

    port = opts["port"] if opts["port"] is not None else int(launch.get("superlink_port", 0))
    port = claim_port(port, "--port")

    # Only keys declared in pyproject's [tool.flwr.app.config] may be overridden.
    preset_ref = str(preset_path) if opts["preset"].endswith(".toml") else opts["preset"]
    run_config: dict[str, Any] = {"preset": preset_ref, "run-name": run_name}
    if opts["sites"]:
        run_config["sites"] = str(sites)
    if opts["steps"] is not None:
        if opts["steps"] <= 0:
            raise LaunchError(f"--steps must be > 0 (got {opts['steps']})")
        run_config["num-iterations"] = opts["steps"]
    keys = run_config_keys()
    for item in opts["set"]:
        key, sep, value = (x.strip() for x in item.partition("="))
        if not sep or not key:
            raise LaunchError(f"--set {item!r}: write KEY=VALUE, e.g. --set superlink=HOST:PORT")
        if key not in keys:
            raise LaunchError(f"--set {key}: not a run-config key; use one of {', '.join(keys)}")
        run_config[key] = parse_value(value)

    redis_url = opts["redis_url"]
    if redis_url:
        check_redis(redis_url)

    supernode_auth = bool(_opt(opts, launch, "supernode_auth"))
    tls = supernode_auth or bool(_opt(opts, launch, "tls"))
    certs = {k: resolve(launch[k], REPO) for k in SSL_KEYS if launch.get(k)}
    if certs and (len(certs) < len(SSL_KEYS) or not tls):
        raise LaunchError(
            f"preset {preset_path}: set all of {', '.join(SSL_KEYS)} together with tls = true,"
            " or none of them (a private CA is then made for the run)"
        )
    for key, path in certs.items():
        if not path.is_file():
            raise LaunchError(f"preset {preset_path}: {key} {path} not found")

    return Plan(
        preset=opts["preset"],
        preset_path=preset_path,
        launch=launch,
        trace=trace,
        sites=sites,
        speedup=speedup,
        start=start,
        hours=None if hours is None else float(hours),
        run_name=run_name,
        run_dir=run_dir,
        port=port,
        run_config=run_config,
        redis_url=redis_url,
        trace_data=trace_obj,
        sites_config=sites_cfg,
        prepare=not opts["no_prepare"],
        live=not opts["no_live"] and sys.stdout.isatty(),
        timeout=opts["timeout"],
        tls=tls,
        supernode_auth=supernode_auth,
        certs=certs,
    )


def _opt(opts: dict[str, Any], launch: dict[str, Any], key: str) -> Any:
    """A command-line flag when given, else the preset's [launch] value."""
    return opts[key] if opts[key] is not None else launch.get(key, False)


def run_config_keys() -> list[str]:
    """Keys the Flower app declares (pyproject [tool.flwr.app.config]); flwr refuses others."""
    doc = tomllib.loads((REPO / "pyproject.toml").read_text())
    return sorted(doc["tool"]["flwr"]["app"].get("config", {}))


def parse_value(text: str) -> Any:
    """A run-config value as TOML would read it (int, float, bool, quoted or bare string)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def trace_path(arg: str, base: Path) -> str:
    """A trace file (`path`, or WattTime's `REGION=path`) with the path made absolute against
    `base` (the working directory for --trace, the repository for a preset's trace)."""
    region, sep, path = arg.partition("=") if re.match(r"^[A-Za-z0-9_]+=", arg) else ("", "", arg)
    p = resolve(path, base).resolve()
    if not p.is_file():
        raise LaunchError(
            f"trace file not found: {p} — pass an existing wide or WattTime CSV with --trace"
        )
    return f"{region}={p}" if sep else str(p)


def check_trace_covers_sites(trace: list[str], sites: Any) -> Any:
    """Fail before anything starts if the trace is unreadable or lacks a replayed region."""
    from pilot.energy.traces import load_trace

    tr = load_trace(trace)  # TraceError (a ValueError) names the file and the problem
    missing = sorted(set(sites.trace_regions) - set(tr.regions))
    if missing:
        raise LaunchError(
            f"trace {', '.join(trace)} has no column for region(s) {', '.join(missing)} used in"
            f" {sites.path}: pass a trace with them (has: {', '.join(tr.regions)})"
        )
    return tr


def continue_replay(
    run_dir: Path, trace: Any, start: str | None, hours: float | None
) -> tuple[str | None, float | None]:
    """Reusing a run name resumes that run (the ServerApp loads its checkpoint): the energy
    simulation must then continue from the last recorded simulated time, or simulated time
    would run backwards through the carbon ledger."""
    from pilot.energy.traces import iso, parse_time

    events = run_dir / "events.jsonl"
    if not events.is_file():
        return start, hours
    try:
        times = [float(e["t"]) for e in load_events(events)]
    except ValueError as e:
        raise LaunchError(f"cannot continue run {run_dir.name}: {e}") from None
    if not times:
        return start, hours
    t0 = trace.start if start is None else parse_time(start)
    end = trace.end if hours is None else t0 + float(hours) * 3600.0
    resume_t = max(times)
    if resume_t >= end:
        raise LaunchError(
            f"run {run_dir.name} already replayed its window up to {iso(resume_t)}:"
            " pick a new --run-name (or a later --hours)"
        )
    return iso(max(resume_t, t0)), (end - max(resume_t, t0)) / 3600.0


def check_span(trace: Any, start: str | None, hours: float | None) -> None:
    """The simulated span must lie inside the trace (the energy simulation would fail later)."""
    from pilot.energy.traces import iso, parse_time

    try:
        t0 = trace.start if start is None else parse_time(start)
    except ValueError as e:
        raise LaunchError(f"--start {start!r}: {e} (e.g. 2024-06-01T15:00:00Z)") from None
    t1 = trace.end if hours is None else t0 + hours * 3600.0
    if not trace.start <= t0 < t1 <= trace.end:
        raise LaunchError(
            f"the replay window (--start/--hours or the preset's) {iso(t0)} .. {iso(t1)} is"
            " outside the trace"
            f" ({iso(trace.start)} .. {iso(trace.end)}): pick a span inside it"
        )


def claim_port(port: int, flag: str) -> int:
    """A port on 127.0.0.1 that is free right now: `port`, or any free one when it is 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise LaunchError(
                f"port 127.0.0.1:{port} is busy: stop what uses it or pass {flag} 0 for a free one"
            ) from None
        return s.getsockname()[1]


def check_redis(url: str) -> None:
    import redis

    from pilot.infra.signals import redact

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
        client.ping()
        client.close()
    except (redis.RedisError, ValueError, OSError) as e:
        reason = str(e).replace(url, redact(url)).splitlines()[0] if str(e) else type(e).__name__
        raise LaunchError(
            f"cannot reach Redis at {redact(url)} ({reason}): start it, fix the URL/password,"
            " or drop --redis-url to use the embedded server"
        ) from None


# ----------------------------------------------------------------------------------------
# first use: demo corpus and tokenizer


def prepare_data(launch: dict[str, Any], allowed: bool, say: Callable[[str], None]) -> None:
    """Build the offline demo corpus and tokenizer the preset points at, if they are missing.

    Only the demo corpus is built here (it comes from text already on this machine); a real
    corpus such as FineWeb must be downloaded first, and the error says how."""
    for key in ("data_dir", "tokenizer_dir"):
        if not launch.get(key):
            raise LaunchError(f"the preset's [launch] table has no {key}: add one")
    data_dir = resolve(launch["data_dir"], curtail_home())
    tok_dir = resolve(launch["tokenizer_dir"], curtail_home())
    data_ok, tok_ok = prepared(data_dir, tok_dir)
    if data_ok and tok_ok:
        return
    demo = launch.get("corpus", "demo") == "demo"
    if not allowed or (not data_ok and not demo):
        what, where = ("corpus", data_dir) if not data_ok else ("tokenizer", tok_dir)
        how = (
            "run without --no-prepare once to build it"
            if demo
            else f"download it first: python -m nanochat.dataset download --num N --out {data_dir}"
        )
        raise LaunchError(f"{what} not built at {where}: {how}")
    env = child_env(None)
    if not data_ok:
        say(f"first use: building the offline demo corpus in {data_dir} ...")
        argv = [sys.executable, "-m", "nanochat.dataset", "demo", "--out", str(data_dir)]
        if "max_doc_chars" in launch:  # shorter documents crop less at short sequence lengths
            argv += ["--max-doc-chars", str(int(launch["max_doc_chars"]))]
        run_step(argv, env)
    if not tok_ok:
        vocab = int(launch.get("vocab_size", 8192))
        say(f"first use: training a {vocab}-token tokenizer into {tok_dir} ...")
        run_step(
            [
                sys.executable,
                "-m",
                "scripts.tok_train",
                "--data-dir",
                str(data_dir),
                "--out",
                str(tok_dir),
                "--vocab-size",
                str(vocab),
            ],
            env,
        )


def run_step(argv: list[str], env: dict[str, str]) -> None:
    """Run a preparation command in the foreground, its progress on our terminal."""
    rc = subprocess.run(argv, env=env, cwd=REPO).returncode
    if rc != 0:
        raise LaunchError(f"{' '.join(argv[1:4])} failed (exit {rc}): see its output above")


# ----------------------------------------------------------------------------------------
# the stack


def child_env(redis_url: str | None, **extra: str) -> dict[str, str]:
    """Environment for children: our venv's tools first on PATH (Flower starts
    `flower-superexec`/`flwr-serverapp` by name), the Redis URL only in CURTAIL_REDIS_URL."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("CURTAIL_HOME", str(curtail_home()))
    if redis_url:
        env[ENV_REDIS] = redis_url
    env.update(extra)
    return env


def write_flwr_home(home: Path, port: int, root_certificates: Path | None = None) -> Path:
    """A private FLWR_HOME so the user's own Flower connections are neither used nor changed.
    With `root_certificates` (the CA's PEM) the connection verifies the SuperLink's TLS."""
    home.mkdir(parents=True, exist_ok=True)
    security = (
        f"root-certificates = {toml_value(str(root_certificates))}\n"
        if root_certificates
        else "insecure = true\n"
    )
    (home / "config.toml").write_text(
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "127.0.0.1:{port}"\n' + security
    )
    return home


def superlink_security(plan: Plan) -> tuple[list[str], Path | None]:
    """(SuperLink flags, CA certificate or None) for the plan: --insecure, or TLS with the
    preset's certificates or a private CA made in <run-dir>/tls (loopback names only)."""
    if not plan.tls:
        return ["--insecure"], None
    from pilot.infra.tls import ca_and_server_cert

    if plan.certs:
        files = {k: plan.certs[k] for k in SSL_KEYS}
    else:
        made = ca_and_server_cert(plan.run_dir / "tls", ["127.0.0.1", "localhost"])
        files = dict(zip(SSL_KEYS, (made.ca_cert, made.cert, made.key), strict=True))
    argv = [a for k, path in files.items() for a in (f"--{k.replace('_', '-')}", str(path))]
    if plan.supernode_auth:
        argv.append("--enable-supernode-auth")
    return argv, files["ssl_ca_certfile"]


def register_supernodes(plan: Plan, env: dict[str, str]) -> Path:
    """Make (once) and register every site's SuperNode key with the running SuperLink; returns
    the key directory the provisioner starts nodes with. A key registered by an earlier launch
    of the same run stays valid."""
    from pilot.infra.tls import node_key

    keys = plan.run_dir / "tls" / "nodes"
    for site in plan.sites_config.names:
        _, public = node_key(keys, site)
        argv = ["flwr", "supernode", "register", str(public), CONNECTION, "--name", site]
        res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        said = (res.stdout + res.stderr).strip()
        if res.returncode != 0 and "already" not in said.lower():
            last = said.splitlines()[-1] if said else f"exit code {res.returncode}"
            raise LaunchError(f"could not register the SuperNode key of {site}: {last}")
    return keys


def wait_for(cond: Callable[[], bool], timeout: float, what: str, procs: ProcessSet) -> None:
    """Poll `cond` until true; a critical child dying meanwhile fails at once."""
    deadline = time.monotonic() + timeout
    while not cond():
        procs.check()
        if time.monotonic() > deadline:
            raise LaunchError(
                f"{what} did not come up within {timeout:.0f} s: see the logs in {procs.log_dir}"
            )
        time.sleep(0.2)


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Outcome:
    status: str  # "completed" | "failed" | "interrupted" | "timeout"
    detail: str = ""
    run_id: str | None = None


def run_stack(plan: Plan, view: LiveView) -> Outcome:
    """Bring the stack up, watch the run until it ends, tear everything down."""
    import redis

    from pilot.infra.signals import Signals, connect
    from pilot.infra.valkey import EmbeddedValkey

    logs = plan.run_dir / "logs"
    procs = ProcessSet(logs)
    valkey = None
    try:
        # 1. Redis
        url = plan.redis_url
        try:
            if url is None:
                # Its config file (holding the password) is in a private temp dir, removed on stop.
                valkey = EmbeddedValkey(password=secrets.token_urlsafe(24))
                url = valkey.start().url
            # A clear error (URL redacted) if the server refuses us; then an empty namespace
            # for the run, so nobody reads a past run's status or events under the same name.
            Signals(connect(url), plan.run_name).clear()
        except (RuntimeError, ConnectionError) as e:
            raise LaunchError(f"Redis is not usable: {e}") from None
        # The view gets its own client without retries: a Redis that went away must not
        # stall the watch loop or the teardown in connection back-off.
        client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=2)
        sig = Signals(client, plan.run_name)
        view.attach(sig)
        view.phase("Redis ready")

        # 2. SuperLink, with a private FLWR_HOME
        security, ca_cert = superlink_security(plan)
        flwr_home = write_flwr_home(plan.run_dir / "flwr-home", plan.port, ca_cert)
        env = child_env(url, FLWR_HOME=str(flwr_home))
        argv = ["flower-superlink", *security, "--disable-runtime-dependency-installation"]
        argv += ["--host", "127.0.0.1", "--port", str(plan.port)]
        procs.start("superlink", argv, env=env, cwd=plan.run_dir)
        wait_for(lambda: port_open(plan.port), 60, "the Flower SuperLink", procs)
        view.phase(f"SuperLink on 127.0.0.1:{plan.port}" + (" (TLS)" if ca_cert else ""))
        # The provisioned SuperNodes verify the SuperLink with the CA and sign with their key.
        overrides = {"root-certificates": str(ca_cert)} if ca_cert else {}
        if plan.supernode_auth:
            overrides["supernode-auth-keys"] = str(register_supernodes(plan, env))
            view.phase(f"{len(plan.sites_config.names)} SuperNode keys registered")

        # 3. the run; the ServerApp provisions SuperNodes itself
        run_config = plan.run_dir / "run-config.toml"
        run_config.write_text(
            "".join(f"{k} = {toml_value(v)}\n" for k, v in {**plan.run_config, **overrides}.items())
        )
        argv = ["flwr", "run", str(REPO), CONNECTION, "--stream", "--run-config", str(run_config)]
        flwr = procs.start("flwr-run", argv, env=env, cwd=REPO, critical=False)
        run_log = logs / "flwr-run.log"
        wait_for(
            lambda: flwr_run_id(run_log) is not None or flwr.poll() is not None,
            120,
            "the Flower run",
            procs,
        )
        run_id = flwr_run_id(run_log)
        if run_id is None:
            procs.check()  # a dead SuperLink is the cause, not flwr run's reaction to it
            lines = [ln for ln in tail(run_log, 20).splitlines() if ln.strip()]
            return Outcome(
                "failed", f"flwr run could not start the run: {lines[-1] if lines else '?'}"
            )
        view.phase(f"Flower run {run_id} started")

        # 4. energy simulation. Started last on purpose: the ServerApp waits for its clock, so
        # no simulated time passes unseen while Flower and the ServerApp are still starting.
        argv = [sys.executable, str(REPO / "energy_simulation.py"), "--run", plan.run_name]
        argv += ["--sites", str(plan.sites), "--speedup", str(plan.speedup)]
        if plan.trace:
            argv += ["--trace", ",".join(plan.trace)]
        if plan.sites_config.live:  # what the run saw, for replay (credentials: env only)
            argv += ["--record-signals", str(plan.run_dir / "signals")]
        if "tick_s" in plan.launch:  # simulated seconds per signal tick
            argv += ["--step", str(int(plan.launch["tick_s"]))]
        if "poll_s" in plan.launch:  # live sources: wall seconds between provider polls
            argv += ["--poll", str(plan.launch["poll_s"])]
        if plan.start:
            argv += ["--start", plan.start]
        if plan.hours:
            argv += ["--hours", str(plan.hours)]
        # It exits 0 at the end of the span; the ServerApp then ends the run ("trace_end").
        procs.start("energy", argv, env=child_env(url), cwd=REPO, may_finish=True)
        wait_for(lambda: sig.status() is not None, 60, "the energy simulation", procs)
        view.phase("running")

        # 5. watch until `flwr run --stream` returns (the run has ended)
        deadline = time.monotonic() + plan.timeout if plan.timeout else None
        while flwr.poll() is None:
            procs.check()
            view.refresh()
            if deadline and time.monotonic() > deadline:
                return Outcome("timeout", f"gave up after {plan.timeout:.0f} s (--timeout)", run_id)
            time.sleep(0.5)
        procs.check()  # flwr run may notice a crashed SuperLink before the loop does
        view.refresh()
        status, detail = flwr_run_status(run_id, env)
        if flwr.returncode != 0 and status == "completed":
            status, detail = "failed", f"flwr run exited with {flwr.returncode}"
        return Outcome(status, detail, run_id)
    except ChildExited as e:
        return Outcome("failed", str(e))
    finally:
        # A second Ctrl-C must not cut the teardown short and leave processes behind.
        with signals_deferred():
            view.detach()  # last look at Redis while it is still up
            view.phase("stopping")
            procs.close(timeout=float(plan.launch.get("stop_timeout_s", 10)))
            if valkey is not None:
                valkey.stop()


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def flwr_run_id(log: Path) -> str | None:
    m = (
        re.search(r"Successfully started run (\d+)", log.read_text(errors="replace"))
        if log.exists()
        else None
    )
    return m.group(1) if m else None


def flwr_run_status(run_id: str, env: dict[str, str]) -> tuple[str, str]:
    """Ask the SuperLink how the run ended: ("completed"|"failed", details)."""
    res = subprocess.run(
        ["flwr", "ls", CONNECTION, "--run-id", run_id, "--format", "json"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        runs = json.loads(res.stdout)["runs"]
        status, detail = runs[0]["status"], runs[0].get("status-details", "")
    except (json.JSONDecodeError, KeyError, IndexError):
        return "failed", f"could not read the run status from the SuperLink: {res.stderr[-200:]}"
    return ("completed" if status == "finished:completed" else "failed"), (
        "" if detail == "N/A" else detail
    )


def tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ----------------------------------------------------------------------------------------
# report


def make_report(plan: Plan, say: Callable[[str], None]) -> bool:
    """Print the report the ServerApp wrote as the run ended; build it here only where it did
    not (the ServerApp was killed, or its report failed). Either way its table and paths."""
    from pilot.analysis.report import is_current

    argv = [sys.executable, "-m", "pilot.analysis.report", str(plan.run_dir)]
    if is_current(plan.run_dir):
        argv.append("--show")
    else:  # same inputs as the ServerApp's report (a live run's: its run_start's record)
        argv += ["--trace", *plan.trace] if plan.trace else []
        argv += ["--sites", str(plan.sites)]
    res = subprocess.run(argv, env=child_env(None), cwd=REPO)
    if res.returncode != 0:
        say(f"the report failed (exit {res.returncode}); the run's files are in {plan.run_dir}")
        return False
    return True


# ----------------------------------------------------------------------------------------


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP while the body runs, then act on the first one received."""
    got: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, lambda n, f: got.append(n)) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if got:
            raise KeyboardInterrupt if got[0] == signal.SIGINT else Interrupted(str(got[0]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        from pilot.analysis.export import main as export

        return export(argv[1:], prog="curtail-llm export")
    args = parse_args(argv)
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _raise_interrupted)
    # A shell starts background jobs with SIGINT ignored, and Python then leaves it ignored:
    # Ctrl-C (or a SIGINT to our process group) must still tear the stack down.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    view: LiveView | None = None
    try:
        if args.command == "redis":
            from pilot.infra.valkey import URL_FILE, print_url, serve

            url_file = curtail_home() / URL_FILE
            return print_url(url_file) if args.url else serve(url_file, args.port)
        if args.command == "prepare":
            _, preset = load_preset(getattr(args, "preset", DEFAULTS["preset"]))
            prepare_data(preset["launch"], True, print)
            return 0
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


if __name__ == "__main__":
    sys.exit(main())
