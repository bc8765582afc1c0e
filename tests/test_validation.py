"""The global model's validation: the baseline's measurement, in a background thread, in
round order, recorded as events and metrics rows."""

import json

import torch

from nanochat.tokenizer import Tokenizer
from nanochat.train import TrainConfig, build_model, val_bpb
from pilot.control.validation import RoundValidation, Validation
from pilot.events.log import EventLog
from pilot.infra.runlog import RunLog


def _cfg(tokenizer_dir) -> TrainConfig:
    vocab = Tokenizer.load(tokenizer_dir).vocab_size
    return TrainConfig(
        depth=1, vocab_size=vocab, sequence_len=64, device_batch_size=2, eval_tokens=512
    )


def test_background_validation_equals_the_baselines_bpb_and_keeps_round_order(
    demo_data, tokenizer_dir, tmp_path
):
    cfg = _cfg(tokenizer_dir)
    model, _ = build_model(cfg)
    expected = val_bpb(model, Tokenizer.load(tokenizer_dir), demo_data, cfg)
    events = EventLog(tmp_path / "events.jsonl", lambda: 123.0)
    runlog = RunLog(tmp_path)
    hook = RoundValidation(cfg.to_dict(), demo_data, tokenizer_dir, events, runlog)
    state = model.state_dict()
    hook.after_round(Validation(1, 10.0, 4, 256, {"round": 1, "loss": 6.0}), state)
    hook.after_round(Validation(2, 20.0, 4, 256, {"round": 2, "loss": None}), None)
    with torch.no_grad():  # the snapshot was taken at submit: later changes do not leak in
        for p in model.parameters():
            p.add_(1.0)
    hook.after_round(Validation(3, 30.0, 8, 512, {"round": 3, "loss": 5.0}), state)
    hook.close()
    evs = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["round"], e["model_t"]) for e in evs] == [
        ("validation", 1, 10.0),
        ("validation", 3, 30.0),
    ]
    assert evs[0]["bpb"] == expected and evs[0]["eval_tokens"] == 512
    assert evs[1]["bpb"] != expected  # the model changed before round 3 was submitted
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0]["val_bpb"] == expected and "val_bpb" not in rows[1]


def test_zero_eval_tokens_turns_validation_off_and_logs_rows_at_once(
    demo_data, tokenizer_dir, tmp_path
):
    cfg = _cfg(tokenizer_dir)
    cfg.eval_tokens = 0
    events = EventLog(tmp_path / "events.jsonl", lambda: 0.0)
    hook = RoundValidation(cfg.to_dict(), demo_data, tokenizer_dir, events, RunLog(tmp_path))
    hook.after_round(Validation(1, 1.0, 1, 64, {"round": 1, "loss": 6.0}), {})
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    hook.close()
    assert not (tmp_path / "events.jsonl").exists()
