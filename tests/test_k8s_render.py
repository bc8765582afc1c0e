"""Pure parts of the Kubernetes integration: cross-field rules, rendering, the status phases
and the provisioner's state table (no API server)."""

from __future__ import annotations

import pytest

from pilot.k8s.render import cpu_threads, problems, replicas, spec_hash, statefulset
from pilot.k8s.status import phase
from pilot.provisioner.kubernetes import _pool_state

BASE = {
    "site": "texas",
    "image": "img",
    "superlink": {"address": "sl:9092", "insecure": True},
    "redis": {"urlSecretRef": {"name": "r"}},
}


def _body(**spec):
    return {"metadata": {"name": "tx", "uid": "u1"}, "spec": {**BASE, **spec}}


@pytest.mark.parametrize(
    "spec, expected",
    [
        ({}, []),
        ({"superlink": {"address": "a"}}, ["superlink: set exactly one"]),
        (
            {"superlink": {"address": "a", "insecure": True, "caSecretRef": {"name": "c"}}},
            ["superlink: set exactly one"],
        ),
        (
            {"auth": {"privateKeySecretRef": {"name": "k"}}},
            ["auth: SuperNode authentication needs TLS"],
        ),
        ({"nodeConfig": {"state-dir": "/x"}}, ["nodeConfig: ['state-dir']"]),
        (
            {"env": [{"name": "CUDA_VISIBLE_DEVICES", "value": "3"}]},
            ["env: ['CUDA_VISIBLE_DEVICES']"],
        ),
        ({"resources": {"limits": {"nvidia.com/gpu": 1}}}, ["resources.limits: nvidia.com/gpu"]),
    ],
)
def test_cross_field_rules_name_the_offending_field(spec, expected):
    got = problems({**BASE, **spec})
    assert len(got) == len(expected) and all(
        g.startswith(e) for g, e in zip(got, expected, strict=True)
    )


def test_cpu_threads_follow_the_cpu_limit_unless_given():
    assert cpu_threads(BASE) == 1
    assert cpu_threads({**BASE, "resources": {"limits": {"cpu": "2500m"}}}) == 2
    assert cpu_threads({**BASE, "cpuThreads": 6, "resources": {"limits": {"cpu": 2}}}) == 6


def test_suspend_and_out_of_range_replicas_are_clamped():
    assert replicas({**BASE, "replicas": 1, "suspend": True}) == 0
    assert replicas({**BASE, "replicas": 5}) == 1


def test_scaling_does_not_change_the_spec_hash_but_the_image_does():
    assert spec_hash({**BASE, "replicas": 0}) == spec_hash({**BASE, "replicas": 1})
    assert spec_hash(BASE) != spec_hash({**BASE, "image": "img:2"})


def test_no_prestop_hook_when_drain_is_off():
    c = statefulset(_body(drain={"preStop": False}))["spec"]["template"]["spec"]["containers"][0]
    assert "lifecycle" not in c


READY_POD = {
    "metadata": {"name": "p"},
    "status": {"containerStatuses": [{"ready": True, "state": {"running": {}}}]},
}


@pytest.mark.parametrize(
    "spec, pod, failed, expected",
    [
        ({"suspend": True}, None, "", "Suspended"),
        ({"replicas": 1}, None, "CrashLoopBackOff", "Failed"),
        ({"replicas": 0}, READY_POD, "", "Draining"),
        ({"replicas": 0}, None, "", "Stopped"),
        ({"replicas": 1}, READY_POD, "", "Running"),
        ({"replicas": 1}, None, "", "Starting"),
    ],
)
def test_phase_follows_the_workload(spec, pod, failed, expected):
    assert phase({**BASE, **spec}, pod, failed) == expected


def _pool(replicas=0, gen=2, observed=2, **status):
    return {
        "metadata": {"generation": gen},
        "spec": {**BASE, "replicas": replicas},
        "status": {"observedGeneration": observed, **status},
    }


@pytest.mark.parametrize(
    "pool, state",
    [
        (_pool(0), "stopped"),
        ({**_pool(0), "status": {"observedGeneration": 2, "replicas": 1}}, "stopping"),
        (_pool(1, readyReplicas=1), "running"),
        (_pool(1, readyReplicas=0), "provisioning"),
        (_pool(1, observed=1, readyReplicas=1), "provisioning"),
        (
            _pool(1, phase="Failed", conditions=[{"type": "Ready", "reason": "ImagePullBackOff"}]),
            "failed:ImagePullBackOff",
        ),
        (None, "failed:SitePool deleted"),
    ],
)
def test_provisioner_state_table(pool, state):
    assert _pool_state(pool) == state
