"""Kubernetes: the SitePool CRD's names, the operator (``kopf run -m pilot.k8s.operator``), the
preStop drain (``python -m pilot.k8s.drain``) and a small dict-based API client.

A SitePool ``<pool>`` becomes a StatefulSet and a headless Service, both ``supernode-<pool>``;
its one pod is always ``supernode-<pool>-0`` so RBAC can name it in ``resourceNames``.
"""

GROUP = "curtail.dev"
VERSION = "v1alpha1"
PLURAL = "sitepools"
KIND = "SitePool"
API_VERSION = f"{GROUP}/{VERSION}"

LABEL_POOL = "curtail.dev/sitepool"
LABEL_SITE = "curtail.dev/site"
SPEC_HASH = "curtail.dev/spec-hash"  # on the StatefulSet: what it was rendered from
HEALTH_PORT = 9095


def child_name(pool: str) -> str:
    """Name of the pool's StatefulSet and Service."""
    return f"supernode-{pool}"


def pod_name(pool: str) -> str:
    return f"{child_name(pool)}-0"


def selector(pool: str) -> str:
    return f"{LABEL_POOL}={pool}"
