"""The persistent trainer (pilot.flower.trainer), as a real process driven through the relay the
ClientApp uses: real corpus and tokenizer, a tiny GPT on CPU, a ``sleep`` standing in for the
SuperNode whose life bounds the trainer's."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import asdict
from multiprocessing.connection import Client

import pytest
import torch

from pilot.control.aggregate import encode_arrays
from pilot.control.data_ledger import DataLedger
from pilot.control.updates import decode_update
from pilot.flower.trainer import relay
from pilot.flower.trainer.channel import Endpoint, Job
from pilot.infra.procs import alive

TRAIN = {
    "depth": 2,
    "vocab_size": 1024,
    "sequence_len": 64,
    "device_batch_size": 2,
    "total_batch_size": 128,
    "num_iterations": 100_000,
    "seed": 3,
}


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A stand-in SuperNode process and its node dir, shared by the module's tests (each its
    own run) so that one trainer serves them; on exit the node goes and so must its trainer."""
    proc = subprocess.Popen(["sleep", "3600"])
    node_dir = tmp_path_factory.mktemp("trainer") / "node"
    yield proc, node_dir
    proc.kill()
    proc.wait()
    pid = _pid(node_dir)
    deadline = time.time() + 30
    while pid is not None and alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    assert pid is None or not alive(pid), "the trainer outlived its node"


def _pid(node_dir) -> int | None:
    try:
        return int(Endpoint(node_dir).pidfile.read_text())
    except (OSError, ValueError):
        return None


def _ledger(demo_data) -> DataLedger:
    from nanochat.dataset import chunk_table

    return DataLedger([(c.shard, c.row_group, c.rows) for c in chunk_table(demo_data)])


def _job(node_dir, demo_data, tokenizer_dir, ledger, round_n, step, steps=2, chunks=1, run="t"):
    lease = ledger.assign("alpha", max_chunks=chunks)
    return Job(run, round_n, step, time.time() + 600, lease.to_dict(), TRAIN, "fp32",
               str(demo_data), str(tokenizer_dir), max_steps=steps, site="alpha",
               state_dir=str(node_dir / run), cpu_threads=1)  # fmt: skip


def _weights() -> dict[str, torch.Tensor]:
    from nanochat.train import TrainConfig, build_model

    model, _ = build_model(TrainConfig.from_dict(TRAIN))
    return model.state_dict()


def _round(node, job, weights):
    """One order through the relay: (report fields, the site's model rebuilt from its update)."""
    proc, node_dir = node
    fields, out = relay.train(node_dir, asdict(job), encode_arrays(weights, torch.float32), 1,
                              node_pid=proc.pid)  # fmt: skip
    return fields, decode_update(out, weights, job.update_dtype)


def test_rounds_reuse_one_warm_trainer_and_its_inner_state(node, demo_data, tokenizer_dir):
    _, node_dir = node
    ledger, weights = _ledger(demo_data), _weights()
    first, w1 = _round(
        node, _job(node_dir, demo_data, tokenizer_dir, ledger, 1, 0, run="warm"), weights
    )
    pid = relay.hello(node_dir)["pid"]
    job = _job(node_dir, demo_data, tokenizer_dir, ledger, 2, 2, run="warm")
    job.update_dtype = "int8"  # the first round's update came back in bf16, this one in int8
    second, w2 = _round(node, job, w1)
    assert relay.hello(node_dir)["pid"] == pid  # the same process served both rounds
    assert (first["steps"], first["inner_restored"]) == (2, False)
    assert (second["steps"], second["start_step"], second["inner_restored"]) == (2, 2, True)
    assert set(w2) == set(weights) and all(torch.isfinite(t).all() for t in w2.values())
    assert not torch.equal(w2["lm_head.weight"], w1["lm_head.weight"])  # it trained from w1
    # the inner state also reaches node-local disk (written after the reply, off the training
    # path), for a trainer that starts over
    saved, deadline = node_dir / "warm" / "inner-rank0.pt", time.time() + 60
    while not saved.is_file() and time.time() < deadline:
        time.sleep(0.2)
    assert saved.is_file()


def test_a_killed_trainer_loses_only_its_round_and_the_next_takes_up_its_inner_state(
    node, demo_data, tokenizer_dir
):
    _, node_dir = node
    ledger, weights = _ledger(demo_data), _weights()
    _, w1 = _round(
        node, _job(node_dir, demo_data, tokenizer_dir, ledger, 1, 0, run="killed"), weights
    )
    # mid-round: a long round (all the data, minutes of steps) runs when it is SIGKILLed
    long = _job(
        node_dir, demo_data, tokenizer_dir, ledger, 2, 2, steps=100_000, chunks=100, run="killed"
    )
    errors: list[Exception] = []

    def in_flight() -> None:
        try:
            _round(node, long, w1)
        except relay.TrainerError as e:
            errors.append(e)

    pid = _pid(node_dir)
    t = threading.Thread(target=in_flight)
    t.start()
    time.sleep(3)
    assert t.is_alive()
    os.kill(pid, signal.SIGKILL)
    t.join(60)
    assert errors and "exited mid-round" in str(errors[0]), errors
    # the next order starts a new trainer, which restores round 1's inner state from disk
    ledger.release("alpha")  # the lost round's rows go back to the pool
    third, _ = _round(
        node, _job(node_dir, demo_data, tokenizer_dir, ledger, 3, 2, run="killed"), w1
    )
    assert _pid(node_dir) != pid
    assert (third["steps"], third["inner_restored"]) == (2, True)


def test_a_failed_order_is_answered_with_its_error_and_the_trainer_lives_on(
    node, demo_data, tokenizer_dir
):
    _, node_dir = node
    ledger, weights = _ledger(demo_data), _weights()
    _round(node, _job(node_dir, demo_data, tokenizer_dir, ledger, 1, 0, run="failed"), weights)
    pid = _pid(node_dir)
    wrong = {k: v for k, v in weights.items() if k != "lm_head.weight"}  # a key missing
    with pytest.raises(relay.TrainerError, match="failed the round.*lm_head.weight"):
        _round(node, _job(node_dir, demo_data, tokenizer_dir, ledger, 2, 2, run="failed"), wrong)
    # a caller without the node's key is refused, and the trainer still serves the node
    with pytest.raises(Exception, match="digest"):
        Client(Endpoint(node_dir).socket, "AF_UNIX", authkey=b"not the key")
    again, _ = _round(
        node, _job(node_dir, demo_data, tokenizer_dir, ledger, 3, 2, run="failed"), weights
    )
    assert _pid(node_dir) == pid and again["steps"] == 2
    # the warm state was dropped with the failed order: round 3 took up round 1's from disk
    assert again["inner_restored"] is True


def test_the_key_and_socket_are_private_to_the_user(node, demo_data, tokenizer_dir):
    _, node_dir = node
    ledger = _ledger(demo_data)
    _round(node, _job(node_dir, demo_data, tokenizer_dir, ledger, 1, 0, run="private"), _weights())
    ep = Endpoint(node_dir)
    assert ep.key.stat().st_mode & 0o077 == 0
    assert os.stat(ep.socket).st_mode & 0o077 == 0
    assert relay.stop(node_dir) is True
    deadline = time.time() + 30
    while relay.hello(node_dir) is not None and time.time() < deadline:
        time.sleep(0.2)
    assert relay.hello(node_dir) is None
