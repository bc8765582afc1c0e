"""What crosses the wire between the ServerApp and a site's ClientApp, defined once for both.

- ``query`` -> reply ``SiteInfo`` (ConfigRecord "site").
- ``train``: ``TrainOrder`` (ConfigRecord "config") + the model (ArrayRecord "model") ->
  reply ``TrainReport`` (MetricRecord "metrics" + ConfigRecord "report") + the model.

Fields are typed Flower record values; "none" is an absent key, never a sentinel number
(a NaN loss stays NaN, so the server can refuse it). The data lease stays JSON: its chunks
are nested lists, which a ConfigRecord cannot hold. Decoding checks every field and raises
``MessageError`` naming the one that is wrong, so a bad reply is dropped, never trusted.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict


class MessageError(ValueError):
    """A message that is not what the protocol says (torch-free: a QUERY imports no torch)."""


def _get(record: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    try:
        value = record[key]
    except KeyError:
        raise MessageError(f"{where}: missing {key!r}") from None
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise MessageError(f"{where}: {key}={value!r} is not {kind}")
    return value


def _seconds(record: Any, key: str, where: str, default: float | None) -> float | None:
    """An optional non-negative finite number of seconds (or a timestamp) from ``record``."""
    if key not in record:
        return default
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MessageError(f"{where}: {key}={value!r} is not a number")
    if not math.isfinite(value) or value < 0:
        raise MessageError(f"{where}: implausible {key}={value!r}")
    return float(value)


def _record(obj: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """The dataclass's fields in ``names`` that are not None (none = absent)."""
    return {n: getattr(obj, n) for n in names if getattr(obj, n) is not None}


@dataclass(frozen=True)
class SiteInfo:
    site: str
    device: str  # "cuda" | "cpu"
    gpus: int

    def to_record(self) -> RecordDict:
        return RecordDict({"site": ConfigRecord(asdict(self))})

    @classmethod
    def from_message(cls, msg: Message) -> SiteInfo:
        rec = msg.content["site"]
        return cls(
            site=_get(rec, "site", str, "QUERY reply"),
            device=_get(rec, "device", str, "QUERY reply"),
            gpus=_get(rec, "gpus", int, "QUERY reply"),
        )


@dataclass
class TrainOrder:
    """What the server asks of a site for one round."""

    run: str
    round: int
    global_step: int  # the step the site's schedule starts at
    deadline_wall: float  # the site stops stepping at this wall time
    assignment: dict  # pilot.control.data_ledger.Assignment.to_dict(): the lease to read
    train_config: dict  # nanochat.train.TrainConfig fields
    transfer_dtype: str
    data_dir: str  # CURTAIL_HOME-relative unless absolute; resolved on the site
    tokenizer_dir: str
    max_steps: int | None = None  # the run's step budget left (None: no budget)
    update_dtype: str = "bf16"  # what the site's pseudo-gradient travels in (control/updates)

    def to_record(self, model: Any) -> RecordDict:
        config = {f.name: getattr(self, f.name) for f in fields(self)}
        config["assignment"] = json.dumps(self.assignment)
        config["train_config"] = json.dumps(self.train_config)
        if self.max_steps is None:
            del config["max_steps"]
        return RecordDict({"model": model, "config": ConfigRecord(config)})

    @classmethod
    def from_message(cls, msg: Message) -> TrainOrder:
        cfg, where = msg.content["config"], "TRAIN"
        max_steps = cfg["max_steps"] if "max_steps" in cfg else None
        return cls(
            run=_get(cfg, "run", str, where),
            round=_get(cfg, "round", int, where),
            global_step=_get(cfg, "global_step", int, where),
            deadline_wall=float(_get(cfg, "deadline_wall", (int, float), where)),
            assignment=json.loads(_get(cfg, "assignment", str, where)),
            train_config=json.loads(_get(cfg, "train_config", str, where)),
            transfer_dtype=_get(cfg, "transfer_dtype", str, where),
            data_dir=_get(cfg, "data_dir", str, where),
            tokenizer_dir=_get(cfg, "tokenizer_dir", str, where),
            max_steps=None if max_steps is None else int(max_steps),
            update_dtype=_get(cfg, "update_dtype", str, where),
        )


_METRICS = (
    "tokens",
    "steps",
    "loss",
    "energy_j",
    "cropped_tokens",
    "received_at",
    "save_wait_s",
    "warmup_s",
)


@dataclass
class TrainReport:
    """What a site did with a TRAIN order (its weights travel beside it)."""

    site: str
    tokens: int
    steps: int
    loss: float | None  # mean training loss of its steps (None: no step ran)
    energy_j: float | None  # measured over the job (None: not measurable there)
    cropped_tokens: int  # read but never trained on: cut by the packing, or still held
    consumed: dict[str, int]  # absolute row offsets per chunk key, for the data ledger
    intervals: list[tuple[float, float]]  # wall [start, end) of its training
    stopped_by: str  # deadline | stop | data | steps | round_end
    start_step: int
    end_step: int
    losses: list[float] = field(default_factory=list)  # per step
    device: str = "cpu"
    world: int = 1
    inner_restored: bool = False  # the site's inner optimizer state was reused (not fresh)
    # measured in the trainer, for the goodput report: when the order was in (wall), how long
    # it waited for the last round's inner state to reach disk, and the first step's excess
    # over a typical step (compilation, allocator warm-up)
    received_at: float | None = None
    save_wait_s: float = 0.0
    warmup_s: float = 0.0

    def to_record(self, model: Any) -> RecordDict:
        metrics = _record(self, _METRICS)
        report = {
            "site": self.site,
            "consumed_keys": list(self.consumed),
            "consumed_rows": [int(v) for v in self.consumed.values()],
            "interval_bounds": [float(x) for iv in self.intervals for x in iv],
            "stopped_by": self.stopped_by,
            "start_step": self.start_step,
            "end_step": self.end_step,
            "losses": [float(x) for x in self.losses],
            "device": self.device,
            "world": self.world,
            "inner_restored": self.inner_restored,
        }
        return RecordDict(
            {"model": model, "metrics": MetricRecord(metrics), "report": ConfigRecord(report)}
        )

    @classmethod
    def from_message(cls, msg: Message) -> TrainReport:
        """The reply's report, checked field by field (MessageError on anything malformed)."""
        try:
            metrics, report = msg.content["metrics"], msg.content["report"]
        except KeyError as e:
            raise MessageError(f"TRAIN reply without its {e} record") from None
        m, r = "TRAIN reply metrics", "TRAIN reply report"
        keys = _get(report, "consumed_keys", list, r)
        rows = _get(report, "consumed_rows", list, r)
        bounds = [float(x) for x in _get(report, "interval_bounds", list, r)]
        if len(keys) != len(rows) or len(bounds) % 2:
            raise MessageError(f"{r}: consumed or intervals of mismatched lengths")
        loss = float(metrics["loss"]) if "loss" in metrics else None
        energy = float(metrics["energy_j"]) if "energy_j" in metrics else None
        return cls(
            site=_get(report, "site", str, r),
            tokens=_get(metrics, "tokens", int, m),
            steps=_get(metrics, "steps", int, m),
            loss=loss,
            energy_j=energy,
            cropped_tokens=max(0, int(metrics.get("cropped_tokens", 0))),
            consumed={str(k): int(v) for k, v in zip(keys, rows, strict=True)},
            intervals=list(zip(bounds[0::2], bounds[1::2], strict=True)),
            stopped_by=_get(report, "stopped_by", str, r),
            start_step=_get(report, "start_step", int, r),
            end_step=_get(report, "end_step", int, r),
            losses=[float(x) for x in _get(report, "losses", list, r)],
            device=_get(report, "device", str, r),
            world=_get(report, "world", int, r),
            inner_restored=bool(report.get("inner_restored", False)),
            received_at=_seconds(metrics, "received_at", m, None),
            save_wait_s=_seconds(metrics, "save_wait_s", m, 0.0),
            warmup_s=_seconds(metrics, "warmup_s", m, 0.0),
        )

    def check(self, site: str, order_step: int, tokens_per_step: int, max_steps: int) -> None:
        """Refuse what no honest site sends: another site's name; work that does not add up
        (tokens other than steps x ``tokens_per_step``: they weigh the average; steps
        beyond the order's ``max_steps``, or not counted from its ``order_step``: they
        advance the global step and can end the run); a non-finite loss for its steps."""
        if self.site != site:
            raise MessageError(f"reply from node of {site!r} claims site {self.site!r}")
        if self.steps < 0 or self.tokens != self.steps * tokens_per_step:
            raise MessageError(
                f"implausible metrics tokens={self.tokens} steps={self.steps} "
                f"({tokens_per_step} tokens per step)"
            )
        if self.steps > max_steps:
            raise MessageError(f"{self.steps} steps, but the order allowed {max_steps}")
        if self.start_step != order_step or self.end_step != order_step + self.steps:
            raise MessageError(
                f"steps {self.start_step}..{self.end_step} do not follow the order's step "
                f"{order_step} by {self.steps}"
            )
        if self.steps > 0 and (self.loss is None or not math.isfinite(self.loss)):
            raise MessageError(f"implausible loss {self.loss} over {self.steps} steps")
        if self.energy_j is not None and not (math.isfinite(self.energy_j) and self.energy_j >= 0):
            raise MessageError(f"implausible energy {self.energy_j} J")
