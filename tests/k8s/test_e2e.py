"""End to end on two real control planes with real SuperNodes (``make test-k8s-e2e``; ~7 min
here, so outside the default run): the cpu-demo curtailment run (`curtail-llm up`: Valkey,
SuperLink, ServerApp, energy simulation on the bundled trace) with the Kubernetes
provisioner. The operator (as its own ServiceAccount, one per cluster) turns each SitePool
into a StatefulSet, the StatefulSet controller makes the Pod, and tests/k8s/process_kubelet.py
runs its ``flower-supernode`` as a process. California lives in a second cluster (its own
kubeconfig and namespace in the sites config); Texas and Australia in the first.

The run goes PAUSE -> LOCAL -> FEDERATED -> LOCAL, and a ``kubectl scale --replicas=0`` of
Texas in the middle of a federated round still delivers its partial reply (the preStop drain),
which the round's aggregate counts.

Paced for a busy 2-core box: a TRAIN takes 10-30 s wall there from message to first step, and
the drain (scale -> operator -> StatefulSet -> kubelet -> preStop hook -> stop key) several
more. So the trace is replayed at the demo's own 96x (not faster), federated rounds last two
simulated hours (75 s wall, not 37 s), and the scale waits, on the run's events and Redis, for
a round in which both sites train, Texas has stepped since its TRAIN, and at least
``MIN_LEFT_S`` wall seconds are left before the round's deadline and Texas's window close.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from kubetest import K8S, REPO, STOP, Cluster, free_port, sitepool, start_cluster, wait_for
from process_kubelet import ProcessKubelet

from pilot.k8s import GROUP, PLURAL, VERSION, pod_name
from pilot.k8s.client import path

pytestmark = [pytest.mark.k8s_e2e, pytest.mark.timeout(900)]

RUN = "k8s-e2e"
SPEEDUP = "72"  # slower than the demo's 96x: its federated overlaps last longer in wall s
HOURS = "7"  # ... over the first 7 h of its trace (to 22:02, California alone): ~350 s wall
ROUND_MIN_S = 7200  # a FEDERATED round (simulated s): 75 s wall, well past a TRAIN's start-up
MIN_LEFT_S = 25.0  # wall s the scale leaves before Texas must stop anyway: the drain's path
# and the step in progress (the deadline is checked before the stop key)
GRACE_S = 90  # the pods' grace period: covers the drain of a CPU step on a busy box
POOLS = {"texas": "a", "australia": "a", "california": "b"}  # site -> cluster


def _events(run_dir: Path) -> list[dict]:
    f = run_dir / "events.jsonl"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def _subsequence(want: list[str], seq: list[str]) -> bool:
    it = iter(seq)
    return all(any(x == w for x in it) for w in want)


class Side:
    """One cluster of the test: its namespace, operator and process kubelet."""

    def __init__(self, cluster: Cluster, tag: str, root: Path, ports: tuple[int, ...], url: str):
        self.cluster, self.tag = cluster, tag
        self.ns = cluster.namespace(f"e2e{tag}")
        cluster.apply_rbac(self.ns, "operator.yaml")
        cluster.apply_rbac(self.ns, "superlink.yaml")
        cluster.kube.create(
            path("", "v1", "secrets", self.ns),
            {"metadata": {"name": "curtail-redis"}, "stringData": {"url": url}},
        )
        self.superlink_kubeconfig = cluster.sa_kubeconfig(self.ns, "curtail-superlink")
        env = {
            **os.environ,
            "KUBECONFIG": cluster.sa_kubeconfig(self.ns, "curtail-operator"),
            "CURTAIL_OPERATOR_RESYNC_S": "5",
        }
        self.log = root / f"operator-{tag}.log"
        kopf = Path(sys.executable).parent / "kopf"
        with self.log.open("wb") as log:
            self.operator = subprocess.Popen(
                [str(kopf), "run", "--standalone", "-n", self.ns, "-m", "pilot.k8s.operator"],
                env=env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        path_env = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
        self.kubelet = ProcessKubelet(
            cluster.kube, f"node-{tag}", root / f"kubelet-{tag}", REPO, ports, {"PATH": path_env}
        ).start()

    def close(self) -> None:
        self.kubelet.close()
        self.operator.terminate()
        self.operator.wait(30)


@pytest.fixture(scope="module")
def e2e(cluster, tmp_path_factory) -> Iterator[dict]:
    from pilot.infra.valkey import EmbeddedValkey

    root = tmp_path_factory.mktemp("k8s-e2e")
    home = root / "home"
    b_dir = root / "apiserver-b"
    b_dir.mkdir()
    cluster_b = start_cluster(b_dir)
    env = {**os.environ, "CURTAIL_HOME": str(home)}
    prepare = [sys.executable, "-m", "pilot.launch", "prepare", "--preset", "cpu-demo"]
    subprocess.run(prepare, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    valkey = EmbeddedValkey(password=secrets.token_urlsafe(24))
    url = valkey.start().url
    sl_port = free_port()
    sides: dict[str, Side] = {}
    launch = None
    try:
        cluster_b.kubectl("apply", "-k", str(K8S / "crds"))
        cluster_b.kubectl("wait", "--for=condition=Established", "crd/sitepools.curtail.dev")
        ports = (sl_port, valkey.port)
        sides = {
            "a": Side(cluster, "a", root, ports, url),
            "b": Side(cluster_b, "b", root, ports, url),
        }
        for site, tag in POOLS.items():
            side = sides[tag]
            pool = sitepool(
                site,
                superlink={"address": f"127.0.0.1:{sl_port}", "insecure": True},
                cpuThreads=1,
                drain={"gracePeriodSeconds": GRACE_S},
            )
            side.cluster.kube.create(path(GROUP, VERSION, PLURAL, side.ns), pool)
            # the state volume holds the site's prepared corpus and tokenizer
            claim = side.kubelet.claim_dir(side.ns, f"state-{pod_name(site)}")
            for name in ("data", "tokenizer"):
                shutil.copytree(home / name, claim / name)
        sites = _sites_toml(root, sides)
        preset = root / "k8s-e2e.toml"
        text = (REPO / "configs" / "cpu-demo.toml").read_text()
        run = (
            'provisioner = "kubernetes"\n'
            f'k8s_namespace = "{sides["a"].ns}"\n'
            f'k8s_kubeconfig = "{sides["a"].superlink_kubeconfig}"\n'
        )
        text, n = re.subn(r'(?m)^provisioner = "subprocess".*\n', run, text)
        text, m = re.subn(r"(?m)^round_min_s = \d+", f"round_min_s = {ROUND_MIN_S}", text)
        assert n == m == 1, "configs/cpu-demo.toml changed: update the e2e's preset edits"
        preset.write_text(text)
        argv = [sys.executable, "-m", "pilot.launch", "up", "--preset", str(preset)]
        argv += ["--sites", str(sites), "--redis-url", url, "--port", str(sl_port)]
        argv += ["--run-name", RUN, "--speedup", SPEEDUP, "--hours", HOURS, "--steps", "100000"]
        argv += ["--no-live"]
        argv += ["--timeout", "600"]
        out = (root / "launch.out").open("w")
        launch = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        run_dir = home / "runs" / RUN
        supernodes: dict[str, list[str]] = {}
        watcher = threading.Thread(target=_watch_supernodes, args=(sides, launch, supernodes))
        watcher.start()
        closes = _window_closes(sites, "texas")
        scaled = _scale_texas_mid_federated_round(sides["a"], run_dir, launch, url, closes)
        launch.wait(timeout=700)
        watcher.join(10)
        yield {
            "rc": launch.returncode,
            "out": (root / "launch.out").read_text(),
            "run_dir": run_dir,
            "scaled": scaled,
            "supernodes": supernodes,
            "sides": sides,
        }
    finally:
        if launch is not None and launch.poll() is None:
            launch.terminate()
            launch.wait(60)
        for side in sides.values():
            side.close()
        valkey.stop()
        subprocess.run(["bash", str(STOP), str(b_dir)], timeout=120)


def _sites_toml(root: Path, sides: dict[str, Side]) -> Path:
    """cpu-demo's sites, California in cluster B (its own kubeconfig and namespace)."""
    text = (REPO / "configs" / "cpu-demo-sites.toml").read_text()
    trace = (REPO / "configs" / "traces" / "synthetic-3site.csv").as_posix()
    text = re.sub(r'(?m)^trace = ".*"', f'trace = "{trace}"', text)
    b = sides["b"]
    extra = f'kubeconfig = "{b.superlink_kubeconfig}"\nnamespace = "{b.ns}"\n'
    text = re.sub(r'(?m)^(name = "california".*\n)', lambda m: m[1] + extra, text)
    out = root / "sites.toml"
    out.write_text(text)
    return out


def _window_closes(sites: Path, site: str) -> list[float]:
    """Trace instants (epoch s) that end a run of points below the threshold at ``site``: the
    last point below before one at or above it, so the window has closed by the next point."""
    doc = tomllib.loads(sites.read_text())
    threshold = float(doc["policy"]["threshold"])
    region = next(s["region"] for s in doc["sites"] if s["name"] == site)
    points = []
    with open(doc["trace"], newline="") as f:
        for row in csv.DictReader(f):
            t = datetime.fromisoformat(row["point_time"].replace("Z", "+00:00")).timestamp()
            points.append((t, float(row[region]) < threshold))
    return [a[0] for a, b in zip(points, points[1:], strict=False) if a[1] and not b[1]]


def _scale_texas_mid_federated_round(
    side: Side, run_dir: Path, launch: subprocess.Popen, url: str, closes: list[float]
) -> dict:
    """``kubectl scale`` Texas to 0 once a federated round has it stepping with California
    training too and ``MIN_LEFT_S`` wall seconds before the round's deadline or Texas's window
    close (a round that started too late to leave that is passed over for a later one).
    Returns the round, the simulated instant of the scale and the round's deadline then."""
    import redis

    from pilot.energy.clock import Clock
    from pilot.infra.signals import Signals

    sig = Signals(redis.Redis.from_url(url, decode_responses=True), RUN)
    # round -> the furthest check it passed and the one it then lacked, for the failure
    passed: dict[int, tuple[int, str]] = {}

    def lacked(rnd: int, stage: int, what: str) -> None:
        if stage >= passed.get(rnd, (-1, ""))[0]:
            passed[rnd] = (stage, what)

    def moment() -> dict | None:
        if launch.poll() is not None:
            raise AssertionError(
                f"the run ended (rc {launch.returncode}) before Texas stepped in a federated "
                f"round with {MIN_LEFT_S} s left; what each round lacked: {passed}"
            )
        events = _events(run_dir)
        modes = [e for e in events if e["kind"] == "mode"]
        starts = [e for e in events if e["kind"] == "round_start"]
        if not modes or not starts or modes[-1]["mode"] != "FEDERATED":
            return None
        rnd = starts[-1]["round"]
        mine = [e for e in events if e.get("round") == rnd and "t" in e]
        if any(e["kind"] == "round_end" for e in mine):
            return None
        lacked(rnd, 0, "a TRAIN out to both sites")
        # the TRAIN messages of the round: its start, then the joins (a resume after a pause)
        sent = {
            s: [
                e
                for e in mine
                if (e["kind"] == "round_start" and s in e["sites"])
                or (e["kind"] == "join" and e["site"] == s)
            ]
            for s in ("texas", "california")
        }
        if not sent["texas"] or not sent["california"]:
            return None
        lacked(rnd, 1, "Texas's latest TRAIN still out")
        last = sent["texas"][-1]
        # Texas's latest TRAIN still out: no reply, leave, drop or fault since
        ended = ("train_interval", "leave", "drop", "fault")
        if any(
            e["kind"] in ended and e.get("site") == "texas" and e["wall"] >= last["wall"]
            for e in mine
        ):
            return None
        lacked(rnd, 2, "both sites training")
        if [sig.power("texas"), sig.power("california")] != ["train", "train"]:
            return None
        # ... and stepping: a step of this round logged since the message went out
        lacked(rnd, 3, "a step of Texas's since its TRAIN")
        since = f"{math.floor(last['wall'] * 1000)}-0"
        if not any(x.get("round") == rnd for x in sig.logs("texas", since=since)):
            return None
        # the round's deadline only shrinks (to round_min_s once it turns FEDERATED)
        deadline_t = min(e["deadline_t"] for e in mine if e["kind"] in ("round_start", "join"))
        clock = Clock.from_meta(sig.meta())
        now_t = clock.sim_now()
        close_t = min((c for c in closes if c > now_t), default=math.inf)
        left_s = clock.to_wall(min(deadline_t, close_t) - now_t)
        if left_s < MIN_LEFT_S:
            lacked(rnd, 4, f"time: Texas stepping with only {left_s:.1f} s left")
            return None
        return {"round": rnd, "t": now_t, "deadline_t": deadline_t, "left_s": left_s}

    found = wait_for(moment, 600, "Texas stepping in a federated round with time left")
    side.cluster.kubectl("-n", side.ns, "scale", "sitepool/texas", "--replicas=0")
    return found


def _watch_supernodes(
    sides: dict[str, Side], launch: subprocess.Popen, seen: dict[str, list[str]]
) -> None:
    """The command line of each pod's container process while the run lasts: site -> argv."""
    while launch.poll() is None:
        for side in sides.values():
            for pod in list(side.kubelet.pods.values()):
                pid = pod.containers[0].main_pid()
                if pid is None:
                    continue
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                site = pod.body["metadata"]["labels"].get("curtail.dev/site", "")
                seen.setdefault(site, [a.decode() for a in argv if a])
        time.sleep(2)


def test_the_run_completes_through_pause_local_federated_local(e2e):
    assert e2e["rc"] == 0, e2e["out"][-5000:]
    assert "run completed" in e2e["out"]
    events = _events(e2e["run_dir"])
    modes = [e["mode"] for e in events if e["kind"] == "mode"]
    assert _subsequence(["PAUSE", "LOCAL", "FEDERATED", "LOCAL"], modes), modes
    assert events[-1]["kind"] == "run_end" and events[-1]["reason"] == "trace_end"
    started = {e["site"] for e in events if e["kind"] == "provision_started"}
    assert {"texas", "california"} <= started


def test_each_supernode_was_a_real_flower_supernode_from_the_operators_pod(e2e):
    seen = e2e["supernodes"]
    assert {"texas", "california"} <= set(seen), seen
    for site, argv in seen.items():
        # the console script, or the interpreter running it
        assert any(Path(a).name == "flower-supernode" for a in argv[:2]), argv
        assert f'site="{site}"' in " ".join(argv) and "--insecure" in argv, argv
    # the pods ran on each cluster's own node, made by the StatefulSet the operator owns
    for tag, side in e2e["sides"].items():
        for pod in side.kubelet.pods.values():
            meta = pod.body["metadata"]
            assert pod.body["spec"]["nodeName"] == f"node-{tag}"
            (ref,) = meta["ownerReferences"]
            assert (
                ref["kind"] == "StatefulSet"
                and ref["name"] == f"supernode-{meta['labels']['curtail.dev/site']}"
            )


def test_kubectl_scale_to_zero_mid_round_still_counts_the_partial_reply(e2e):
    events = _events(e2e["run_dir"])
    rnd = e2e["scaled"]["round"]
    agg = next(e for e in events if e["kind"] == "aggregate" and e["round"] == rnd)
    assert "texas" in agg["sites"], (e2e["scaled"], agg)
    # Texas's work in that round that the scale cut short: it ended by the stop key, before
    # the round's deadline
    texas = [e for e in events if e["kind"] == "train_interval" and e["site"] == "texas"]
    cut = [e for e in texas if e["round"] == rnd and e["start"] <= e2e["scaled"]["t"] <= e["end"]]
    assert len(cut) == 1, (e2e["scaled"], texas)
    assert cut[0]["stopped_by"] == "stop", (e2e["scaled"], cut[0])
    assert cut[0]["end"] < e2e["scaled"]["deadline_t"], (e2e["scaled"], cut[0])
    assert not any(e["kind"] == "drop" and e.get("site") == "texas" for e in events)
    # the preStop hook drained it: the stop key was set by the pod, not by the ServerApp
    a = e2e["sides"]["a"].kubelet
    texas = [p for p in [*a.pods.values(), *a.gone] if "texas" in p.name]
    hooks = "".join(
        (p.dir / "hooks.log").read_text() for p in texas if (p.dir / "hooks.log").exists()
    )
    assert re.search(r"drain texas: drained \['" + RUN, hooks), hooks


def test_the_second_cluster_ran_california_and_the_pools_ended_at_zero(e2e):
    b = e2e["sides"]["b"]
    assert any("california" in p.name for p in [*b.kubelet.pods.values(), *b.kubelet.gone])
    for tag, side in e2e["sides"].items():
        for site in (s for s, t in POOLS.items() if t == tag):
            pool = side.cluster.kube.get(path(GROUP, VERSION, PLURAL, side.ns, site))
            assert pool["spec"]["replicas"] == 0, (site, pool["spec"])
    for side in e2e["sides"].values():
        assert side.operator.poll() is None, side.log.read_text()[-3000:]
        assert "Forbidden" not in side.log.read_text()
