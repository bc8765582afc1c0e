"""Site sets (TOML): which sites exist, which grid region each draws from, its power model,
and the curtailment policy knobs. See configs/sites.toml for a commented example.

    trace = "traces/synthetic-3site.csv"   # optional, relative to the TOML file
    [policy]
    name = "forecast"            # forecast | prototype | oracle
    forecaster = "persistence"   # persistence | noisy | same_time_yesterday | recorded |
                                 # perfect (oracle)
    forecasts = "runs/x/signals/forecasts.csv"  # recorded: a live run's provider forecasts
    threshold = 100.0            # gCO2/kWh: MCI below it = curtailment window
    enter_dwell_s = 0            # MCI must stay below this long before a window opens
    release_delay_s = 600        # prototype: train through this long above the threshold
    hold = "cost"                # ours: keep a site warm (idle) above the threshold until its
                                 # idle emissions reach a re-provisioning's cost; or seconds
    lost_work_mci = 100.0        # g/kWh pricing window time lost to a boot (default: threshold)
    forecast_time_error_s = 900  # noisy forecaster: timing error (1 sigma) 1 h ahead
    forecast_level_error = 0.15  # ... and relative level error (1 sigma, log) 1 h ahead
    forecast_seed = 0
    min_window_s = 900           # skip windows with less useful time than this
    horizon_s = 3600             # forecast look-ahead
    [[sites]]
    name = "california"; region = "CAISO_NORTH"; gpus = 4
    train_kw = 2.024; idle_kw = 0.468; provision_delay_s = 240
    source = "trace"             # trace | watttime | electricitymaps (live; README "Live signals")
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SITE_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$")  # DNS label: k8s + Redis keys
POLICY_NAMES = ("forecast", "prototype", "oracle")
FORECASTER_NAMES = ("persistence", "noisy", "same_time_yesterday", "recorded", "perfect")
_SITE_KEYS = {
    "name",
    "region",
    "gpus",
    "train_kw",
    "idle_kw",
    "provision_delay_s",
    "port",
    "source",
    "kubeconfig",
    "context",
    "namespace",
}
_K8S_KEYS = ("kubeconfig", "context", "namespace")  # provisioner "kubernetes": the site's cluster
SOURCE_NAMES = ("trace", "watttime", "electricitymaps")  # where a site's MCI comes from
_POLICY_DEFAULTS: dict[str, Any] = {
    "name": "forecast",
    "forecaster": "persistence",
    "forecasts": None,
    "threshold": 100.0,
    "enter_dwell_s": 0.0,
    "release_delay_s": 600.0,
    "hold": "cost",
    "lost_work_mci": None,
    "min_window_s": 900.0,
    "horizon_s": 3600.0,
    "forecast_time_error_s": 900.0,
    "forecast_level_error": 0.15,
    "forecast_seed": 0,
}


class ConfigError(ValueError):
    """A config file the user must fix; the message names the file and the field."""


@dataclass(frozen=True)
class Site:
    name: str
    region: str  # trace column (grid region) whose MCI applies to this site
    gpus: list[int]  # device indices; [] = CPU only
    train_kw: float  # draw while training
    idle_kw: float  # draw while provisioned but not training
    provision_delay_s: float  # from "provision" to "ready to train"
    port: int | None = None  # SuperNode port for local deployments
    # signal source: trace replay, or a live feed (region = WattTime region / Electricity
    # Maps zone); credentials come from the environment only (pilot/sources)
    source: str = "trace"
    # provisioner "kubernetes": the cluster holding this site's SitePool ("": the run's default)
    kubeconfig: str = ""
    context: str = ""
    namespace: str = ""


@dataclass
class SitesConfig:
    sites: list[Site]
    threshold: float = 100.0
    release_delay_s: float = 600.0
    enter_dwell_s: float = 0.0
    min_window_s: float = 900.0
    horizon_s: float = 3600.0
    policy: str = "forecast"
    forecaster: str = "persistence"
    hold: str | float = "cost"  # "cost": warm hold chosen per site from cost; else seconds
    lost_work_mci: float | None = None  # None: the threshold
    forecast_time_error_s: float = 900.0
    forecast_level_error: float = 0.15
    forecast_seed: int = 0
    trace: Path | None = None  # absolute, resolved against the TOML's directory
    forecasts: Path | None = None  # forecaster "recorded": a live run's forecasts.csv (absolute)
    path: Path | None = field(default=None, compare=False)

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    @property
    def regions(self) -> dict[str, str]:
        return {s.name: s.region for s in self.sites}

    @property
    def trace_regions(self) -> list[str]:
        """Regions replayed from a trace (the others' sites read live sources)."""
        return sorted({s.region for s in self.sites if s.source == "trace"})

    @property
    def live(self) -> bool:
        """Some site reads a live signal source."""
        return any(s.source != "trace" for s in self.sites)


def _num(where: str, field_: str, v: Any, *, minimum: float = 0.0, strict: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ConfigError(f"{where}.{field_}: must be a number, got {v!r}")
    if v < minimum or (strict and v == minimum):
        op = ">" if strict else ">="
        raise ConfigError(f"{where}.{field_}: must be {op} {minimum:g}, got {v!r}")
    return float(v)


def _gpus(where: str, v: Any) -> list[int]:
    if isinstance(v, int) and not isinstance(v, bool):
        if v < 0:
            raise ConfigError(f"{where}.gpus: count must be >= 0, got {v}")
        return list(range(v))
    if isinstance(v, list) and all(isinstance(g, int) and not isinstance(g, bool) for g in v):
        if any(g < 0 for g in v) or len(set(v)) != len(v):
            raise ConfigError(f"{where}.gpus: device indices must be unique and >= 0, got {v}")
        return list(v)
    raise ConfigError(f"{where}.gpus: must be a count or a list of device indices, got {v!r}")


def parse_sites(
    data: dict[str, Any], source: str = "<config>", base: Path | None = None
) -> SitesConfig:
    """Validate a parsed TOML document (``source`` names it in errors)."""
    unknown = set(data) - {"trace", "policy", "sites"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {sorted(unknown)}")
    policy = _policy(source, data.get("policy", {}))
    raw_sites = data.get("sites")
    if not isinstance(raw_sites, list) or not raw_sites:
        raise ConfigError(f"{source}: needs at least one [[sites]] table")
    sites = [_site(f"{source}: sites[{i}]", s) for i, s in enumerate(raw_sites)]
    names = [s.name for s in sites]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{source}: duplicate site name(s) {dup}")
    slowest = max(s.provision_delay_s for s in sites)
    if policy["horizon_s"] < slowest:
        raise ConfigError(
            f"{source}: policy.horizon_s: {policy['horizon_s']:g} s is shorter than the slowest "
            f"provisioning delay ({slowest:g} s); the forecast could never pre-provision in time"
        )
    trace = _path(source, "trace", data.get("trace"), base)
    policy["forecasts"] = _path(source, "policy.forecasts", policy["forecasts"], base)
    return SitesConfig(sites=sites, trace=trace, **policy)


def _policy(source: str, pol: Any) -> dict[str, Any]:
    """The [policy] table checked and defaulted, as SitesConfig keywords ("forecasts" is still
    the raw setting: parse_sites resolves it against the TOML file's directory)."""
    if not isinstance(pol, dict):
        raise ConfigError(f"{source}: [policy] must be a table")
    unknown = set(pol) - set(_POLICY_DEFAULTS)
    if unknown:
        raise ConfigError(
            f"{source}: policy: unknown key(s) {sorted(unknown)}; allowed {sorted(_POLICY_DEFAULTS)}"
        )
    p = {**_POLICY_DEFAULTS, **pol}
    if p["name"] not in POLICY_NAMES:
        raise ConfigError(f"{source}: policy.name: {p['name']!r} is not one of {POLICY_NAMES}")
    if p["forecaster"] not in FORECASTER_NAMES:
        raise ConfigError(
            f"{source}: policy.forecaster: {p['forecaster']!r} is not one of {FORECASTER_NAMES}"
        )
    w = f"{source}: policy"
    threshold = _num(w, "threshold", p["threshold"], strict=True)
    knobs = {
        k: _num(w, k, p[k])
        for k in (
            "enter_dwell_s",
            "release_delay_s",
            "min_window_s",
            "horizon_s",
            "forecast_time_error_s",
            "forecast_level_error",
        )
    }
    hold = p["hold"]
    if hold != "cost":
        if isinstance(hold, str):
            raise ConfigError(f'{w}.hold: must be "cost" or a number of seconds, got {hold!r}')
        hold = _num(w, "hold", hold)
    lost = p["lost_work_mci"]
    knobs["lost_work_mci"] = None if lost is None else _num(w, "lost_work_mci", lost)
    seed = p["forecast_seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{w}.forecast_seed: must be an integer >= 0, got {seed!r}")
    return {
        "threshold": threshold,
        "policy": p["name"],
        "forecaster": p["forecaster"],
        "hold": hold,
        "forecast_seed": seed,
        "forecasts": p["forecasts"],
        **knobs,
    }


def _site(where: str, s: Any) -> Site:
    """One [[sites]] table, checked (``where`` is "<source>: sites[i]")."""
    if not isinstance(s, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = set(s) - _SITE_KEYS
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {sorted(unknown)}; allowed {sorted(_SITE_KEYS)}"
        )
    if "name" not in s:
        raise ConfigError(f"{where}.name: missing")
    name = s["name"]
    if not isinstance(name, str) or not SITE_NAME_RE.match(name):
        raise ConfigError(f"{where}.name: {name!r} must be a lowercase DNS label (a-z, 0-9, '-')")
    w = f"{where} ({name})"
    for k in ("region", "gpus", "train_kw", "idle_kw", "provision_delay_s"):
        if k not in s:
            raise ConfigError(f"{w}.{k}: missing")
    if not isinstance(s["region"], str) or not s["region"]:
        raise ConfigError(f"{w}.region: must be a trace region name, got {s['region']!r}")
    train_kw = _num(w, "train_kw", s["train_kw"], strict=True)
    idle_kw = _num(w, "idle_kw", s["idle_kw"])
    if idle_kw > train_kw:
        raise ConfigError(f"{w}.idle_kw: {idle_kw} exceeds train_kw {train_kw}")
    port = s.get("port")
    if port is not None and (
        isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536
    ):
        raise ConfigError(f"{w}.port: must be an integer 1..65535, got {port!r}")
    src = s.get("source", "trace")
    if src not in SOURCE_NAMES:
        raise ConfigError(f"{w}.source: {src!r} is not one of {SOURCE_NAMES}")
    for k in _K8S_KEYS:
        if not isinstance(s.get(k, ""), str):
            raise ConfigError(f"{w}.{k}: must be a string, got {s[k]!r}")
    return Site(
        name=name,
        region=s["region"],
        gpus=_gpus(w, s["gpus"]),
        train_kw=train_kw,
        idle_kw=idle_kw,
        provision_delay_s=_num(w, "provision_delay_s", s["provision_delay_s"]),
        port=port,
        source=src,
        **{k: s.get(k, "") for k in _K8S_KEYS},
    )


def _path(source: str, key: str, v: Any, base: Path | None) -> Path | None:
    """A path setting, resolved against the TOML file's directory."""
    if v is None:
        return None
    if not isinstance(v, str):
        raise ConfigError(f"{source}: {key}: must be a path string, got {v!r}")
    return Path(v) if Path(v).is_absolute() or base is None else (base / v).resolve()


def load_sites(path: str | Path) -> SitesConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: sites config not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    cfg = parse_sites(data, str(path), path.resolve().parent)
    cfg.path = path
    return cfg
