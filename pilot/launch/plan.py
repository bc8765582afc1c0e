"""The launch plan: a preset, its sites and trace, and the options, checked before anything starts."""

from __future__ import annotations

import argparse
import re
import socket
import sys
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pilot.config.paths import REPO, curtail_home, resolve
from pilot.config.presets import PresetError, find_preset
from pilot.events.reader import load_events
from pilot.launch.args import DEFAULTS
from pilot.launch.errors import LaunchError

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
    """The plan for `curtail-llm up`: every option checked before anything starts."""
    opts = {**DEFAULTS, **vars(args)}
    preset_path, preset = load_preset(opts["preset"])
    launch = preset.get("launch", {})
    sites, sites_cfg = _sites(opts, launch, preset_path)
    trace, trace_obj = _trace(opts, launch, preset_path, sites_cfg)
    speedup, start, hours = _replay_window(opts, launch, sites, sites_cfg, trace_obj)

    run_name = opts["run_name"] or f"{preset_path.stem}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", run_name):
        raise LaunchError(f"--run-name {run_name!r}: use letters, digits, '.', '_' or '-'")
    run_dir = resolve(launch.get("runs_dir", "runs"), curtail_home()) / run_name
    if trace_obj is not None and not sites_cfg.live:
        start, hours = continue_replay(run_dir, trace_obj, start, hours)

    port = opts["port"] if opts["port"] is not None else int(launch.get("superlink_port", 0))
    port = claim_port(port, "--port")
    run_config = _run_config(opts, preset_path, run_name, sites)
    redis_url = opts["redis_url"]
    if redis_url:
        check_redis(redis_url)
    tls, supernode_auth, certs = _security(opts, launch, preset_path)

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


def _sites(opts: dict[str, Any], launch: dict[str, Any], preset_path: Path) -> tuple[Path, Any]:
    """The sites file (--sites, else the preset's) and its parsed SitesConfig."""
    from pilot.config.sites import load_sites

    if not opts["sites"] and not launch.get("sites"):
        raise LaunchError(f"preset {preset_path} has no [launch] sites: pass --sites FILE")
    sites = resolve(opts["sites"], Path.cwd()) if opts["sites"] else resolve(launch["sites"], REPO)
    if not sites.is_file():
        raise LaunchError(
            f"sites file not found: {sites} — pass an existing sites TOML with --sites"
        )
    return sites, load_sites(sites)  # ConfigError (a ValueError) names the field


def _trace(
    opts: dict[str, Any], launch: dict[str, Any], preset_path: Path, sites_cfg: Any
) -> tuple[list[str], Any]:
    """(trace files, loaded Trace): a trace only for the sites that replay one; live sites
    read their provider, so an all-live set needs none ([], None)."""
    if not sites_cfg.trace_regions:
        return [], None
    if not opts["trace"] and not launch.get("trace"):
        raise LaunchError(f"preset {preset_path} has no [launch] trace: pass --trace FILE")
    if opts["trace"]:
        trace = [trace_path(t, Path.cwd()) for t in opts["trace"]]
    else:
        trace = [trace_path(launch["trace"], REPO)]
    return trace, check_trace_covers_sites(trace, sites_cfg)


def _replay_window(
    opts: dict[str, Any], launch: dict[str, Any], sites: Path, sites_cfg: Any, trace_obj: Any
) -> tuple[float, str | None, float | None]:
    """(speed-up, start, hours) of the simulated time, checked against the trace."""
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
    return speedup, start, hours


def _run_config(
    opts: dict[str, Any], preset_path: Path, run_name: str, sites: Path
) -> dict[str, Any]:
    """The Flower app's run-config overrides. Only keys declared in pyproject's
    [tool.flwr.app.config] may be overridden."""
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
    return run_config


def _security(
    opts: dict[str, Any], launch: dict[str, Any], preset_path: Path
) -> tuple[bool, bool, dict[str, Path]]:
    """(tls, supernode_auth, the preset's certificate files): SuperNode auth implies TLS."""
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
    return tls, supernode_auth, certs


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
