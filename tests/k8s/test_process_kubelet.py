"""The test-only process kubelet (process_kubelet.py) on the real API server: a Pod's command
runs with its env, Secret and volumes, readiness follows its probe, and deletion runs preStop,
then SIGTERM, then SIGKILL once the grace period is out."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
from kubetest import REPO, wait_for
from process_kubelet import ProcessKubelet

from pilot.k8s.client import path

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="the process kubelet needs root (namespaces)"),
]

# Serves on 8080 (the readiness probe), reports what it sees, and ignores SIGTERM when told to.
STUB = textwrap.dedent(
    """
    import os, signal, socket, sys, time
    out = "/data/out"
    with open(f"{out}/seen", "w") as f:
        f.write(" ".join([os.environ["GREETING"], os.environ["TOKEN"], os.environ["POD"],
                          open("/etc/stub/token").read(), str(os.getpid()), *sys.argv[1:]]))
    stubborn = os.environ.get("STUBBORN") == "1"
    def term(*_):
        open(f"{out}/sigterm", "w").write("x")
        if not stubborn:
            sys.exit(3)
    signal.signal(signal.SIGTERM, term)
    s = socket.create_server(("127.0.0.1", 8080))
    while True:
        s.settimeout(1)
        try:
            s.accept()[0].close()
        except OSError:
            pass
    """
)


def _pod(name: str, grace: int, stubborn: bool) -> dict:
    container = {
        "name": "stub",
        "image": "stub",
        "command": [sys.executable, "-c", STUB],
        "args": ["$(GREETING)-arg"],
        "env": [
            {"name": "GREETING", "value": "hello"},
            {"name": "STUBBORN", "value": "1" if stubborn else "0"},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "stub", "key": "token"}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "volumeMounts": [
            {"name": "out", "mountPath": "/data/out"},
            {"name": "tok", "mountPath": "/etc/stub", "readOnly": True},
        ],
        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
        "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "touch /data/out/prestop"]}}},
    }
    return {
        "metadata": {"name": name},
        "spec": {
            "containers": [container],
            "volumes": [
                {"name": "out", "persistentVolumeClaim": {"claimName": f"out-{name}"}},
                {"name": "tok", "secret": {"secretName": "stub"}},
            ],
            "terminationGracePeriodSeconds": grace,
            "automountServiceAccountToken": False,  # no wait for the namespace's token
        },
    }


@pytest.fixture(scope="module")
def kubelet(cluster, tmp_path_factory):
    kubelet = ProcessKubelet(
        cluster.kube, "node-stub", tmp_path_factory.mktemp("kubelet"), REPO, period_s=0.5
    ).start()
    yield kubelet
    kubelet.close()


@pytest.mark.parametrize("stubborn", [False, True], ids=["graceful", "stubborn"])
def test_a_pod_runs_as_a_process_and_dies_by_prestop_sigterm_then_sigkill(
    cluster, kubelet, stubborn
):
    ns = cluster.namespace("kubelet")
    cluster.kube.create(
        path("", "v1", "secrets", ns), {"metadata": {"name": "stub"}, "stringData": {"token": "s3"}}
    )
    cluster.kube.create(path("", "v1", "pods", ns), _pod("stub", grace=4, stubborn=stubborn))
    url = path("", "v1", "pods", ns, "stub")

    def ready():
        st = cluster.kube.get(url).get("status", {})
        conds = {c["type"]: c["status"] for c in st.get("conditions", [])}
        return st.get("phase") == "Running" and conds.get("Ready") == "True" and st

    st = wait_for(ready, 60, "the pod Running and Ready")
    assert cluster.kube.get(url)["spec"]["nodeName"] == "node-stub"
    assert st["containerStatuses"][0]["state"]["running"]
    out = kubelet.claim_dir(ns, "out-stub")
    greeting, token, pod, secret_file, pid, arg = (out / "seen").read_text().split()
    assert (greeting, token, pod, secret_file, arg) == ("hello", "s3", "stub", "s3", "hello-arg")
    assert int(pid) > 1  # in the pod's own PID namespace (PID 1 is the sandbox)
    cluster.kube.delete(url)  # the grace period from the pod spec
    wait_for(lambda: cluster.kube.get_or_none(url) is None, 60, "the pod gone")
    assert (out / "prestop").exists() and (out / "sigterm").exists()
    # the kubelet may already have noticed the pod is gone from the API
    (record,) = [p for p in [*kubelet.pods.values(), *kubelet.gone] if p.ns == ns]
    code = record.containers[0].last_exit["exitCode"]
    assert code == (137 if stubborn else 3)
