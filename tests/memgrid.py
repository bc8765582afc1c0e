"""An in-memory Flower Grid for the control loop's fast tests: SuperNodes that answer a QUERY
and a TRAIN at once, through the real message codec (pilot.flower.messages), without a
SuperLink, a SuperNode process or a training step.

A fake site "trains" until its deadline or its stop key: it returns the global weights it was
sent nudged by ``delta``, and reads every row of its lease (so the data ledger commits them).
``bad`` makes its next reply malformed (a NaN loss, a tensor of the wrong shape, more tokens
than its steps train), to prove a bad site is dropped."""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Message

from pilot.control.aggregate import decode_state, encode_arrays
from pilot.control.data_ledger import chunk_key
from pilot.control.updates import UPDATE_DTYPES, encode_update
from pilot.control.wire import raw_to_record
from pilot.flower.messages import SiteInfo, TrainOrder, TrainReport

STEP_S = 0.02  # wall seconds a fake step "takes"


@dataclass
class FakeSite:
    name: str
    delta: float = 0.01
    bad: str = ""  # the next reply: "nan" loss, "shape" of a tensor wrong, "tokens" inflated
    orders: list[TrainOrder] = field(default_factory=list)


@dataclass
class _Pending:
    msg: Message
    node: int
    started: float


class MemGrid:
    """The three Grid calls the control loop makes: get_node_ids, push_messages, pull_messages."""

    def __init__(self, sig: Any):
        self.sig = sig  # the run's Signals: a fake site honours its stop key like a real one
        self.nodes: dict[int, FakeSite] = {}
        self.pending: dict[str, _Pending] = {}
        self._ids = itertools.count(101)

    def connect(self, site: FakeSite) -> int:
        nid = next(self._ids)
        self.nodes[nid] = site
        return nid

    def disconnect(self, site: str) -> None:
        for nid in [n for n, s in self.nodes.items() if s.name == site]:
            del self.nodes[nid]

    # -- the Grid API ---------------------------------------------------------------------
    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, msgs: list[Message]) -> list[str]:
        ids = []
        for msg in msgs:
            if msg.metadata.dst_node_id not in self.nodes:
                ids.append("")
                continue
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            self.pending[mid] = _Pending(msg, msg.metadata.dst_node_id, time.time())
            ids.append(mid)
        return ids

    def pull_messages(self, ids: list[str]) -> list[Message]:
        out = []
        for mid in ids:
            p = self.pending.get(mid)
            if p is None or p.node not in self.nodes:
                continue  # a dead node never answers
            reply = self._answer(self.nodes[p.node], p)
            if reply is not None:
                del self.pending[mid]
                out.append(reply)
        return out

    # -- the fake SuperNode -----------------------------------------------------------------
    def _answer(self, site: FakeSite, p: _Pending) -> Message | None:
        if p.msg.metadata.message_type == "query":
            info = SiteInfo(site=site.name, device="cpu", gpus=0)
            return Message(info.to_record(), reply_to=p.msg)
        order = TrainOrder.from_message(p.msg)
        stop = self.sig.stop_reason(site.name)
        now = time.time()
        if stop is None and now < order.deadline_wall:
            return None  # still "training"
        site.orders.append(order)
        steps = max(1, int((min(now, order.deadline_wall) - p.started) / STEP_S))
        base = decode_state(p.msg.content["model"])
        state = {k: v + site.delta if v.is_floating_point() else v for k, v in base.items()}
        loss = 6.0 - 0.001 * (order.global_step + steps)
        if site.bad == "nan":
            loss = float("nan")
        arrays = encode_update(base, state, order.update_dtype)
        if site.bad == "shape":
            name = next(k for k, v in state.items() if v.is_floating_point())
            wrong = encode_arrays({name: torch.zeros(3, 3)}, UPDATE_DTYPES[order.update_dtype])
            arrays = [wrong[0] if a[0] == name else a for a in arrays]
        tokens = steps * int(order.train_config["total_batch_size"])
        if site.bad == "tokens":  # claims 10x the work: 10x the weight in the average
            tokens *= 10
        site.bad = ""
        report = TrainReport(
            site=site.name,
            tokens=tokens,
            steps=steps,
            loss=loss,
            energy_j=None,
            cropped_tokens=0,
            consumed=_read_all(order.assignment),
            intervals=[(p.started, min(now, order.deadline_wall))],
            stopped_by="stop" if stop is not None else "deadline",
            start_step=order.global_step,
            end_step=order.global_step + steps,
            losses=[loss] * steps,
        )
        return Message(report.to_record(raw_to_record(arrays)), reply_to=p.msg)


def _read_all(assignment: dict) -> dict[str, int]:
    """Every row of the lease read: chunk key -> its end row."""
    return {chunk_key(c[0], c[1]): int(c[2]) for c in assignment["chunks"]}
