"""Run metrics: always local CSV + JSONL; Weights & Biases (real wandb, offline) when asked."""

import csv
import json

import pytest

from pilot.infra.runlog import RunLog

ROWS = [
    {"round": 1, "t": 10.0, "global_step": 4, "tokens": 2048, "loss": 6.25, "sites": "texas",
     "committed_rows": 12},
    {"round": 2, "t": 20.0, "global_step": 9, "tokens": 4608, "loss": 5.5,
     "sites": "texas,california", "committed_rows": 30, "extra": "kept in jsonl only"},
]  # fmt: skip


def test_disabled_wandb_still_writes_every_row_to_csv_and_jsonl(tmp_path):
    log = RunLog(tmp_path / "run")
    for row in ROWS:
        log.log(row)
    log.close()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == ROWS
    with (tmp_path / "run" / "metrics.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["global_step"] for r in table] == ["4", "9"]
    assert table[1]["sites"] == "texas,california" and "extra" not in table[1]
    assert not (tmp_path / "run" / "wandb").exists()


def test_offline_wandb_records_the_metrics_for_a_later_sync(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = RunLog(tmp_path / "run", mode="offline", name="runlog-test", config={"depth": 4})
    for row in ROWS:
        log.log(row)
    log.close()
    (record,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-runlog-test.wandb")
    data = record.read_bytes()  # protobuf records: history keys and JSON values in clear
    assert b"committed_rows" in data and b"5.5" in data
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_unknown_wandb_mode_is_refused():
    with pytest.raises(ValueError, match="use disabled, offline or online"):
        RunLog("/nonexistent", mode="cloud")
