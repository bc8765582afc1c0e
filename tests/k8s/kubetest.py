"""Helpers for the Kubernetes tests. A real control plane: etcd + kube-apiserver 1.20 + controller
manager + scheduler from ../shared/k8s/start-apiserver.sh on free ports (no kubelet, so pods
stay Pending unless a test patches their status). Skips where the bundle is absent."""

from __future__ import annotations

import base64
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pilot.infra.procs import free_port

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
BUNDLE = Path(os.environ.get("CURTAIL_K8S_BUNDLE", REPO.parent / "shared" / "k8s"))
START, STOP = BUNDLE / "start-apiserver.sh", BUNDLE / "stop-apiserver.sh"


def wait_for(check: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; generous timeouts: 2 shared cores."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def kubectl(kubeconfig: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    return subprocess.run(
        ["kubectl", *args], env=env, capture_output=True, text=True, check=check, timeout=120
    )


class Cluster:
    def __init__(self, kubeconfig: str, run_dir: Path):
        from pilot.k8s.client import Kube, api_client

        self.kubeconfig, self.run_dir = kubeconfig, run_dir
        self.kube = Kube(api_client(kubeconfig))

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return kubectl(self.kubeconfig, *args, check=check)

    def namespace(self, prefix: str = "t") -> str:
        ns = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.kube.create("/api/v1/namespaces", {"metadata": {"name": ns}})
        return ns

    def apply_rbac(self, namespace: str, manifest: str) -> None:
        """The ServiceAccount, Role and RoleBinding of a base manifest, into ``namespace``."""
        from pilot.k8s.client import path

        for doc in yaml.safe_load_all((K8S / "base" / manifest).read_text()):
            kind = doc["kind"]
            if kind == "ServiceAccount":
                url = path("", "v1", "serviceaccounts", namespace)
            elif kind in ("Role", "RoleBinding"):
                plural = "roles" if kind == "Role" else "rolebindings"
                url = path("rbac.authorization.k8s.io", "v1", plural, namespace)
            else:
                continue
            self.kube.create(url, doc)

    def sa_kubeconfig(self, namespace: str, sa: str) -> str:
        """A kubeconfig holding the ServiceAccount's own token: RBAC applies for real."""

        def token() -> str | None:
            secrets = self.kube.get(f"/api/v1/namespaces/{namespace}/secrets")["items"]
            for s in secrets:
                ann = s["metadata"].get("annotations", {})
                if ann.get("kubernetes.io/service-account.name") == sa and s.get("data"):
                    return base64.b64decode(s["data"]["token"]).decode()
            return None

        tok = wait_for(token, 60, f"the token of {sa}")
        cfg = yaml.safe_load(Path(self.kubeconfig).read_text())
        cfg["users"] = [{"name": sa, "user": {"token": tok}}]
        cfg["contexts"][0]["context"].update(user=sa, namespace=namespace)
        out = self.run_dir / f"kubeconfig-{namespace}-{sa}"
        out.write_text(yaml.safe_dump(cfg))
        return str(out)


def start_cluster(run_dir: Path) -> Cluster:
    env = {**os.environ, "APISERVER_PORT": str(free_port()), "ETCD_PORT": str(free_port())}
    out = subprocess.run(
        ["bash", str(START), str(run_dir), "--with-controllers"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if out.returncode != 0:
        subprocess.run(["bash", str(STOP), str(run_dir)], timeout=60)
        raise RuntimeError(f"start-apiserver.sh failed: {out.stderr[-2000:]}")
    return Cluster(out.stdout.strip().splitlines()[-1], run_dir)


def sitepool(name: str, site: str | None = None, **spec: Any) -> dict:
    base = {
        "site": site or name,
        "image": "curtail-llm:test",
        "superlink": {"address": "superlink:9092", "insecure": True},
        "redis": {"urlSecretRef": {"name": "curtail-redis"}},
    }
    return {
        "apiVersion": "curtail.dev/v1alpha1",
        "kind": "SitePool",
        "metadata": {"name": name},
        "spec": {**base, **spec},
    }
