"""Flower ServerApp: wiring only — config, Redis, then pilot.flower.loop's control loop.

Run-config keys (pyproject ``[tool.flwr.app.config]``, overridable with ``--run-config``):
``preset`` (a configs/ name or a TOML path), ``run-name``, ``num-iterations`` (0: the
preset's), ``sites`` (a sites TOML instead of the preset's), ``provisioner`` (``none``: the
SuperNodes are started by hand, README "Manual multi-terminal deployment"), ``superlink`` (the Fleet
address provisioned SuperNodes connect to; default: this SuperLink). The Redis URL comes only
from the environment (CURTAIL_REDIS_URL), never from the run-config.

Progress, configuration errors and stops: pilot/flower/app_runtime.py.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from pilot.control.run_config import load_run_config
    from pilot.flower.app_runtime import (
        check_prepared,
        configuration_errors,
        graceful_stop,
        open_signals,
        setup_logging,
    )
    from pilot.flower.loop import ElasticStrategy

    setup_logging()
    with configuration_errors():
        cfg = load_run_config(context.run_config)
        check_prepared(cfg)
        signals = open_signals(cfg.name)
    with graceful_stop():
        reason = ElasticStrategy(grid, cfg, signals).run()
        logging.getLogger(__name__).info("run %s ended: %s (%s)", cfg.name, reason, cfg.run_dir)
