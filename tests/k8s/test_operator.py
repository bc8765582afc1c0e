"""The operator on a real API server, under its own ServiceAccount: children, scaling,
status, drift repair, garbage collection and cross-field validation."""

from __future__ import annotations

import pytest
from kubetest import sitepool, wait_for

from pilot.k8s import GROUP, PLURAL, VERSION
from pilot.k8s.client import path
from pilot.k8s.render import AUTH_KEY_PATH, CA_PATH

pytestmark = pytest.mark.timeout(300)


def _urls(ns, name):
    return (
        path(GROUP, VERSION, PLURAL, ns, name),
        path("apps", "v1", "statefulsets", ns, f"supernode-{name}"),
        path("", "v1", "services", ns, f"supernode-{name}"),
        path("", "v1", "pods", ns, f"supernode-{name}-0"),
    )


def _create(cluster, ns, body):
    return cluster.kube.create(path(GROUP, VERSION, PLURAL, ns), body)


def _status(cluster, url):
    return cluster.kube.get(url).get("status", {})


def _make_ready(cluster, pod_url):
    """What a kubelet would report: the pod runs and its probe passes."""
    cond = [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}]
    cs = [
        {
            "name": "supernode",
            "ready": True,
            "restartCount": 0,
            "image": "curtail-llm:test",
            "imageID": "",
            "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}},
        }
    ]
    status = {"phase": "Running", "conditions": cond, "containerStatuses": cs}
    cluster.kube.patch(f"{pod_url}/status", {"status": status})


def test_sitepool_becomes_statefulset_and_service_with_exact_args_env_resources(cluster, operator):
    ns, _ = operator
    spec = dict(
        superlink={"address": "sl:9092", "caSecretRef": {"name": "ca"}},
        auth={"privateKeySecretRef": {"name": "key-tx"}},
        gpus=2,
        resources={"limits": {"cpu": "3", "memory": "4Gi"}},
        nodeConfig={"extra": "x"},
        env=[{"name": "EXTRA", "value": "1"}],
        scheduling={"nodeSelector": {"gpu": "yes"}},
    )
    pool = _create(cluster, ns, sitepool("exact", site="california", **spec))
    pool_url, sts_url, svc_url, _ = _urls(ns, "exact")
    sts = wait_for(lambda: cluster.kube.get_or_none(sts_url), 60, "the StatefulSet")
    svc = wait_for(lambda: cluster.kube.get_or_none(svc_url), 60, "the Service")
    c = sts["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["flower-supernode"]
    assert c["args"] == [
        "--superlink",
        "sl:9092",
        "--root-certificates",
        CA_PATH,
        "--auth-supernode-private-key",
        AUTH_KEY_PATH,
        "--node-config",
        'site="california" state-dir="/var/lib/curtail/state" cpu-threads=3 extra="x"',
        "--health-server-address",
        "0.0.0.0:9095",
    ]
    env = {e["name"]: e for e in c["env"]}
    assert env["CURTAIL_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "curtail-redis",
        "key": "url",
    }
    assert env["CUDA_VISIBLE_DEVICES"]["value"] == "0,1" and env["EXTRA"]["value"] == "1"
    assert c["resources"]["limits"] == {"cpu": "3", "memory": "4Gi", "nvidia.com/gpu": "2"}
    assert c["resources"]["requests"] == {"nvidia.com/gpu": "2"}
    assert c["lifecycle"]["preStop"]["exec"]["command"][:3] == ["python", "-m", "pilot.k8s.drain"]
    pod = sts["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "yes"} and pod["terminationGracePeriodSeconds"] == 600
    assert sts["spec"]["replicas"] == 0 and sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"] == {
        "storage": "20Gi"
    }
    assert svc["spec"]["clusterIP"] == "None"
    for child in (sts, svc):
        (ref,) = child["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"]) == (
            "SitePool",
            "exact",
            pool["metadata"]["uid"],
        )
        assert ref["controller"] is True
    st = wait_for(lambda: _status(cluster, pool_url).get("phase"), 60, "a phase")
    assert st == "Stopped"


def test_kubectl_scale_moves_the_pod_and_status_follows(cluster, operator):
    ns, _ = operator
    _create(cluster, ns, sitepool("scaling"))
    pool_url, sts_url, _, pod_url = _urls(ns, "scaling")
    wait_for(lambda: cluster.kube.get_or_none(sts_url), 60, "the StatefulSet")
    cluster.kubectl("-n", ns, "scale", "sitepool/scaling", "--replicas=1")
    wait_for(lambda: cluster.kube.get(sts_url)["spec"]["replicas"] == 1, 60, "StatefulSet at 1")
    wait_for(lambda: cluster.kube.get_or_none(pod_url), 60, "the pod")
    wait_for(lambda: _status(cluster, pool_url).get("phase") == "Starting", 60, "Starting")
    _make_ready(cluster, pod_url)
    # the phase and the scale time may land in separate status patches: wait for both
    st = wait_for(
        lambda: (
            (s := _status(cluster, pool_url)).get("phase") == "Running" and "lastScaleUp" in s and s
        ),
        60,
        "Running, with its scale-up time",
    )
    assert st["readyReplicas"] == 1 and st["selector"] == "curtail.dev/sitepool=scaling"
    assert st["pod"]["ready"] is True and "lastScaleUp" in st
    cluster.kubectl("-n", ns, "scale", "sitepool/scaling", "--replicas=0")
    wait_for(
        lambda: (
            (s := _status(cluster, pool_url)).get("phase") == "Stopped" and "lastScaleDown" in s
        ),
        90,
        "Stopped, with its scale-down time",
    )
    assert cluster.kube.get(sts_url)["spec"]["replicas"] == 0


def test_drift_is_repaired_and_a_scale_is_not_fought(cluster, operator):
    ns, _ = operator
    _create(cluster, ns, sitepool("drift"))
    pool_url, sts_url, _, _ = _urls(ns, "drift")
    sts = wait_for(lambda: cluster.kube.get_or_none(sts_url), 60, "the StatefulSet")
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    containers = sts["spec"]["template"]["spec"]["containers"]
    containers[0]["args"] = ["--insecure"]
    patch = {"spec": {"replicas": 1, "template": {"spec": {"containers": containers}}}}
    cluster.kube.patch(sts_url, patch)

    def repaired():
        s = cluster.kube.get(sts_url)["spec"]
        return s["replicas"] == 0 and s["template"]["spec"]["containers"][0]["args"] == args

    wait_for(repaired, 60, "the drift repaired")
    cluster.kubectl("-n", ns, "scale", "sitepool/drift", "--replicas=1")
    wait_for(lambda: cluster.kube.get(sts_url)["spec"]["replicas"] == 1, 60, "the scale kept")


def test_invalid_cross_field_spec_sets_spec_valid_false_and_renders_nothing(cluster, operator):
    ns, _ = operator
    link = {"address": "sl:9092", "insecure": True, "caSecretRef": {"name": "ca"}}
    _create(cluster, ns, sitepool("invalid", superlink=link, nodeConfig={"site": "x"}))
    pool_url, sts_url, _, _ = _urls(ns, "invalid")

    def spec_valid():
        conds = _status(cluster, pool_url).get("conditions", [])
        return next((c for c in conds if c["type"] == "SpecValid"), None)

    cond = wait_for(spec_valid, 60, "SpecValid")
    assert cond["status"] == "False" and cond["reason"] == "InvalidSpec"
    assert "exactly one of insecure" in cond["message"] and "nodeConfig" in cond["message"]
    assert cluster.kube.get_or_none(sts_url) is None


def test_deleting_the_sitepool_cascades_to_its_children(cluster, operator):
    ns, _ = operator
    _create(cluster, ns, sitepool("doomed"))
    pool_url, sts_url, svc_url, _ = _urls(ns, "doomed")
    wait_for(lambda: cluster.kube.get_or_none(svc_url), 60, "the Service")
    wait_for(lambda: cluster.kube.get_or_none(sts_url), 60, "the StatefulSet")
    cluster.kube.delete(pool_url)
    wait_for(lambda: cluster.kube.get_or_none(sts_url) is None, 90, "the StatefulSet gone")
    wait_for(lambda: cluster.kube.get_or_none(svc_url) is None, 90, "the Service gone")
