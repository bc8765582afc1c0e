"""Hand a run's model on: its weights and tokenizer in the layout nanochat's own stack reads.

    python -m pilot.analysis.export RUN_DIR --to DIR [--round N | --step N] [--tokenizer DIR]
    curtail-llm export RUN_DIR --to DIR ...

RUN_DIR is a federated run (the ServerApp's aggregated checkpoints in RUN_DIR/checkpoint/) or
a scripts.base_train baseline (its step_*.pt in RUN_DIR itself); both arms are written alike,
so one external evaluation serves both. DIR becomes a NANOCHAT_BASE_DIR:

    DIR/base_checkpoints/d<depth>/model_<step:06d>.pt   the GPT's state_dict (fp32)
    DIR/base_checkpoints/d<depth>/meta_<step:06d>.json  "model_config" + training metadata
    DIR/tokenizer/tokenizer.pkl                         a pickled tiktoken.Encoding
    DIR/tokenizer/token_bytes.pt                        bytes per token id (0: special)

as karpathy/nanochat's checkpoint_manager.py (01f5f10) and tokenizer.py (031ee84) read them:
our GPT's state_dict has upstream's keys and shapes, so its build_model loads it strictly.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tomllib
from pathlib import Path
from typing import Any

import torch

from nanochat.checkpoint import CKPT_RE
from nanochat.gpt import GPT, GPTConfig
from nanochat.paths import atomic_write, resolve
from nanochat.tokenizer import Tokenizer


class ExportError(ValueError):
    """The run cannot be exported as asked; the message says why and what to do."""


def find_checkpoints(run_dir: Path) -> tuple[str, list[Path]]:
    """("federated" | "baseline", its checkpoint files, oldest first)."""
    if not run_dir.is_dir():
        raise ExportError(f"run dir {run_dir} does not exist")
    for kind, d in (("federated", run_dir / "checkpoint"), ("baseline", run_dir)):
        files = sorted(p for p in d.glob("step_*.pt") if CKPT_RE.match(p.name))
        if files:
            return kind, files
    raise ExportError(
        f"{run_dir} holds no aggregated checkpoint (checkpoint/step_*.pt) and no baseline one "
        "(step_*.pt): nothing to export until a round has been aggregated"
    )


def _load(path: Path) -> dict[str, Any]:
    try:  # mmap: picking a round reads only the metadata of the others
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        ours = isinstance(payload["model"], dict) and "step" in payload["meta"]
        why = "" if ours else "no weights or step in it"
    except Exception as e:  # a torn or foreign file fails in many ways, all meaning "unreadable"
        why = f"{type(e).__name__}: {e}"
    if why:
        raise ExportError(
            f"checkpoint {path} is corrupt or not ours ({why}); export another with --step/--round"
        )
    return payload


def select(files: list[Path], key: str | None, value: int | None) -> tuple[Path, dict]:
    """(path, payload) of the newest checkpoint, or of the kept one whose meta[key] == value."""
    kept = []
    for path in reversed(files):
        payload = _load(path)
        if key is None or payload["meta"].get(key) == value:
            return path, payload
        kept.append(payload["meta"].get(key))
    raise ExportError(f"no kept checkpoint has {key} {value}; kept: {sorted(kept)}")


def model_config(meta: dict, state: dict[str, torch.Tensor]) -> GPTConfig:
    """The GPTConfig the weights were trained with, checked against their keys and shapes."""
    if "model_config" in meta:  # the baseline records it
        cfg = GPTConfig(**meta["model_config"])
    else:  # the ServerApp builds its model from [train] (nanochat.train.build_model)
        from nanochat.train import TrainConfig
        from nanochat.train import model_config as train_model_config

        cfg = train_model_config(TrainConfig.from_dict(dict(meta["train_config"])))
    with torch.device("meta"):
        expected = GPT(cfg).state_dict()
    bad = sorted(set(expected) ^ set(state)) or [
        k for k, v in expected.items() if v.shape != state[k].shape
    ]
    if bad:
        raise ExportError(f"the weights do not fit model config {vars(cfg)}: {bad[:3]}")
    return cfg


def _events(run_dir: Path) -> tuple[list[dict], dict]:
    """The run's events and its (first) run_start event; none for a baseline."""
    from pilot.events.reader import load_events

    path = run_dir / "events.jsonl"
    events = load_events(path) if path.exists() else []
    return events, next((e for e in events if e.get("kind") == "run_start"), {})


def _path(p: str, run_dir: Path) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() or q.exists() else run_dir / q


def carbon(run_dir: Path, meta: dict, run_start: dict) -> dict[str, Any]:
    """Sites and energy/emissions of the carbon ledger as of this checkpoint, on the trace and
    sites config the run_start event names (what pilot.analysis.report would compute at that time)."""
    from pilot.config.sites import load_sites
    from pilot.energy.carbon import Ledger
    from pilot.energy.traces import load_trace

    ledger = Ledger.from_dict(meta["carbon_ledger"])
    out: dict[str, Any] = {"sites": sorted(ledger.train)}
    try:
        traces = run_start["trace"]
        trace = load_trace(
            [_path(p, run_dir) for p in (traces if isinstance(traces, list) else [traces])]
        )
        sites = load_sites(_path(run_start["sites"], run_dir))
        first, last = ledger.span()
        s = ledger.summary(
            trace,
            sites,
            start=max(first, trace.start),
            end=min(last, trace.end),
            threshold=float(run_start.get("threshold", sites.threshold)),
        )
    except (KeyError, TypeError, ValueError, OSError) as e:
        return out | {"emissions_kg": None, "emissions_note": f"not computed: {e}"}
    tot = s["total"]
    return out | {
        "energy_kwh": tot["energy_kwh"],
        "emissions_kg": tot["emissions_kg"],
        "curtailed_energy_share": tot["curtailed_energy_share"],
        "site_emissions_kg": {k: v["emissions_kg"] for k, v in s["sites"].items()},
    }


def _tokenizer_dir(kind: str, run_start: dict) -> Path:
    if kind == "baseline":  # not recorded in its checkpoint: base_train's default
        return resolve("tokenizer")
    try:  # the preset the ServerApp ran names it ([launch] tokenizer_dir)
        preset = tomllib.loads(Path(run_start["preset"]).read_text())
        return resolve(preset["launch"]["tokenizer_dir"])
    except (KeyError, OSError, tomllib.TOMLDecodeError):
        raise ExportError(
            "the run's preset (run_start event) names no readable tokenizer: pass --tokenizer DIR"
        ) from None


def metadata(
    kind: str, run_dir: Path, path: Path, meta: dict, cfg: GPTConfig, events: list, run_start: dict
) -> dict:
    """meta_<step>.json: what nanochat reads (step, model_config, device_batch_size) plus
    where the model came from: run, rounds, tokens, sites and carbon as of this checkpoint."""
    train = meta.get("train_config", {})
    out = {
        "step": int(meta["step"]),
        "model_config": dict(vars(cfg)),
        "device_batch_size": train.get("device_batch_size"),  # upstream mid_train checks it
        "source": kind,
        "checkpoint": str(path),
        "train_config": train,
    }
    if kind == "baseline":
        history = [h for h in meta.get("history", []) if h.get("step") == meta["step"]]
        return out | {
            "run": run_dir.name,
            "tokens": int(meta["step"]) * int(train["total_batch_size"]),  # every step is full
            "val_bpb": history[-1]["val_bpb"] if history else None,
        }
    rounds = {e["round"] for e in events if e.get("kind") == "aggregate"}
    return out | {
        "run": meta["run"],
        "round": meta["round"],
        "rounds_aggregated": len({r for r in rounds if r <= meta["round"]}),
        "tokens": meta["tokens"],
        **carbon(run_dir, meta, run_start),
    }


def export(
    run_dir: str | Path,
    to: str | Path,
    *,
    round_n: int | None = None,
    step: int | None = None,
    tokenizer: str | Path | None = None,
    sequence_len: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write the run's newest (or chosen) checkpoint under `to`; returns the meta written."""
    if sequence_len is not None and sequence_len < 1:
        raise ExportError(f"--sequence-len must be positive, got {sequence_len}")
    run_dir = Path(run_dir).expanduser()
    if not run_dir.exists():
        run_dir = resolve(run_dir)  # as the launcher prints it: relative to $CURTAIL_HOME
    kind, files = find_checkpoints(run_dir)
    if round_n is not None and kind == "baseline":
        raise ExportError(f"{run_dir} is a baseline run: it has steps, not rounds (use --step)")
    key, value = ("round", round_n) if round_n is not None else ("step", step)
    path, payload = select(files, key if value is not None else None, value)
    state, (events, run_start) = payload["model"], _events(run_dir)
    try:
        cfg = model_config(payload["meta"], state)
        out = metadata(kind, run_dir, path, payload["meta"], cfg, events, run_start)
    except (KeyError, TypeError) as e:
        raise ExportError(f"checkpoint {path} lacks {e}: not written by this code") from None
    if sequence_len:
        # Positions are rotary (tables of 10x this length, no weights): a longer declared
        # context only lets nanochat's mid/SFT run at its own max_seq_len.
        out["model_config"]["sequence_len"] = sequence_len
    tok_dir = Path(tokenizer).expanduser() if tokenizer else _tokenizer_dir(kind, run_start)
    tok = Tokenizer.load(tok_dir)
    if tok.vocab_size != cfg.vocab_size:
        raise ExportError(
            f"tokenizer {tok_dir} has {tok.vocab_size} tokens, the model {cfg.vocab_size}: "
            "pass the run's tokenizer with --tokenizer DIR"
        )

    to = Path(to).expanduser()
    ckpt_dir, tok_out = to / "base_checkpoints" / f"d{cfg.n_layer}", to / "tokenizer"
    # nanochat loads the largest step of the largest d<N>: two runs in one dir would mix.
    old = [*to.glob("base_checkpoints/*/model_*.pt"), *to.glob("base_checkpoints/*/meta_*.json")]
    if (old or (tok_out / "tokenizer.pkl").exists()) and not force:
        raise ExportError(
            f"{to} already holds an export: give each run its own --to DIR, or --force to replace it"
        )
    for p in old:
        p.unlink()
    name = f"{out['step']:06d}"
    atomic_write(ckpt_dir / f"model_{name}.pt", lambda f: torch.save(dict(state), f))
    atomic_write(
        ckpt_dir / f"meta_{name}.json", lambda f: f.write(json.dumps(out, indent=2).encode())
    )
    atomic_write(tok_out / "tokenizer.pkl", lambda f: pickle.dump(tok.enc, f))
    # int32 as upstream's tok_train writes it; byte lengths of the raw tokens, 0 for specials
    atomic_write(
        tok_out / "token_bytes.pt", lambda f: torch.save(tok.token_bytes().to(torch.int32), f)
    )
    return out


def main(argv: list[str] | None = None, prog: str = "python -m pilot.analysis.export") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="a run dir: runs/<name> of a federated or a baseline run")
    p.add_argument("--to", required=True, help="output base dir (NANOCHAT_BASE_DIR)")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--round", type=int, help="a kept checkpoint of this round (federated)")
    pick.add_argument("--step", type=int, help="a kept checkpoint of this global step")
    p.add_argument(
        "--tokenizer",
        help="tokenizer dir (default: the run's preset's, or $CURTAIL_HOME/tokenizer)",
    )
    p.add_argument(
        "--sequence-len", type=int, help="context declared in model_config (default: trained)"
    )
    p.add_argument("--force", action="store_true", help="replace an earlier export in --to")
    args = p.parse_args(argv)
    try:
        meta = export(
            args.run_dir,
            args.to,
            round_n=args.round,
            step=args.step,
            tokenizer=args.tokenizer,
            sequence_len=args.sequence_len,
            force=args.force,
        )
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    where = "round {round}, ".format(**meta) if "round" in meta else ""
    print(
        f"exported {meta['source']} run {meta['run']} ({where}step {meta['step']}, "
        f"{meta['tokens']:,} tokens) to {args.to}"
    )
    if meta.get("emissions_note"):
        print(f"emissions {meta['emissions_note']}")
    print(
        f"evaluate: NANOCHAT_BASE_DIR={args.to} python -m scripts.base_eval  (in a nanochat checkout)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
