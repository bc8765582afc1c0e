"""scripts/: tokenizer training, baseline training with checkpoint + resume, checkpoint loss."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat import checkpoint
from scripts import base_loss, base_train, tok_train

REPO = Path(__file__).resolve().parents[1]


def test_tok_train_reports_compression(demo_data, tmp_path, capsys):
    assert (
        tok_train.main(
            ["--data-dir", str(demo_data), "--out", str(tmp_path), "--vocab-size", "512"]
        )
        == 0
    )
    assert "bytes/token" in capsys.readouterr().out
    assert (tmp_path / "tokenizer.json").is_file()


def test_base_train_resume_and_base_loss(demo_data, tokenizer_dir, tmp_path, capsys):
    common = [
        "--data-dir", str(demo_data), "--tokenizer-dir", str(tokenizer_dir), "--run-dir", str(tmp_path),
        "--depth", "2", "--sequence-len", "64", "--device-batch-size", "4", "--total-batch-size", "256",
        "--num-iterations", "6", "--eval-every", "3", "--eval-tokens", "512", "--save-every", "3",
        "--threads", "1", "--device", "cpu",
    ]  # fmt: skip
    assert base_train.main(["--", *common, "--max-steps", "3"]) == 0
    assert checkpoint.load(tmp_path)[2]["step"] == 3
    assert base_train.main([*common, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed" in out and "global step 6/6" in out
    meta = checkpoint.load(tmp_path)[2]
    assert [h["step"] for h in meta["history"]] == [0, 3, 6]
    args = [
        "--checkpoint",
        str(tmp_path),
        "--data-dir",
        str(demo_data),
        "--tokenizer-dir",
        str(tokenizer_dir),
    ]
    assert base_loss.main([*args, "--eval-tokens", "512", "--threads", "1", "--device", "cpu"]) == 0
    assert "val bpb" in capsys.readouterr().out
    assert base_train.main([*common, "--run-dir", str(tmp_path / "none"), "--resume"]) == 2


def _torchrun(args: list[str]) -> dict[int, float]:
    """Run scripts.base_train under torchrun with 2 CPU processes (gloo); returns the
    training loss printed for each global step."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, "-m", "scripts.base_train", "--", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {
        int(m[1]): float(m[2]) for m in re.finditer(r"step +(\d+)/\d+ \| loss (\S+)", proc.stdout)
    }


@pytest.mark.tier2  # two torchrun launches of two ranks each: the slower tier (make test-slow)
def test_torchrun_two_gloo_processes_resume_with_the_same_next_batch(
    demo_data, tokenizer_dir, tmp_path
):
    """The baseline under torchrun (2 ranks, gloo): stopped at step 3 and resumed from its
    checkpoint, it trains steps 4-6 on the same batches as an uninterrupted run (identical
    losses: no jump), and the loss falls."""
    common = [
        "--data-dir", str(demo_data), "--tokenizer-dir", str(tokenizer_dir), "--depth", "2",
        "--sequence-len", "64", "--device-batch-size", "4", "--total-batch-size", "512",
        "--num-iterations", "6", "--eval-every", "6", "--eval-tokens", "512", "--save-every", "3",
        "--log-every", "1", "--threads", "1", "--device", "cpu",
    ]  # fmt: skip
    straight = _torchrun([*common, "--run-dir", str(tmp_path / "straight")])
    first = _torchrun([*common, "--run-dir", str(tmp_path / "resumed"), "--max-steps", "3"])
    second = _torchrun([*common, "--run-dir", str(tmp_path / "resumed"), "--resume"])
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]
    assert sorted(first) == [1, 2, 3] and sorted(second) == [4, 5, 6]
    for step, loss in {**first, **second}.items():
        assert loss == pytest.approx(straight[step], abs=1e-4), step
    assert straight[6] < straight[1]
