"""Flower ClientApp of a site: wiring between Flower messages and pilot.flower.train_job.

Messages: pilot/flower/messages.py (SiteInfo for ``query``; TrainOrder in, TrainReport out for
``train``), the one definition the ServerApp uses too.

Node config (``flower-supernode --node-config``): ``site`` (required), ``state-dir``
(node-local inner optimizer state; default CURTAIL_HOME/nodes/<site>) and ``cpu-threads``
(torch threads when training on the CPU; 0 or absent: all cores). Every message runs in
a fresh process, so torch and nanochat are imported inside the handlers, and ``query`` does
not import torch at all.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from pilot.flower.messages import SiteInfo, TrainOrder

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
    info = SiteInfo(site=_site(context), device="cuda" if gpus else "cpu", gpus=gpus)
    return Message(info.to_record(), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from nanochat.paths import resolve
    from pilot.control.aggregate import decode_state, encode_state, transfer_dtype
    from pilot.flower.train_job import Job, run_job

    site = _site(context)
    order = TrainOrder.from_message(msg)
    node = context.node_config
    state_dir = resolve(str(node.get("state-dir") or f"nodes/{site}"))
    job = Job(
        **{f.name: getattr(order, f.name) for f in fields(order)},
        site=site,
        state_dir=str(state_dir / order.run),
        cpu_threads=int(node.get("cpu-threads", 0)),
    )
    job.data_dir, job.tokenizer_dir = str(resolve(job.data_dir)), str(resolve(job.tokenizer_dir))
    state, report = run_job(job, decode_state(msg.content["model"]))
    model = encode_state(state, transfer_dtype(order.transfer_dtype))
    return Message(report.to_record(model), reply_to=msg)
