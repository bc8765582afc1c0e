"""What a SitePool's status says, from its spec and what the cluster shows (pure).

Phases: Suspended (held at 0 by spec.suspend), Failed (crash loop, image pull, bad config, or
unschedulable for longer than ``unschedulable_s``), Stopped (0 wanted, no pod), Draining (0
wanted, the pod still terminating), Running (1 wanted, pod ready), Starting (anything else).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pilot.k8s import pod_name, selector
from pilot.k8s.render import replicas

JSON = dict[str, Any]
FAILING_WAIT_REASONS = (
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
)


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _age_s(stamp: str | None, now: datetime) -> float:
    if not stamp:
        return 0.0
    t = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return (now - t).total_seconds()


def pod_summary(pod: JSON) -> JSON:
    st = pod.get("status", {})
    cs = (st.get("containerStatuses") or [{}])[0]
    waiting = cs.get("state", {}).get("waiting", {})
    return {
        "name": pod["metadata"]["name"],
        "phase": "Terminating" if pod["metadata"].get("deletionTimestamp") else st.get("phase", ""),
        "ready": bool(cs.get("ready")),
        "restarts": int(cs.get("restartCount", 0)),
        # None deletes a stale reason (merge patch); a 1.20 server reads "" here as null
        "reason": waiting.get("reason") or None,
    }


def failure(pod: JSON | None, unschedulable_s: float, now: datetime) -> str:
    """Why the pod cannot run ("" when it may still come up)."""
    if pod is None:
        return ""
    reason = pod_summary(pod)["reason"]
    if reason and reason in FAILING_WAIT_REASONS:
        return reason
    for cond in pod.get("status", {}).get("conditions", []):
        if cond.get("type") == "PodScheduled" and cond.get("reason") == "Unschedulable":
            if _age_s(cond.get("lastTransitionTime"), now) >= unschedulable_s:
                return "Unschedulable"
    return ""


def phase(spec: JSON, pod: JSON | None, failed: str) -> str:
    if spec.get("suspend"):
        return "Draining" if pod is not None else "Suspended"
    if failed and replicas(spec):
        return "Failed"
    if not replicas(spec):
        return "Draining" if pod is not None else "Stopped"
    return "Running" if pod is not None and pod_summary(pod)["ready"] else "Starting"


def condition(prev: list[JSON], type_: str, ok: bool, reason: str, message: str = "") -> JSON:
    """A condition whose lastTransitionTime moves only when its status flips."""
    status = "True" if ok else "False"
    old = next((c for c in prev if c.get("type") == type_), {})
    since = old.get("lastTransitionTime") if old.get("status") == status else None
    out = {"type": type_, "status": status, "reason": reason}
    if message:  # never "": a 1.20 server reads an empty string in a list item as null
        out["message"] = message
    return {**out, "lastTransitionTime": since or now_iso()}


def invalid_status(body: JSON, errors: list[str]) -> JSON:
    prev = body.get("status", {}).get("conditions", [])
    msg = "; ".join(errors)
    return {
        "observedGeneration": body["metadata"].get("generation", 0),
        "phase": "Failed",
        "conditions": [
            condition(prev, "SpecValid", False, "InvalidSpec", msg),
            condition(prev, "Ready", False, "InvalidSpec", msg),
        ],
    }


def workload_status(
    body: JSON, sts: JSON | None, pod: JSON | None, unschedulable_s: float = 300.0
) -> JSON:
    spec, prev = body["spec"], body.get("status", {}).get("conditions", [])
    now = datetime.now(UTC)
    failed = failure(pod, unschedulable_s, now)
    ph = phase(spec, pod, failed)
    sts_status = (sts or {}).get("status", {})
    pool = body["metadata"]["name"]
    return {
        "replicas": int(sts_status.get("replicas", 0)),
        "readyReplicas": int(sts_status.get("readyReplicas", 0)),
        "selector": selector(pool),
        "phase": ph,
        "observedGeneration": body["metadata"].get("generation", 0),
        "pod": pod_summary(pod) if pod is not None else {"name": pod_name(pool)},
        "conditions": [
            condition(prev, "SpecValid", True, "Valid"),
            condition(prev, "Ready", ph == "Running", failed or ph),
            condition(prev, "Progressing", ph in ("Starting", "Draining"), ph),
            condition(prev, "Degraded", ph == "Failed", failed or "AsExpected"),
        ],
    }
