"""Flower ClientApp of a site: wiring between Flower messages and pilot.flower.train_job.

Messages: pilot/flower/messages.py (SiteInfo for ``query``; TrainOrder in, TrainReport out for
``train``), the one definition the ServerApp uses too.

Node config (``flower-supernode --node-config``): ``site`` (required), ``state-dir``
(node-local inner optimizer state; default CURTAIL_HOME/nodes/<site>), ``cpu-threads``
(torch threads when training on the CPU; 0 or absent: all cores) and ``trainer``:
``persistent`` (default: the round runs in the node's long-lived trainer,
pilot.flower.trainer, which keeps the model warm between rounds) or ``per-message`` (the round
runs in this process). Flower starts a fresh process per message, so this module imports no
torch: the relay passes the model's raw bytes through.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from pilot.flower.messages import SiteInfo, TrainOrder, TrainReport
from pilot.flower.trainer.channel import Job

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


def _node(context: Context) -> tuple[Path, int, str]:
    """(node dir, CPU threads, trainer mode) from the node config."""
    from nanochat.paths import resolve

    node = context.node_config
    node_dir = resolve(str(node.get("state-dir") or f"nodes/{_site(context)}"))
    mode = str(node.get("trainer", "persistent"))
    if mode not in ("persistent", "per-message"):
        raise ValueError(f"node config trainer={mode!r}: use 'persistent' or 'per-message'")
    return node_dir, int(node.get("cpu-threads", 0)), mode


@app.query()
def query(msg: Message, context: Context) -> Message:
    gpus = _gpu_count()
    info = SiteInfo(site=_site(context), device="cuda" if gpus else "cpu", gpus=gpus)
    node_dir, threads, mode = _node(context)
    if mode == "persistent":  # the server is about to use this node: warm its trainer up
        from pilot.flower.trainer.relay import start_soon

        start_soon(node_dir, threads)
    return Message(info.to_record(), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from nanochat.paths import resolve
    from pilot.control.wire import raw_to_record, record_to_raw

    order = TrainOrder.from_message(msg)
    node_dir, threads, mode = _node(context)
    job = Job(
        **asdict(order),
        site=_site(context),
        state_dir=str(node_dir / order.run),
        cpu_threads=threads,
    )
    job.data_dir, job.tokenizer_dir = str(resolve(job.data_dir)), str(resolve(job.tokenizer_dir))
    arrays = record_to_raw(msg.content["model"])
    if mode == "persistent":
        from pilot.flower.trainer.relay import train as relay_train

        fields, out = relay_train(node_dir, asdict(job), arrays, threads)
        report = TrainReport(**fields)
    else:
        report, out = _train_here(job, arrays)
    return Message(report.to_record(raw_to_record(out)), reply_to=msg)


def _train_here(job: Job, arrays: list) -> tuple[TrainReport, list]:
    """The round in this process: imports torch and builds the model for this one message (an
    int8 update's rounding error is not carried to the next round: no process outlives it)."""
    from pilot.control.aggregate import decode_arrays
    from pilot.control.updates import encode_update
    from pilot.flower.train_job import run_job

    base = decode_arrays(arrays)
    state, report = run_job(job, base, received_at=time.time())
    return report, encode_update(base, state, job.update_dtype)
