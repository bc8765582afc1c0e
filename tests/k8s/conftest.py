"""Fixtures: a real control plane (kubetest.start_cluster) for the whole session, with the
SitePool CRD applied; skipped with the reason where the bundle or kubectl is absent."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest
from kubetest import BUNDLE, K8S, START, STOP, Cluster, start_cluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    if not START.is_file() or not (BUNDLE / "kube-1.20-bins.tar.xz").is_file():
        pytest.skip(f"no Kubernetes control-plane bundle at {BUNDLE} (start-apiserver.sh)")
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH")
    run_dir = tmp_path_factory.mktemp("apiserver")
    c = start_cluster(run_dir)
    try:
        c.kubectl("apply", "-k", str(K8S / "crds"))
        c.kubectl("wait", "--for=condition=Established", "crd/sitepools.curtail.dev")
        yield c
    finally:
        subprocess.run(["bash", str(STOP), str(run_dir)], timeout=120)


@pytest.fixture(scope="session")
def operator(cluster):
    """The operator (KopfRunner) in its own namespace, logged in with its ServiceAccount's
    token, so its Role is what it gets. Yields (namespace, runner)."""
    import os

    os.environ.setdefault("CURTAIL_OPERATOR_RESYNC_S", "5")
    from kopf.testing import KopfRunner

    import pilot.k8s.operator as op

    ns = cluster.namespace("op")
    cluster.apply_rbac(ns, "operator.yaml")
    cluster.apply_rbac(ns, "superlink.yaml")
    old = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = cluster.sa_kubeconfig(ns, "curtail-operator")
    op._kube = None  # log in afresh with the operator's own token
    args = ["run", "--standalone", "-n", ns, "-m", "pilot.k8s.operator", "--verbose"]
    try:
        with KopfRunner(args, timeout=60) as runner:
            yield ns, runner
    finally:
        op._kube = None
        if old is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = old
    assert runner.exit_code == 0, runner.output[-3000:]
    assert "inconsistencies" not in runner.output
    assert "APIForbiddenError" not in runner.output and "Forbidden" not in runner.output
