"""Flower ClientApp of a site: wiring between Flower messages and pilot.trainjob.

Messages (docs/ARCHITECTURE.md, "Flower messages"):

- ``query``: reply ``ConfigRecord "site"`` = {site, device, gpus}.
- ``train``: content ``ArrayRecord "model"`` + ``ConfigRecord "config"`` = {run, round,
  global_step, deadline_wall, assignment (JSON), train_config (JSON), transfer_dtype,
  data_dir, tokenizer_dir, max_steps}. Reply ``ArrayRecord "model"`` (same transfer dtype),
  ``MetricRecord "metrics"`` = {tokens, steps, loss, energy_j (-1: not measured),
  cropped_tokens},
  ``ConfigRecord "report"`` = {site, consumed (JSON), intervals (JSON [[start, end]] wall
  seconds), stopped_by, start_step, end_step, losses (JSON), device, world}.

Node config (``flower-supernode --node-config``): ``site`` (required), ``state-dir``
(node-local inner optimizer state; default CURTAIL_HOME/nodes/<site>) and ``cpu-threads``
(torch threads when training on the CPU; 0 or absent: all cores). Every message runs in
a fresh process, so torch and nanochat are imported inside the handlers, and ``query`` does
not import torch at all.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _site(context: Context) -> str:
    site = context.node_config.get("site")
    if not site:
        raise ValueError(
            "this SuperNode has no site name: start it with --node-config 'site=\"<name>\"'"
        )
    return str(site)


def _gpu_count() -> int:
    """GPUs this node may use, without importing torch (a QUERY should be quick): the
    provisioner's CUDA_VISIBLE_DEVICES, else the NVIDIA driver's device list."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


@app.query()
def query(msg: Message, context: Context) -> Message:
    gpus = _gpu_count()
    info = ConfigRecord({"site": _site(context), "device": "cuda" if gpus else "cpu", "gpus": gpus})
    return Message(RecordDict({"site": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from nanochat.common import resolve
    from pilot.aggregate import decode_state, encode_state, transfer_dtype
    from pilot.trainjob import Job, run_job

    site = _site(context)
    cfg = msg.content["config"]
    dtype = transfer_dtype(str(cfg["transfer_dtype"]))
    node = context.node_config
    state_dir = resolve(str(node.get("state-dir") or f"nodes/{site}"))
    max_steps = int(cfg["max_steps"])
    job = Job(
        site=site,
        run=str(cfg["run"]),
        round=int(cfg["round"]),
        global_step=int(cfg["global_step"]),
        deadline_wall=float(cfg["deadline_wall"]),
        assignment=json.loads(str(cfg["assignment"])),
        train_config=json.loads(str(cfg["train_config"])),
        data_dir=str(resolve(str(cfg["data_dir"]))),
        tokenizer_dir=str(resolve(str(cfg["tokenizer_dir"]))),
        state_dir=str(state_dir / str(cfg["run"])),
        max_steps=max_steps if max_steps > 0 else None,
        cpu_threads=int(node.get("cpu-threads", 0)),
    )
    state, res = run_job(job, decode_state(msg.content["model"]))
    metrics = MetricRecord(
        {
            "tokens": res.tokens,
            "steps": res.steps,
            "loss": res.loss if math.isfinite(res.loss) else -1.0,
            "energy_j": res.energy_j if res.energy_j is not None else -1.0,
            # the tail of documents that did not fit a BOS-aligned row: read, never trained on
            # read, not trained on: cut off by the packing, or still held by best-fit at the end
            "cropped_tokens": int(
                res.stats.get("cropped_tokens", 0) + res.stats.get("held_tokens", 0)
            ),
        }
    )
    report = ConfigRecord(
        {
            "site": site,
            "consumed": json.dumps(res.consumed),
            "intervals": json.dumps([[res.started_at, res.ended_at]] if res.steps else []),
            "stopped_by": res.stopped_by,
            "start_step": res.start_step,
            "end_step": res.end_step,
            "losses": json.dumps(res.losses),
            "device": res.device,
            "world": res.world,
        }
    )
    return Message(
        RecordDict({"model": encode_state(state, dtype), "metrics": metrics, "report": report}),
        reply_to=msg,
    )
