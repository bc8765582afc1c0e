"""Least privilege: what the operator's and the SuperLink's ServiceAccounts may do, asked of
the API server's authorizer (SubjectAccessReview)."""

from __future__ import annotations

import pytest

OP, SL = "curtail-operator", "curtail-superlink"
ALLOWED = [
    (OP, "patch", "curtail.dev", "sitepools", "", ""),
    (OP, "patch", "curtail.dev", "sitepools", "status", ""),
    (OP, "create", "apps", "statefulsets", "", ""),
    (OP, "watch", "", "pods", "", ""),
    (OP, "create", "", "events", "", ""),
    (SL, "list", "curtail.dev", "sitepools", "", ""),
    (SL, "patch", "curtail.dev", "sitepools", "scale", ""),
    (SL, "delete", "", "pods", "", "supernode-texas-0"),
]
DENIED = [
    (OP, "create", "curtail.dev", "sitepools", "", ""),
    (OP, "get", "", "secrets", "", ""),
    (OP, "create", "", "pods", "", ""),
    (OP, "create", "rbac.authorization.k8s.io", "roles", "", ""),
    (SL, "patch", "curtail.dev", "sitepools", "", ""),
    (SL, "patch", "curtail.dev", "sitepools", "status", ""),
    (SL, "delete", "", "pods", "", "redis-0"),
    (SL, "get", "", "secrets", "", ""),
    (SL, "create", "apps", "statefulsets", "", ""),
]


@pytest.fixture(scope="module")
def ns(cluster):
    ns = cluster.namespace("rbac")
    cluster.apply_rbac(ns, "operator.yaml")
    cluster.apply_rbac(ns, "superlink.yaml")
    return ns


def _allowed(cluster, ns, sa, verb, group, resource, sub, name, namespace=None):
    attrs = {"namespace": namespace or ns, "verb": verb, "group": group, "resource": resource}
    attrs.update(subresource=sub, name=name)
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {"user": f"system:serviceaccount:{ns}:{sa}", "resourceAttributes": attrs},
    }
    out = cluster.kube.create("/apis/authorization.k8s.io/v1/subjectaccessreviews", review)
    return out["status"]["allowed"]


@pytest.mark.parametrize("sa, verb, group, resource, sub, name", ALLOWED)
def test_service_accounts_may_do_what_they_need(cluster, ns, sa, verb, group, resource, sub, name):
    assert _allowed(cluster, ns, sa, verb, group, resource, sub, name)


@pytest.mark.parametrize("sa, verb, group, resource, sub, name", DENIED)
def test_service_accounts_are_denied_the_rest(cluster, ns, sa, verb, group, resource, sub, name):
    assert not _allowed(cluster, ns, sa, verb, group, resource, sub, name)


@pytest.mark.parametrize("sa", [OP, SL])
def test_nothing_is_granted_outside_the_namespace(cluster, ns, sa):
    assert not _allowed(cluster, ns, sa, "list", "curtail.dev", "sitepools", "", "", "default")
