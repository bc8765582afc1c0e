"""scripts/: tokenizer training, baseline training with checkpoint + resume, checkpoint loss."""

from nanochat import checkpoint
from scripts import base_loss, base_train, tok_train


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
