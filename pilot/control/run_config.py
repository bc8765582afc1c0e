"""The ServerApp's run configuration: a preset TOML plus Flower run-config overrides, checked
on load so a bad preset fails before anything waits on the energy simulation."""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pilot.config.paths import REPO, resolve
from pilot.config.presets import PresetError, find_preset


class RunConfigError(ValueError):
    """The preset or run-config is invalid; the message names the file/key and the fix."""


@dataclass
class RunConfig:
    """Everything the ServerApp needs, from a preset TOML plus Flower run-config overrides.

    Preset sections: ``[launch]`` (shared with pilot.launch.cli: sites, data_dir, tokenizer_dir,
    runs_dir), ``[run]`` (this module's knobs below) and ``[train]`` (nanochat TrainConfig).
    Durations ending in ``_s`` are simulated seconds unless documented as wall seconds.
    """

    name: str
    preset: Path
    sites_file: Path
    data_dir: str  # CURTAIL_HOME-relative unless absolute; resolved on each site
    tokenizer_dir: str
    run_dir: Path
    train: dict
    policy: str | None = None  # None: the sites file's [policy] name
    provisioner: str = "subprocess"
    k8s_namespace: str = "curtail"  # provisioner "kubernetes": where the SitePools live
    k8s_kubeconfig: str = ""  # ... and the cluster ("": in-cluster config, else $KUBECONFIG)
    superlink: str = ""  # Fleet address for provisioned SuperNodes ("": the Runtime API's)
    root_certificates: str = ""  # CA (PEM) provisioned SuperNodes verify TLS with ("": insecure)
    supernode_auth_keys: str = ""  # dir of <site>.key SuperNode auth keys ("": no node auth)
    round_min_s: float = 600.0  # FEDERATED round length (sync period)
    round_max_s: float = 1800.0  # LOCAL round length (checkpoint period)
    join_min_s: float = 60.0  # a site joins a running round only with this much left
    reply_grace_s: float = 60.0  # WALL seconds past a deadline before a silent site is dropped
    poll_s: float = 0.5  # WALL seconds between Grid polls while messages are in flight
    transfer_dtype: str = "fp32"  # the global model to the sites: fp32 | bf16
    update_dtype: str = "bf16"  # a site's pseudo-gradient back: fp32 | bf16 | int8
    outer: str = "none"
    outer_lr: float = 1.0
    outer_momentum: float = 0.9
    chunks_per_assignment: int = 4
    assignment_slack: float = 1.5  # lease this many times the rows a site is expected to read
    stop_ttl_s: float = 3600.0  # WALL seconds a stop request stays in Redis
    node_stop_timeout_s: float = 10.0  # WALL seconds a SuperNode gets to exit on SIGTERM
    # a dead SuperNode is restarted (the first at once, then after 2 s, 4 s, ...) at most
    # node_restarts times in node_restart_window_s; one more death releases the site for
    # node_failed_cooldown_s (all WALL seconds; pilot.control.fleet.RestartBudget)
    node_restarts: int = 5
    node_restart_window_s: float = 600.0
    node_restart_backoff_s: float = 2.0
    node_failed_cooldown_s: float = 600.0
    wandb: str = "disabled"  # disabled | offline | online
    wandb_project: str = "curtail-llm"

    @property
    def num_iterations(self) -> int:
        return int(self.train["num_iterations"])


_RUN_KEYS = {f for f in RunConfig.__dataclass_fields__} - {
    "name",
    "preset",
    "sites_file",
    "data_dir",
    "tokenizer_dir",
    "run_dir",
    "train",
}


def load_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Flower run-config (``preset``, optional ``run-name``, ``num-iterations``, ``sites``,
    ``provisioner``, ``superlink``, ``root-certificates``, ``supernode-auth-keys``) ->
    RunConfig, validated (RunConfigError names the file and key)."""
    try:
        preset = find_preset(str(run_config.get("preset") or "cpu-demo"), REPO)
    except PresetError as e:
        raise RunConfigError(f"{e} (--run-config \"preset='NAME'\")") from None
    try:
        doc = tomllib.loads(preset.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RunConfigError(f"{preset}: invalid TOML ({e})") from None
    launch, run = doc.get("launch", {}), dict(doc.get("run", {}))
    name = str(run_config.get("run-name") or run.pop("name", "") or preset.stem)
    run.pop("name", None)
    unknown = set(run) - _RUN_KEYS
    if unknown:
        raise RunConfigError(
            f"{preset}: [run] has unknown key(s) {sorted(unknown)}; allowed: {sorted(_RUN_KEYS)}"
        )
    for key in ("provisioner", "superlink", "root-certificates", "supernode-auth-keys"):
        if run_config.get(key):
            run[key.replace("-", "_")] = str(run_config[key])
    cfg = RunConfig(
        name=name,
        preset=preset,
        train=_train_config(preset, doc.get("train", {}), run_config),
        **_launch_paths(preset, launch, run_config, name),
        **run,
    )
    _validate(cfg)
    return cfg


def _train_config(preset: Path, train: dict, run_config: Mapping[str, Any]) -> dict:
    from nanochat.train import TrainConfig

    try:
        tc = TrainConfig.from_dict(dict(train))
    except (TypeError, ValueError) as e:
        raise RunConfigError(f"{preset}: [train]: {e}") from None
    if int(run_config.get("num-iterations") or 0) > 0:
        tc.num_iterations = int(run_config["num-iterations"])
    return tc.to_dict()


def _launch_paths(
    preset: Path, launch: dict, run_config: Mapping[str, Any], name: str
) -> dict[str, Any]:
    """The [launch] table's places: the sites file (relative to the app directory), the data
    and tokenizer dirs (resolved on each site) and the run dir (under CURTAIL_HOME)."""
    sites = str(run_config.get("sites") or launch.get("sites") or "")
    if not sites:
        raise RunConfigError(f"{preset}: [launch] sites is missing: name a sites TOML")
    for key in ("data_dir", "tokenizer_dir"):
        if not launch.get(key):
            raise RunConfigError(f"{preset}: [launch] {key} is missing")
    return {
        "sites_file": resolve(sites, REPO),
        "data_dir": str(launch["data_dir"]),
        "tokenizer_dir": str(launch["tokenizer_dir"]),
        "run_dir": resolve(str(launch.get("runs_dir", "runs"))) / name,
    }


def _validate(cfg: RunConfig) -> None:
    from pilot.control.aggregate import OuterOptimizer, transfer_dtype
    from pilot.control.updates import check_update_dtype
    from pilot.provisioner import KINDS

    transfer_dtype(cfg.transfer_dtype)
    check_update_dtype(cfg.update_dtype)
    OuterOptimizer(cfg.outer, cfg.outer_lr, cfg.outer_momentum)
    if not 0 < cfg.round_min_s <= cfg.round_max_s:
        raise RunConfigError(
            f"{cfg.preset}: need 0 < round_min_s <= round_max_s, got "
            f"{cfg.round_min_s}, {cfg.round_max_s}"
        )
    if cfg.node_restarts < 0 or min(cfg.node_restart_window_s, cfg.node_restart_backoff_s) < 0:
        raise RunConfigError(f"{cfg.preset}: [run] node_restart* values must be >= 0")
    if cfg.wandb not in ("disabled", "offline", "online"):
        raise RunConfigError(f"{cfg.preset}: [run] wandb must be disabled, offline or online")
    if cfg.provisioner not in KINDS:
        raise RunConfigError(
            f"provisioner {cfg.provisioner!r} (run-config or [run]): use one of {', '.join(KINDS)}"
        )


def runtime_api_address() -> str:
    """The SuperLink address this ServerApp process was started with. Flower 1.41 serves the
    Fleet API on the same port, so provisioned SuperNodes can connect there."""
    argv = sys.argv
    for i, a in enumerate(argv):
        if a == "--runtime-api-address" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--runtime-api-address="):
            return a.split("=", 1)[1]
    return "127.0.0.1:8000"  # Flower's default SuperLink port
