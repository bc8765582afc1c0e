"""A SitePool's Failed phase comes from what the cluster reports, not from a hand-made status:
a SuperNode that crash-loops under the process kubelet, and a pod the real scheduler cannot
place. Scaling the pool to 0 (what the ServerApp does with a failed site) ends it: Stopped."""

from __future__ import annotations

import os

import pytest
from kubetest import REPO, sitepool, wait_for
from process_kubelet import ProcessKubelet

import pilot.k8s.operator as op
from pilot.k8s import GROUP, PLURAL, VERSION
from pilot.k8s.client import path

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="the process kubelet needs root (namespaces)"),
]


@pytest.fixture(scope="module")
def kubelet(cluster, tmp_path_factory):
    kubelet = ProcessKubelet(
        cluster.kube, "node-failing", tmp_path_factory.mktemp("kubelet"), REPO, period_s=0.5
    ).start()
    yield kubelet
    kubelet.close()


def _pool(cluster, ns: str, name: str, **spec) -> str:
    cluster.kube.create(path(GROUP, VERSION, PLURAL, ns), sitepool(name, replicas=1, **spec))
    return path(GROUP, VERSION, PLURAL, ns, name)


def _failed_with(cluster, url: str, reason: str) -> dict:
    def check():
        st = cluster.kube.get(url).get("status", {})
        conds = {c["type"]: c for c in st.get("conditions", [])}
        degraded = conds.get("Degraded", {})
        return (
            st.get("phase") == "Failed"
            and degraded.get("status") == "True"
            and degraded.get("reason") == reason
            and st
        )

    return wait_for(check, 120, f"phase Failed ({reason})")


def _stops_when_scaled_to_zero(cluster, ns: str, name: str, url: str) -> None:
    cluster.kubectl("-n", ns, "scale", f"sitepool/{name}", "--replicas=0")
    wait_for(lambda: cluster.kube.get(url)["status"].get("phase") == "Stopped", 120, "Stopped")


def test_a_crash_looping_supernode_turns_the_pool_failed_with_the_reason(
    cluster, operator, kubelet
):
    ns, _ = operator
    cluster.kube.create(
        path("", "v1", "secrets", ns),
        {"metadata": {"name": "curtail-redis"}, "stringData": {"url": "redis://127.0.0.1:1/0"}},
    )
    # a real flower-supernode that cannot start: its interpreter finds no standard library
    env = [{"name": "PYTHONHOME", "value": "/nonexistent"}]
    url = _pool(cluster, ns, "crashing", env=env)
    st = _failed_with(cluster, url, "CrashLoopBackOff")
    assert st["pod"]["reason"] == "CrashLoopBackOff" and st["readyReplicas"] == 0
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "CrashLoopBackOff")
    pod = cluster.kube.get(path("", "v1", "pods", ns, "supernode-crashing-0"))
    last = pod["status"]["containerStatuses"][0]["lastState"]["terminated"]
    assert last["exitCode"] != 0  # it ran and died: the phase is the workload's, not ours
    _stops_when_scaled_to_zero(cluster, ns, "crashing", url)


def test_a_pod_no_node_can_take_turns_the_pool_failed_unschedulable(
    cluster, operator, kubelet, monkeypatch
):
    ns, _ = operator
    monkeypatch.setattr(op, "UNSCHEDULABLE_S", 2.0)  # the operator runs in this process
    scheduling = {"nodeSelector": {"curtail.dev/gpu": "h100"}}  # no node has it
    url = _pool(cluster, ns, "unplaceable", scheduling=scheduling)
    _failed_with(cluster, url, "Unschedulable")
    pod = cluster.kube.get(path("", "v1", "pods", ns, "supernode-unplaceable-0"))
    assert not pod["spec"].get("nodeName")
    _stops_when_scaled_to_zero(cluster, ns, "unplaceable", url)
