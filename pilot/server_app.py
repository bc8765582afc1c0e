"""Flower ServerApp: wiring only — config, Redis, then pilot.strategy's control loop.

Run-config keys (pyproject ``[tool.flwr.app.config]``, overridable with ``--run-config``):
``preset`` (a configs/ name or a TOML path), ``run-name``, ``num-iterations`` (0: the
preset's), ``sites`` (a sites TOML instead of the preset's), ``superlink`` (the Fleet
address provisioned SuperNodes connect to; default: this SuperLink). The Redis URL comes only
from the environment (CURTAIL_REDIS_URL), never from the run-config.
"""

from __future__ import annotations

import logging
import os

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from pilot.signals import ENV_URL, Signals, connect
    from pilot.strategy import ElasticStrategy, load_run_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_run_config(context.run_config)
    if not os.environ.get(ENV_URL):
        raise ValueError(
            f"{ENV_URL} is not set: the ServerApp needs the run's Redis "
            "(start the SuperLink with it in its environment)"
        )
    signals = Signals(connect(), cfg.name)
    reason = ElasticStrategy(grid, cfg, signals).run()
    logging.getLogger(__name__).info("run %s ended: %s (%s)", cfg.name, reason, cfg.run_dir)
