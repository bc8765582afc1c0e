"""The SitePool operator: ``kopf run --standalone -n <namespace> -m pilot.k8s.operator``.

One idempotent ``reconcile`` (on create, update, resume and a timer) validates the spec,
renders the StatefulSet and headless Service (pilot.k8s.render), creates them or repairs
drift, and writes the status (pilot.k8s.status). The pool's replicas come only from
``spec.replicas``, which ``/scale`` writes, so the operator never fights a scale: a direct
scale of the StatefulSet is drift and is undone. Children carry owner references, so
deleting a pool cascades through the garbage collector; there is no delete handler and so no
finalizer. Status is only written by patch (handlers return None: kopf would store return
values in .status, which the schema prunes). Scanning is off, so a namespaced Role suffices.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from pilot.k8s import GROUP, LABEL_POOL, PLURAL, VERSION, child_name, pod_name
from pilot.k8s.client import Kube, api_client, path
from pilot.k8s.render import problems, service, statefulset
from pilot.k8s.status import invalid_status, now_iso, workload_status

JSON = dict[str, Any]
RESYNC_S = float(os.environ.get("CURTAIL_OPERATOR_RESYNC_S", "30"))
UNSCHEDULABLE_S = float(os.environ.get("CURTAIL_OPERATOR_UNSCHEDULABLE_S", "300"))
_kube: Kube | None = None


def kube() -> Kube:
    global _kube
    if _kube is None:  # in-cluster, else $KUBECONFIG: the same credentials kopf logs in with
        _kube = Kube(api_client())
    return _kube


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf talks to the API server with the credentials the handlers use (pilot.k8s.client)."""
    cfg = kube().api.configuration
    keys = cfg.api_key or {}
    token = keys.get("BearerToken") or keys.get("authorization") or ""
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        scheme="Bearer" if token else None,
        token=token.removeprefix("Bearer ").strip() or None,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.scanning.disabled = True  # no cluster-wide discovery: a namespaced Role suffices
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = logging.WARNING
    try:
        kube().get(f"/apis/{GROUP}/{VERSION}")
    except ApiException as exc:
        raise kopf.PermanentError(
            f"the {PLURAL}.{GROUP} CRD is not served ({exc.status}): kubectl apply -k k8s/crd"
        ) from None


def _subset(want: Any, have: Any) -> bool:
    """``want`` is contained in ``have``; a missing field equals a zero value (omitempty)."""
    if isinstance(want, dict):
        have = have or {}
        return isinstance(have, dict) and all(
            _subset(v, have[k]) if k in have else not v for k, v in want.items()
        )
    if isinstance(want, list):
        have = have or []
        return len(want) == len(have) and all(
            _subset(w, h) for w, h in zip(want, have, strict=True)
        )
    return want == have


def _mutable(obj: JSON, spec_keys: tuple[str, ...]) -> JSON:
    """The parts of a rendered child the operator owns and may patch."""
    meta = obj["metadata"]
    keep = ("labels", "annotations", "ownerReferences")
    return {
        "metadata": {k: meta[k] for k in keep if k in meta},
        "spec": {k: obj["spec"][k] for k in spec_keys},
    }


def ensure(url: str, want: JSON, spec_keys: tuple[str, ...], logger: Any) -> JSON:
    """Create the child, or patch it back where it drifted; returns the live object."""
    live = kube().get_or_none(f"{url}/{want['metadata']['name']}")
    if live is None:
        logger.info(f"creating {want['kind']} {want['metadata']['name']}")
        return kube().create(url, want)
    owned = _mutable(want, spec_keys)
    if _subset(owned, live):
        return live
    logger.info(f"repairing {want['kind']} {want['metadata']['name']}")
    return kube().patch(f"{url}/{want['metadata']['name']}", owned)


def observe(namespace: str, pool: str) -> tuple[JSON | None, JSON | None]:
    sts = kube().get_or_none(path("apps", "v1", "statefulsets", namespace, child_name(pool)))
    pod = kube().get_or_none(path("", "v1", "pods", namespace, pod_name(pool)))
    return sts, pod


def sync(body: JSON, logger: Any) -> JSON:
    """Validate, create or repair the children, and return the pool's new status."""
    errors = problems(body["spec"])
    if errors:  # leave the children as they are: a typo must not tear a site down
        logger.warning(f"invalid spec: {'; '.join(errors)}")
        return invalid_status(body, errors)
    ns = body["metadata"]["namespace"]
    ensure(
        path("", "v1", "services", ns), service(body), ("clusterIP", "selector", "ports"), logger
    )
    sts_url = path("apps", "v1", "statefulsets", ns)
    ensure(sts_url, statefulset(body), ("replicas", "template"), logger)
    sts, pod = observe(ns, body["metadata"]["name"])
    return workload_status(body, sts, pod, UNSCHEDULABLE_S)


def reconcile(body: JSON, patch: kopf.Patch, logger: Any) -> None:
    patch.status.update(sync(body, logger))


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def changed(body: kopf.Body, patch: kopf.Patch, logger: Any, **_: Any) -> None:
    reconcile(dict(body), patch, logger)


@kopf.timer(GROUP, VERSION, PLURAL, interval=RESYNC_S, initial_delay=RESYNC_S)
def resync(body: kopf.Body, patch: kopf.Patch, logger: Any, **_: Any) -> None:
    reconcile(dict(body), patch, logger)


@kopf.on.field(GROUP, VERSION, PLURAL, field="spec.replicas")
def scaled(old: Any, new: Any, patch: kopf.Patch, **_: Any) -> None:
    if old is None:  # the pool's creation, not a scale
        return
    patch.status["lastScaleUp" if (new or 0) > (old or 0) else "lastScaleDown"] = now_iso()


@kopf.on.event("apps", "v1", "statefulsets", labels={LABEL_POOL: kopf.PRESENT})
@kopf.on.event("", "v1", "services", labels={LABEL_POOL: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={LABEL_POOL: kopf.PRESENT})
def child_changed(meta: kopf.Meta, namespace: str, logger: Any, **_: Any) -> None:
    """A child changed (edited, scaled, pod ready or crash-looping): repair it at once and
    refresh its pool's status, rather than wait for the timer."""
    url = path(GROUP, VERSION, PLURAL, namespace, meta["labels"][LABEL_POOL])
    body = kube().get_or_none(url)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return  # the garbage collector is removing the children
    kube().patch(f"{url}/status", {"status": sync(body, logger)})
