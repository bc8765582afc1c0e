"""End to end on two real control planes with real SuperNodes (``make test-k8s-e2e``; ~6 min
here, so outside the default run): the cpu-demo curtailment run (`curtail-llm up`: Valkey,
SuperLink, ServerApp, energy simulation on the bundled trace) with the Kubernetes
provisioner. The operator (as its own ServiceAccount, one per cluster) turns each SitePool
into a StatefulSet, the StatefulSet controller makes the Pod, and tests/k8s/process_kubelet.py
runs its ``flower-supernode`` as a process. California lives in a second cluster (its own
kubeconfig and namespace in the sites config); Texas and Australia in the first.

The run goes PAUSE -> LOCAL -> FEDERATED -> LOCAL, and a ``kubectl scale --replicas=0`` of
Texas in the middle of a federated round still delivers its partial reply (the preStop drain),
which the round's aggregate counts.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubetest import K8S, REPO, STOP, Cluster, free_port, sitepool, start_cluster, wait_for
from process_kubelet import ProcessKubelet

from pilot.k8s import GROUP, PLURAL, VERSION, pod_name
from pilot.k8s.client import path

pytestmark = [pytest.mark.k8s_e2e, pytest.mark.timeout(900)]

RUN = "k8s-e2e"
SPEEDUP = "120"  # as tests/test_e2e_demo.py: the demo's span in ~270 s wall
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
    prepare = [sys.executable, "-m", "pilot.launch.cli", "prepare", "--preset", "cpu-demo"]
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
        preset.write_text(re.sub(r'(?m)^provisioner = "subprocess".*\n', run, text))
        argv = [sys.executable, "-m", "pilot.launch.cli", "up", "--preset", str(preset)]
        argv += ["--sites", str(sites), "--redis-url", url, "--port", str(sl_port)]
        argv += ["--run-name", RUN, "--speedup", SPEEDUP, "--steps", "100000", "--no-live"]
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
        scaled = _scale_texas_mid_federated_round(sides["a"], run_dir, launch, url)
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


def _scale_texas_mid_federated_round(
    side: Side, run_dir: Path, launch: subprocess.Popen, url: str
) -> dict:
    """Once California has joined Texas's round and Texas trains, ``kubectl scale`` it to 0."""
    import redis

    r = redis.Redis.from_url(url, decode_responses=True)

    def federated_round() -> dict | None:
        if launch.poll() is not None:
            raise AssertionError(f"the run ended before a federated round (rc {launch.returncode})")
        events = _events(run_dir)
        modes = [e["mode"] for e in events if e["kind"] == "mode"]
        rounds = [e["round"] for e in events if e["kind"] == "round_start"]
        power = [r.get(f"curtail:{RUN}:power:{site}") for site in ("texas", "california")]
        if modes[-1:] != ["FEDERATED"] or power != ["train", "train"]:
            return None
        return {"round": rounds[-1]}

    found = wait_for(federated_round, 480, "a federated round with both sites training")
    time.sleep(2)  # a few steps into Texas's work
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
    assert "texas" in agg["sites"], agg
    stopped = [e for e in events if e["kind"] == "train_interval" and e["site"] == "texas"]
    assert stopped and stopped[-1]["stopped_by"] == "stop", stopped[-1:]
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
