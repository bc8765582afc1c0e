"""Integration: the Flower app with REAL flower-superlink / flower-supernode processes and a
real Valkey, a tiny nanochat GPT on CPU, driven by curtailment signals published here.

The signal driver is reactive: it replays a two-site curtailment script whose phase
boundaries wait for the run to reach them (a 2-core CI box is too noisy for fixed wall
timings), while simulated time advances at a fixed speed-up:

    PAUSE (both sites above threshold)
    -> LOCAL      alpha curtailed: provisioned (emulated delay), trains alone
    -> FEDERATED  beta curtailed when alpha's round starts: beta joins it mid-round
    -> LOCAL      alpha's window closes once it trained in a federated round: stop key,
                  partial work counted, deprovisioned
    -> the ServerApp is SIGKILLed while beta trains and started again: it resumes from the
       checkpoint
    -> beta's SuperNode is SIGKILLed mid-round: beta is dropped from the round, its data
       returns to the pool, a new node is started and trains the next round
    -> beta's window closes mid-round and the trace ends: the run stops and every node is
       released

Checks: the phases and join/leave happened, the loss fell, every data row was committed at
most once and the committed ranges tile the ledger exactly, the restart resumed the global
step/round/model, and nothing is left running.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sitesets import two_sites

from pilot.infra.procs import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SPEEDUP = 60.0  # simulated seconds per wall second
HIGH, LOW = 300.0, 40.0  # gCO2/kWh around the 100 threshold
LEAVE_MARGIN_S = 10.0  # wall s a round must have left when alpha's window closes in it
RUN = "itest"

SITES = two_sites("prototype")

PRESET = """
[launch]
sites = "{sites}"
data_dir = "{data}"
tokenizer_dir = "{tok}"
runs_dir = "runs"

[run]
name = "{run}"
provisioner = "subprocess"
superlink = "127.0.0.1:{port}"
round_min_s = 1800       # FEDERATED: 30 s wall (a warm trainer steps within seconds of a TRAIN)
round_max_s = 2400       # LOCAL: 40 s wall
join_min_s = 300         # join with >= 5 s wall of training left after the measured start-up
reply_grace_s = 40       # wall
poll_s = 0.3
transfer_dtype = "bf16"   # half the bytes; the fp32 path is covered by test_aggregate
outer = "nesterov"
outer_lr = 1.0
outer_momentum = 0.0     # lr 1, momentum 0: the outer step is FedAvg, through the Nesterov code
chunks_per_assignment = 1   # tiny first leases: sites run dry mid-round and lease more
wandb = "disabled"

[train]
depth = 4                # ~0.5 s a step here: the corpus is not used up in a few rounds
vocab_size = 1024
sequence_len = 128
device_batch_size = 4
total_batch_size = 512
num_iterations = 5000
matrix_lr = 0.02
warmdown_ratio = 0.0
seed = 7
"""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Driver(threading.Thread):
    """Publishes meta and one tick per site every 0.25 s wall, with the current script MCI."""

    def __init__(self, sig, sites: list[str]):
        super().__init__(daemon=True)
        self.sig, self.sites = sig, sites
        self.mci = dict.fromkeys(sites, HIGH)
        self.wall0, self.sim0 = time.time(), 1_717_200_000.0
        self.halt = threading.Event()
        sig.publish_meta(
            sim_start=self.sim0,
            wall_start=self.wall0,
            speedup=SPEEDUP,
            status="running",
            sites=sites,
            threshold=100.0,
        )

    def sim_now(self) -> float:
        return self.sim0 + (time.time() - self.wall0) * SPEEDUP

    def run(self) -> None:
        while not self.halt.is_set():
            t = self.sim_now()
            states = {
                s: {"mci": v, "curtailed": v < 100.0, "power_w": 0.0} for s, v in self.mci.items()
            }
            self.sig.publish_tick(
                t, states, {s: [(t, v), (t + 600.0, v)] for s, v in self.mci.items()}
            )
            self.halt.wait(0.25)


class Stack:
    def __init__(self, tmp: Path, redis_url: str, tokenizer_dir: Path):
        from nanochat.dataset import demo_texts, write_shards

        self.tmp = tmp
        self.home = tmp / "home"
        data = self.home / "data"
        # short documents: one document ~ one 128-token row, so little is cropped away
        write_shards(
            demo_texts(max_doc_chars=500),
            data,
            shard_docs=400,
            row_group_size=40,
            val_fraction=0.05,
        )
        self.port = free_port()
        (tmp / "sites.toml").write_text(SITES)
        self.preset = tmp / "preset.toml"
        self.preset.write_text(
            PRESET.format(
                sites=tmp / "sites.toml", data=data, tok=tokenizer_dir, run=RUN, port=self.port
            )
        )
        flwr_home = tmp / "flwr-home"
        flwr_home.mkdir()
        (flwr_home / "config.toml").write_text(
            '[superlink]\ndefault = "local-deployment"\n\n[superlink.local-deployment]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self.env = {
            **os.environ,
            "CURTAIL_REDIS_URL": redis_url,
            "CURTAIL_HOME": str(self.home),
            "FLWR_HOME": str(flwr_home),
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
            "PYTHONUNBUFFERED": "1",
        }
        self.run_dir = self.home / "runs" / RUN
        self.cursor = 0  # events before this index were matched by earlier waits
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.superlink = subprocess.Popen(
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            env=self.env,
            cwd=tmp,
            stdout=open(self.logs / "superlink.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 60
        while socket.socket().connect_ex(("127.0.0.1", self.port)) != 0:
            assert self.superlink.poll() is None, self.log("superlink")
            assert time.time() < deadline, "SuperLink did not open its port"
            time.sleep(0.2)

    def log(self, name: str) -> str:
        p = self.logs / f"{name}.log"
        return p.read_text(errors="replace")[-4000:] if p.exists() else ""

    def flwr_run(self) -> None:
        out = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                str(REPO),
                "local-deployment",
                "--run-config",
                f"preset='{self.preset}'",
            ],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stdout + out.stderr

    def events(self) -> list[dict]:
        path = self.run_dir / "events.jsonl"
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        return [json.loads(x) for x in lines if x.strip().endswith("}")]

    def wait(self, what: str, pred, timeout: float = 120.0) -> dict:
        """The first event after the previous wait's match that satisfies ``pred``."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            events = self.events()
            for i in range(self.cursor, len(events)):
                if pred(events[i]):
                    self.cursor = i + 1
                    return events[i]
            assert self.superlink.poll() is None, self.log("superlink")
            time.sleep(0.3)
        kinds = [(e["kind"], e.get("site"), e.get("round")) for e in self.events()]
        raise AssertionError(
            f"timed out waiting for {what}; events: {kinds[-40:]}\n"
            f"superlink log:\n{self.log('superlink')}"
        )

    def wait_step(
        self, sig, site: str, round_n: int, timeout: float = 120.0, or_round_end: bool = False
    ) -> bool:
        """Until ``site`` has logged a training step in round ``round_n`` (logs:<site>): True.
        ``or_round_end``: False once the round ended first (a busy box can start a TRAIN
        too late to step in a short round)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(int(x.get("round", -1)) == round_n for x in sig.logs(site)):
                return True
            if or_round_end and any(
                e["kind"] == "round_end" and e.get("round") == round_n for e in self.events()
            ):
                return False
            time.sleep(0.3)
        raise AssertionError(f"{site} logged no step in round {round_n}")

    def serverapps(self) -> list[int]:
        from pilot.infra.procs import descendants

        return [p for p in descendants(self.superlink.pid) if "flwr-serverapp" in _cmdline(p)]

    def supernodes(self) -> list[int]:
        pids = []
        for pidfile in self.run_dir.glob("nodes/*/supernode.pid"):
            pid = int(pidfile.read_text().split()[0])
            if "flower-supernode" in _cmdline(pid):
                pids.append(pid)
        return pids

    def trainers(self) -> list[int]:
        """Live persistent trainers of this run's nodes."""
        nodes = str(self.run_dir / "nodes")
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        return [
            p for p in pids if "pilot.flower.trainer.daemon" in (c := _cmdline(p)) and nodes in c
        ]

    def close(self) -> None:
        from pilot.infra.procs import descendants

        for pid in self.supernodes():
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        tree = descendants(self.superlink.pid)
        for pid in [self.superlink.pid, *tree]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.superlink.wait(10)


@pytest.fixture()
def stack(tmp_path, redis_url, tokenizer_dir):
    s = Stack(tmp_path, redis_url, tokenizer_dir)
    try:
        yield s
    finally:
        s.close()
        shutil.rmtree(tmp_path / "home" / "data", ignore_errors=True)


def _is(kind: str, **fields):
    def pred(ev: dict) -> bool:
        return ev["kind"] == kind and all(
            (v(ev.get(k)) if callable(v) else ev.get(k) == v) for k, v in fields.items()
        )

    return pred


def _federated_round_with_time_left(stack: Stack, sig, driver: Driver) -> dict:
    """A federated round in which alpha has stepped with ``LEAVE_MARGIN_S`` wall seconds still
    left: on a busy box a TRAIN can reach its first step only near the deadline (or not at all
    before the round ends), and a window closing then would end the round by its deadline, not
    by a leave."""
    while True:
        r = stack.wait("a federated round", _is("round_start", sites=["alpha", "beta"]))
        stepped = stack.wait_step(sig, "alpha", r["round"], or_round_end=True)
        if stepped and (r["deadline_t"] - driver.sim_now()) / SPEEDUP >= LEAVE_MARGIN_S:
            return r


@pytest.mark.timeout(900)
def test_elastic_run_with_join_leave_and_restart(stack, redis_url):
    from nanochat import checkpoint
    from pilot.infra.signals import Signals, connect

    sig = Signals(connect(redis_url), RUN)
    sig.clear()
    driver = Driver(sig, ["alpha", "beta"])
    driver.start()
    try:
        stack.flwr_run()
        stack.wait("PAUSE", _is("mode", mode="PAUSE"), timeout=90)

        driver.mci["alpha"] = LOW  # -> LOCAL
        r1 = stack.wait("alpha's LOCAL round", _is("round_start", sites=["alpha"]), timeout=90)
        driver.mci["beta"] = LOW  # -> FEDERATED: beta joins alpha's running round
        stack.wait("beta joins mid-round", _is("join", site="beta", round=r1["round"]))
        stack.wait("a federated aggregate", _is("aggregate", sites=["alpha", "beta"]))
        r3 = _federated_round_with_time_left(stack, sig, driver)
        driver.mci["alpha"] = HIGH  # -> LOCAL: alpha leaves mid-round
        stack.wait("alpha leaves", _is("leave", site="alpha", round=r3["round"]))
        stack.wait(
            "alpha's partial work averaged",
            _is("aggregate", round=r3["round"], sites=lambda s: s and "alpha" in s),
        )
        r4 = stack.wait("beta alone", _is("round_start", sites=["beta"]))

        # kill the ServerApp while beta trains, start it again: it resumes from the checkpoint
        stack.wait_step(sig, "beta", r4["round"])
        ckpt_meta = checkpoint.load(stack.run_dir / "checkpoint")[2]
        pids = stack.serverapps()
        assert pids, "no flwr-serverapp process found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        stack.flwr_run()
        resumed = stack.wait("resumed run_start", _is("run_start", resumed=True))
        r5 = stack.wait("a round after the restart", _is("round_start", sites=["beta"]))

        # beta's machine dies mid-round: dropped at once, its lease released, node replaced
        stack.wait_step(sig, "beta", r5["round"])
        for pid in stack.supernodes():
            os.killpg(pid, signal.SIGKILL)
        stack.wait("beta dropped", _is("fault", site="beta", round=r5["round"]))
        lost = stack.wait("the round without beta", _is("round_end", round=r5["round"]))
        r6 = stack.wait("beta's new node trains", _is("round_start", sites=["beta"]))
        stack.wait_step(sig, "beta", r6["round"])
        driver.mci["beta"] = HIGH  # beta leaves too, the trace ends
        after = stack.wait("the last round's aggregate", _is("aggregate", round=r6["round"]))
        sig.publish_meta(status="finished")
        end = stack.wait("run_end", _is("run_end"))
    finally:
        driver.halt.set()

    events = stack.events()
    kinds = [e["kind"] for e in events]
    # phases in order: PAUSE -> LOCAL -> FEDERATED -> LOCAL
    modes = [e["mode"] for e in events if e["kind"] == "mode"]
    seq = [m for i, m in enumerate(modes) if i == 0 or m != modes[i - 1]]
    it = iter(seq)
    assert all(m in it for m in ["PAUSE", "LOCAL", "FEDERATED", "LOCAL"]), seq
    assert "join" in kinds and "leave" in kinds and "deprovision" in kinds
    # one-chunk first leases ran dry before the deadline: more data was leased mid-round (the
    # exactly-once check below covers those chunks too)
    extended = [e for e in events if e["kind"] == "lease_extended"]
    assert extended and {e["site"] for e in extended} <= {"alpha", "beta"}, extended

    # loss falls (aggregated, work-weighted)
    losses = [e["loss"] for e in events if e["kind"] == "aggregate"]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.3, losses

    # resume: same global step and model, round numbers continue past the lost round
    assert resumed["global_step"] == ckpt_meta["step"] > 0
    assert resumed["round"] == ckpt_meta["round"] + 1 == r4["round"]
    assert r5["round"] > r4["round"] and r6["round"] > r5["round"]
    assert lost["dropped"] == ["beta"] and lost["committed"] == {}
    assert after["loss"] < losses[0] - 0.3, (after["loss"], losses)
    assert end["reason"] == "trace_end"

    # exactly once: committed row ranges never overlap and tile the final ledger exactly
    final = checkpoint.load(stack.run_dir / "checkpoint")[2]["data_ledger"]["done"]
    covered: dict[str, list[tuple[int, int]]] = {}
    for e in events:
        if e["kind"] == "round_end":
            for ranges in e["committed"].values():
                for key, (lo, hi) in ranges.items():
                    covered.setdefault(key, []).append((lo, hi))
    for key, done in final.items():
        pos = 0
        for lo, hi in sorted(covered.get(key, [])):
            assert lo == pos, f"chunk {key}: gap or overlap at row {lo}, expected {pos}"
            pos = hi
        assert pos == done, (key, covered.get(key), done)
    assert sum(final.values()) > 0

    # energy accounting, reports' inputs, clean shutdown
    assert any(e["kind"] == "train_interval" and e["site"] == "beta" for e in events)
    assert (stack.run_dir / "events.csv").exists() and (stack.run_dir / "ledger.json").exists()
    deadline = time.time() + 30
    while stack.supernodes() and time.time() < deadline:
        time.sleep(0.5)
    assert not stack.supernodes(), "SuperNodes left running after the run ended"
    # each node's persistent trainer served its rounds from one process, and went with its node
    answered = _answered(stack.run_dir / "nodes" / "alpha" / "trainer.log")
    assert any(len(rounds) >= 2 for rounds in answered.values()), answered
    while stack.trainers() and time.time() < deadline:
        time.sleep(0.5)
    assert not stack.trainers(), "trainers left running after their nodes"


def _answered(log: Path) -> dict[str, list[int]]:
    """Rounds each trainer process answered, from a node's trainer.log."""
    out: dict[str, list[int]] = {}
    for m in re.finditer(r"trainer\[(\d+)\] round (\d+) answered", log.read_text()):
        out.setdefault(m.group(1), []).append(int(m.group(2)))
    return out


FAKE_SUPERNODE = """#!{python}
import os, signal, sys, time
open(os.environ["FAKE_LOG"], "a").write(" ".join(sys.argv[1:]) + " CVD=" + os.environ.get("CUDA_VISIBLE_DEVICES", "-") + "\\n")
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True:
    time.sleep(0.1)
"""


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_subprocess_provisioner_delay_stop_and_adoption(tmp_path):
    """SubprocessProvisioner with a stand-in executable: the process starts at once and the
    site reads "provisioning" until its modelled delay (sim -> wall via the speed-up) is over,
    resources on the command line/env, SIGTERM stop, and a second provisioner (a restarted
    ServerApp) adopting a live node instead of starting another."""
    from pilot.config.sites import Site
    from pilot.infra.procs import alive
    from pilot.provisioner import make_provisioner

    exe = tmp_path / "fake-supernode"
    exe.write_text(FAKE_SUPERNODE.format(python=sys.executable))
    exe.chmod(0o755)
    sites = [
        Site("gpu-site", "R1", [2, 3], 2.0, 0.5, provision_delay_s=120.0),
        Site("cpu-site", "R2", [], 2.0, 0.5, provision_delay_s=0.0),
    ]
    kw = dict(
        sites=sites,
        superlink="127.0.0.1:9",
        state_dir=tmp_path / "nodes",
        log_dir=tmp_path / "logs",
        to_wall=lambda sim_s: sim_s / 60.0,  # speed-up 60: 120 s simulated = 2 s wall
        env={**os.environ, "FAKE_LOG": str(tmp_path / "argv.log")},
        executable=str(exe),
        stop_timeout_s=5.0,
    )
    prov = make_provisioner("subprocess", **kw)
    t0 = time.time()
    prov.start("gpu-site")
    prov.start("cpu-site")
    prov.start("gpu-site")  # idempotent
    assert prov.status() == {"gpu-site": "provisioning", "cpu-site": "running"}
    deadline = time.time() + 10
    while len(_lines(tmp_path / "argv.log")) < 2:  # both booting at once, delay or not
        assert time.time() < deadline
        time.sleep(0.05)
    assert prov.status()["gpu-site"] == "provisioning"
    while prov.status()["gpu-site"] != "running":
        assert time.time() - t0 < 10
        time.sleep(0.05)
    assert 1.8 <= time.time() - t0
    lines = (tmp_path / "argv.log").read_text()
    assert 'site="gpu-site"' in lines and "CVD=2,3" in lines and "--superlink 127.0.0.1:9" in lines
    assert "cpu-threads=" in lines and "CVD=\n" in lines  # CPU site: no GPU visible
    assert (tmp_path / "logs" / "supernode-gpu-site.log").exists()

    # a restarted ServerApp adopts the live node (no second process) and can stop it
    pid = int((tmp_path / "nodes" / "gpu-site" / "supernode.pid").read_text())
    again = make_provisioner("subprocess", **kw)
    again.start("gpu-site")
    assert again.status()["gpu-site"] == "running"
    assert len((tmp_path / "argv.log").read_text().splitlines()) == 2
    again.stop("gpu-site")
    prov.stop("cpu-site")
    again.close()
    prov.close()
    assert not alive(pid)
    assert prov.status()["cpu-site"] == "stopped" and again.status()["gpu-site"] == "stopped"
    assert not (tmp_path / "nodes" / "gpu-site" / "supernode.pid").exists()

    # stopped during its provisioning delay: the booting process is killed, nothing is left
    prov.start("gpu-site")
    assert prov.status()["gpu-site"] == "provisioning"
    pid = int((tmp_path / "nodes" / "gpu-site" / "supernode.pid").read_text())
    prov.stop("gpu-site", drain=False)
    prov.close()
    assert not alive(pid) and prov.status()["gpu-site"] == "stopped"
