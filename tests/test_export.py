"""pilot.analysis.export: a finished run's model + tokenizer, loaded the way nanochat's own stack does.

The federated run is real but small: the ServerApp's strategy (real Valkey, no Flower) closes
two rounds in which two sites each train a depth-2 GPT with the site's own job code, so the
aggregated checkpoints are written by the strategy itself. The baseline is scripts.base_train.
`nanochat_load` restates upstream's loading steps (karpathy/nanochat checkpoint_manager.py
build_model / find_largest_model / find_last_step at 01f5f10, tokenizer.py get_tokenizer /
get_token_bytes at 031ee84), since the nanochat package cannot be installed here.
"""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sitesets import PRESET_HEAD, two_sites

from nanochat import checkpoint
from nanochat.dataloader import DataLoader
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer
from pilot.analysis import export
from pilot.launch import cli as launch

REPO = Path(__file__).resolve().parents[1]
RUN = "export-test"
T0 = 1_717_200_000.0  # trace start (sim seconds)
SAMPLE = "Hello, world! The 2024 run trained 123 steps\n\tin curtailment windows. ünïcödé ✓"

SITES = two_sites("prototype", delay_s=0, head='trace = "trace.csv"')

PRESET = (
    PRESET_HEAD
    + """[train]
depth = 2
vocab_size = 1024
sequence_len = 64
device_batch_size = 2
total_batch_size = 128
num_iterations = 100
seed = 3
"""
)


def nanochat_load(base_dir: Path) -> tuple[GPT, dict, object, torch.Tensor]:
    """Upstream's steps: the largest d<N> tag, its largest model_<step>.pt, meta json,
    GPTConfig(**meta["model_config"]), "_orig_mod." stripped, a meta-device model filled by a
    strict load; the tokenizer is the pickled tiktoken Encoding plus token_bytes.pt."""
    ckpts = base_dir / "base_checkpoints"
    tag = max((d.name for d in ckpts.iterdir() if d.is_dir()), key=lambda t: int(t[1:]))
    steps = [
        int(m[1]) for f in (ckpts / tag).iterdir() if (m := re.match(r"model_(\d+)\.pt$", f.name))
    ]
    step = max(steps)
    state = torch.load(ckpts / tag / f"model_{step:06d}.pt", map_location="cpu")
    meta = json.loads((ckpts / tag / f"meta_{step:06d}.json").read_text())
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    with torch.device("meta"):
        model = GPT(GPTConfig(**meta["model_config"]))
    model.to_empty(device="cpu")
    model.init_weights()  # upstream does this for the rotary buffers
    model.load_state_dict(state, strict=True, assign=True)
    with open(base_dir / "tokenizer" / "tokenizer.pkl", "rb") as f:
        enc = pickle.load(f)
    token_bytes = torch.load(base_dir / "tokenizer" / "token_bytes.pt", map_location="cpu")
    assert enc.n_vocab == meta["model_config"]["vocab_size"]  # upstream's sanity check
    return model.eval(), meta, enc, token_bytes


def our_model(ckpt: Path) -> GPT:
    state, _, meta = checkpoint.load(ckpt)
    t = meta["train_config"]
    model = GPT(GPTConfig.from_depth(t["depth"], t["vocab_size"], t["sequence_len"]))
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def loss_on_batch(model: GPT, tok: Tokenizer, data_dir: Path) -> float:
    x, y = next(iter(DataLoader(tok, data_dir, 2, 64, split="val")))
    return model(x, y).item()


def assert_tokenizer_matches(enc, token_bytes: torch.Tensor, tok: Tokenizer) -> None:
    bos = enc.encode_single_token("<|bos|>")  # how upstream's RustBPETokenizer finds it
    assert [bos, *enc.encode_ordinary(SAMPLE)] == tok.encode(SAMPLE, prepend="<|bos|>")
    assert {s: enc.encode_single_token(s) for s in SPECIAL_TOKENS} == tok.special_tokens
    assert enc.decode(enc.encode_ordinary(SAMPLE)) == SAMPLE
    assert token_bytes.dtype == torch.int32 and torch.equal(token_bytes.long(), tok.token_bytes())


@pytest.fixture(scope="module")
def fed_run(tmp_path_factory, redis_url, demo_data, tokenizer_dir) -> dict:
    """Two aggregated rounds of alpha + beta, checkpointed by ElasticStrategy.close_round."""
    from pilot.control.rounds import Reply, Round
    from pilot.control.run_config import load_run_config
    from pilot.energy.synthetic import synthetic
    from pilot.energy.traces import save_wide_csv
    from pilot.flower.loop import ElasticStrategy
    from pilot.flower.train_job import Job, run_job
    from pilot.infra.signals import Signals, connect

    tmp = tmp_path_factory.mktemp("fed")
    trace = synthetic(["RA", "RB"], hours=6, seed=1, start=T0, utc_offsets={"RA": 0, "RB": 0})
    save_wide_csv(trace, tmp / "trace.csv")
    (tmp / "sites.toml").write_text(SITES)
    preset = tmp / "preset.toml"
    preset.write_text(
        PRESET.format(
            sites=tmp / "sites.toml", data=demo_data, tok=tokenizer_dir, runs=tmp / "runs", run=RUN
        )
    )
    sig = Signals(connect(redis_url), RUN)
    sig.clear()
    sig.publish_meta(sim_start=T0, wall_start=time.time(), speedup=60.0, status="running")
    threads = torch.get_num_threads()  # the site job sets its own; later tests get ours back
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CURTAIL_REDIS_URL", redis_url)  # the site job's stop key and step logs
        cfg = load_run_config({"preset": str(preset)})
        strat = ElasticStrategy(None, cfg, sig)
        strat.load_state()
        ev = strat.events.emit
        ev("run_start", run=RUN, preset=str(preset), trace=str(tmp / "trace.csv"),
           sites=str(tmp / "sites.toml"), threshold=100.0, policy="forecast", t=T0)  # fmt: skip
        for site in ("alpha", "beta"):
            ev("provision_started", site=site, t=T0 + 600)
        for n in (1, 2):
            strat.state.round_n = n
            now = time.time()
            r = Round(
                n=n, start_wall=now, deadline_wall=now + 600, base_step=strat.state.global_step
            )
            for site in ("alpha", "beta"):
                lease = strat.state.ledger.assign(site, max_chunks=1)
                job = Job(RUN, n, strat.state.global_step, r.deadline_wall, lease.to_dict(),
                          cfg.train, "fp32", str(demo_data), str(tokenizer_dir), max_steps=2,
                          site=site, state_dir=str(tmp / site), cpu_threads=1)  # fmt: skip
                state, res = run_job(job, strat.state.model.weights)
                r.replies[site] = Reply(site, state, res.tokens, res.steps, res.loss, res.consumed)
                ev("train_interval", site=site, start=T0 + 1800 * n, end=T0 + 1800 * n + 1500)
            strat.rounds.round = r
            strat.close_round()
        for site in ("alpha", "beta"):
            ev("deprovision", site=site, reason="run ended", t=T0 + 6000)
        strat.runlog.close()
    torch.set_num_threads(threads)
    sig.clear()
    return {"dir": cfg.run_dir, "tokens": strat.state.tokens, "step": strat.state.global_step}


def test_federated_run_loads_in_nanochat_with_the_same_loss_and_token_ids(
    fed_run, demo_data, tokenizer_dir, tmp_path, capsys
):
    out = tmp_path / "nanochat"
    assert export.main([str(fed_run["dir"]), "--to", str(out)]) == 0
    assert f"step {fed_run['step']}" in capsys.readouterr().out
    model, meta, enc, token_bytes = nanochat_load(out)

    tok = Tokenizer.load(tokenizer_dir)
    ours = our_model(fed_run["dir"] / "checkpoint")
    diff = abs(loss_on_batch(model, tok, demo_data) - loss_on_batch(ours, tok, demo_data))
    assert diff < 1e-4
    assert_tokenizer_matches(enc, token_bytes, tok)
    assert meta["model_config"] == {
        "sequence_len": 64, "vocab_size": 1024, "n_layer": 2, "n_head": 1, "n_kv_head": 1, "n_embd": 128,
    }  # fmt: skip
    assert (out / "base_checkpoints" / "d2" / f"model_{fed_run['step']:06d}.pt").is_file()
    assert meta["source"] == "federated" and meta["run"] == RUN
    assert (meta["round"], meta["rounds_aggregated"]) == (2, 2)
    assert meta["tokens"] == fed_run["tokens"] == 2 * 2 * 2 * 128  # rounds x sites x steps x batch
    assert meta["sites"] == ["alpha", "beta"]
    assert meta["emissions_kg"] > 0 and meta["energy_kwh"] > 0
    assert set(meta["site_emissions_kg"]) == {"alpha", "beta"}


def test_round_option_exports_an_earlier_kept_round(fed_run, tmp_path, capsys):
    out = tmp_path / "r1"
    assert export.main([str(fed_run["dir"]), "--to", str(out), "--round", "1",
                        "--sequence-len", "2048"]) == 0  # fmt: skip
    model, meta, _, _ = nanochat_load(out)
    assert (meta["round"], meta["step"], meta["rounds_aggregated"]) == (1, 2, 1)
    assert meta["model_config"]["sequence_len"] == 2048 and model.rotary_seq_len == 20480
    assert export.main([str(fed_run["dir"]), "--to", str(out), "--round", "1"]) == 2
    assert "already holds an export" in capsys.readouterr().err
    assert export.main([str(fed_run["dir"]), "--to", str(out), "--round", "9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kept: [1, 2]" in err


def test_baseline_checkpoint_exports_through_curtail_llm_export(
    demo_data, tokenizer_dir, tmp_path, capsys
):
    from scripts import base_train

    run_dir, out = tmp_path / "runs" / "baseline", tmp_path / "nanochat"
    assert base_train.main([
        "--data-dir", str(demo_data), "--tokenizer-dir", str(tokenizer_dir), "--run-dir", str(run_dir),
        "--depth", "2", "--sequence-len", "64", "--device-batch-size", "2", "--total-batch-size", "128",
        "--num-iterations", "3", "--eval-every", "3", "--eval-tokens", "128", "--save-every", "3",
        "--threads", "1", "--device", "cpu",
    ]) == 0  # fmt: skip
    args = ["export", str(run_dir), "--to", str(out), "--tokenizer", str(tokenizer_dir)]
    assert launch.main(args) == 0
    model, meta, enc, token_bytes = nanochat_load(out)

    tok = Tokenizer.load(tokenizer_dir)
    diff = abs(
        loss_on_batch(model, tok, demo_data) - loss_on_batch(our_model(run_dir), tok, demo_data)
    )
    assert diff < 1e-4
    assert_tokenizer_matches(enc, token_bytes, tok)
    assert (meta["source"], meta["run"], meta["step"], meta["tokens"]) == (
        "baseline",
        "baseline",
        3,
        384,
    )
    assert meta["val_bpb"] > 0 and "round" not in meta
    capsys.readouterr()
    assert launch.main([*args[:2], "--to", str(tmp_path / "x"), "--round", "1"]) == 2
    assert "baseline run" in capsys.readouterr().err


def _corrupt(run_dir: Path) -> None:
    (run_dir / "checkpoint").mkdir(parents=True)
    (run_dir / "checkpoint" / "step_000000004.pt").write_bytes(b"PK\x03\x04 torn mid-write")


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda d: None, "does not exist"),
        (lambda d: (d.mkdir(), (d / "events.jsonl").write_text("")), "no aggregated checkpoint"),
        (_corrupt, "corrupt"),
    ],
    ids=["missing", "no-checkpoint", "corrupt"],
)
def test_unexportable_run_dir_is_refused_with_one_line_and_exit_2(make, why, tmp_path, capsys):
    run_dir = tmp_path / "run"
    make(run_dir)
    assert export.main([str(run_dir), "--to", str(tmp_path / "out")]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1 and why in cap.err
    assert not (tmp_path / "out").exists()


def test_python_m_pilot_export_refuses_a_run_without_checkpoint(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pilot.analysis.export",
            str(tmp_path),
            "--to",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.startswith("python -m pilot.analysis.export: error:")
        and proc.stderr.count("\n") == 1
    )
