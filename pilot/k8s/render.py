"""SitePool spec -> the StatefulSet and headless Service of its SuperNode (pure functions).

``problems(spec)`` holds the cross-field rules a structural schema cannot express on 1.20
(no CEL); the operator renders nothing while any is reported. Paths inside the pod:

    /var/lib/curtail          the state PVC: CURTAIL_HOME, FLWR_HOME, inner optimizer state
    /etc/curtail/tls/ca.crt   the SuperLink's CA (caSecretRef)
    /etc/curtail/auth/supernode.key   the SuperNode auth key (auth.privateKeySecretRef)
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from pilot.infra.signals import ENV_URL
from pilot.k8s import API_VERSION, HEALTH_PORT, KIND, LABEL_POOL, LABEL_SITE, SPEC_HASH, child_name

JSON = dict[str, Any]
HOME = "/var/lib/curtail"
CA_PATH = "/etc/curtail/tls/ca.crt"
AUTH_KEY_PATH = "/etc/curtail/auth/supernode.key"
UID = 10001
RESERVED_NODE_CONFIG = ("site", "state-dir", "cpu-threads")
RESERVED_ENV = (ENV_URL, "CUDA_VISIBLE_DEVICES", "FLWR_HOME", "CURTAIL_HOME", "HOME")


def problems(spec: JSON) -> list[str]:
    """Cross-field errors of a schema-valid spec; empty when the spec can be rendered."""
    out = []
    link = spec.get("superlink", {})
    if bool(link.get("insecure")) == bool(link.get("caSecretRef")):
        out.append("superlink: set exactly one of insecure: true or caSecretRef")
    if spec.get("auth", {}).get("privateKeySecretRef") and link.get("insecure"):
        out.append("auth: SuperNode authentication needs TLS (superlink.caSecretRef)")
    reserved = sorted(set(spec.get("nodeConfig", {})) & set(RESERVED_NODE_CONFIG))
    if reserved:
        out.append(f"nodeConfig: {reserved} are set by the operator")
    env = sorted({e["name"] for e in spec.get("env", [])} & set(RESERVED_ENV))
    if env:
        out.append(f"env: {env} are set by the operator")
    gpu_res = spec.get("gpuResource", "nvidia.com/gpu")
    if gpu_res in spec.get("resources", {}).get("limits", {}):
        out.append(f"resources.limits: {gpu_res} comes from gpus, do not set it")
    return out


def cpu_threads(spec: JSON) -> int:
    """spec.cpuThreads, else the CPU limit (rounded down, at least 1), else 1."""
    if spec.get("cpuThreads"):
        return int(spec["cpuThreads"])
    cpu = str(spec.get("resources", {}).get("limits", {}).get("cpu", "1"))
    cores = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    return max(1, math.floor(cores))


def _node_config(spec: JSON) -> str:
    # flwr parses values as TOML: strings quoted, numbers bare
    items: dict[str, Any] = {
        "site": spec["site"],
        "state-dir": f"{HOME}/state",
        "cpu-threads": cpu_threads(spec),
    }
    items.update(spec.get("nodeConfig", {}))
    return " ".join(f"{k}={json.dumps(v)}" for k, v in items.items())


def supernode_args(spec: JSON) -> list[str]:
    link = spec["superlink"]
    args = ["--superlink", link["address"]]
    args += ["--insecure"] if link.get("insecure") else ["--root-certificates", CA_PATH]
    if spec.get("auth", {}).get("privateKeySecretRef"):
        args += ["--auth-supernode-private-key", AUTH_KEY_PATH]
    return args + [
        "--node-config",
        _node_config(spec),
        "--health-server-address",
        f"0.0.0.0:{HEALTH_PORT}",
    ]


def _env(spec: JSON) -> list[JSON]:
    ref = spec["redis"]["urlSecretRef"]
    gpus = int(spec.get("gpus", 0))
    return [
        {
            "name": ENV_URL,
            "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref.get("key", "url")}},
        },
        {"name": "CUDA_VISIBLE_DEVICES", "value": ",".join(str(i) for i in range(gpus))},
        {"name": "CURTAIL_HOME", "value": HOME},
        {"name": "FLWR_HOME", "value": f"{HOME}/flwr-home"},
        {"name": "HOME", "value": HOME},
        *spec.get("env", []),
    ]


def _resources(spec: JSON) -> JSON:
    # quantities as strings, as the API server returns them (drift checks compare the two)
    res = {k: {r: str(q) for r, q in v.items()} for k, v in spec.get("resources", {}).items()}
    gpus = int(spec.get("gpus", 0))
    if gpus:  # extended resources: the request must equal the limit
        gpu_res = spec.get("gpuResource", "nvidia.com/gpu")
        res.setdefault("limits", {})[gpu_res] = str(gpus)
        res.setdefault("requests", {})[gpu_res] = str(gpus)
    return res


def _secret_volume(name: str, ref: JSON, default_key: str, file: str, mode: int) -> JSON:
    items = [{"key": ref.get("key", default_key), "path": file, "mode": mode}]
    return {"name": name, "secret": {"secretName": ref["name"], "items": items}}


def _volumes(spec: JSON) -> tuple[list[JSON], list[JSON]]:
    """(pod volumes, supernode mounts); the state PVC comes from volumeClaimTemplates."""
    volumes = [{"name": "tmp", "emptyDir": {}}]
    mounts = [{"name": "state", "mountPath": HOME}, {"name": "tmp", "mountPath": "/tmp"}]
    ca = spec["superlink"].get("caSecretRef")
    if ca:
        volumes.append(_secret_volume("superlink-ca", ca, "ca.crt", "ca.crt", 0o444))
        mounts.append({"name": "superlink-ca", "mountPath": "/etc/curtail/tls", "readOnly": True})
    key = spec.get("auth", {}).get("privateKeySecretRef")
    if key:
        volumes.append(_secret_volume("auth-key", key, "supernode.key", "supernode.key", 0o400))
        mounts.append({"name": "auth-key", "mountPath": "/etc/curtail/auth", "readOnly": True})
    return volumes, mounts


def _container(spec: JSON, mounts: list[JSON]) -> JSON:
    drain = spec.get("drain", {})
    probe = {"tcpSocket": {"port": HEALTH_PORT}, "periodSeconds": 10}
    container = {
        "name": "supernode",
        "image": spec["image"],
        "imagePullPolicy": spec.get("imagePullPolicy", "IfNotPresent"),
        "command": ["flower-supernode"],
        "args": supernode_args(spec),
        "env": _env(spec),
        "resources": _resources(spec),
        "volumeMounts": mounts,
        "ports": [{"name": "health", "containerPort": HEALTH_PORT}],
        "readinessProbe": probe,
        "livenessProbe": {**probe, "failureThreshold": 6},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if drain.get("preStop", True):
        grace = int(drain.get("gracePeriodSeconds", 600))
        cmd = ["python", "-m", "pilot.k8s.drain", "--site", spec["site"], "--grace", str(grace)]
        container["lifecycle"] = {"preStop": {"exec": {"command": cmd}}}
    return container


def _pod_spec(spec: JSON) -> JSON:
    volumes, mounts = _volumes(spec)
    sched = spec.get("scheduling", {})
    pod = {
        "containers": [_container(spec, mounts)],
        "volumes": volumes,
        # the SuperNode never talks to the API server: no token in the pod
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"fsGroup": UID, "runAsNonRoot": True},
        "terminationGracePeriodSeconds": int(spec.get("drain", {}).get("gracePeriodSeconds", 600)),
    }
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        if sched.get(key):
            pod[key] = sched[key]
    return pod


def labels(pool: str, spec: JSON) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "supernode",
        "app.kubernetes.io/managed-by": "curtail-operator",
        LABEL_POOL: pool,
        LABEL_SITE: spec["site"],
    }


def owner_reference(body: JSON) -> JSON:
    meta = body["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def replicas(spec: JSON) -> int:
    """Desired pods: 0 while suspended; clamped to 0..1 even if /scale let more through."""
    return 0 if spec.get("suspend") else max(0, min(1, int(spec.get("replicas", 0))))


def spec_hash(spec: JSON) -> str:
    """Hash of what shapes the pod (everything but replicas/suspend, which /scale owns)."""
    shaping = {k: v for k, v in spec.items() if k not in ("replicas", "suspend")}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def _volume_claim(spec: JSON) -> JSON:
    state = spec.get("storage", {}).get("state", {})
    claim: JSON = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": state.get("size", "20Gi")}},
    }
    if state.get("storageClassName"):
        claim["storageClassName"] = state["storageClassName"]
    return {"metadata": {"name": "state"}, "spec": claim}


def statefulset(body: JSON) -> JSON:
    pool, spec = body["metadata"]["name"], body["spec"]
    lab = labels(pool, spec)
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": child_name(pool),
            "labels": lab,
            "annotations": {SPEC_HASH: spec_hash(spec)},
            "ownerReferences": [owner_reference(body)],
        },
        "spec": {
            "replicas": replicas(spec),
            "serviceName": child_name(pool),
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {LABEL_POOL: pool}},
            "template": {"metadata": {"labels": lab}, "spec": _pod_spec(spec)},
            "volumeClaimTemplates": [_volume_claim(spec)],
        },
    }


def service(body: JSON) -> JSON:
    pool, spec = body["metadata"]["name"], body["spec"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": child_name(pool),
            "labels": labels(pool, spec),
            "ownerReferences": [owner_reference(body)],
        },
        "spec": {
            "clusterIP": "None",
            "selector": {LABEL_POOL: pool},
            "ports": [{"name": "health", "port": HEALTH_PORT}],
            "publishNotReadyAddresses": True,
        },
    }
