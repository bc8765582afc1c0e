"""The k8s/ manifests: every overlay renders offline (kubectl 1.32's kustomize), uses only
APIs a 1.20 server serves, and passes `kubectl apply --dry-run=server -k`."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from kubetest import K8S

from pilot.config.sites import SITE_NAME_RE

OVERLAYS = ["overlays/dev", "overlays/cloud"]
SERVED_1_20 = {
    "v1",
    "apps/v1",
    "batch/v1",
    "rbac.authorization.k8s.io/v1",
    "apiextensions.k8s.io/v1",
    "curtail.dev/v1alpha1",
}


def _render(overlay: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH")
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_render_with_apis_a_1_20_server_serves(overlay):
    docs = _render(overlay)
    assert {d["apiVersion"] for d in docs} <= SERVED_1_20
    kinds = {d["kind"] for d in docs}
    assert {"CustomResourceDefinition", "Deployment", "StatefulSet", "Job", "SitePool"} <= kinds
    assert not any(d["kind"] in ("ClusterRole", "ClusterRoleBinding") for d in docs)
    pools = {d["spec"]["site"]: d["spec"] for d in docs if d["kind"] == "SitePool"}
    assert set(pools) == {"california", "texas", "australia"}
    assert all(p["replicas"] == 0 for p in pools.values())


def test_cloud_overlay_turns_on_tls_auth_and_gpus():
    docs = _render("overlays/cloud")
    pools = [d["spec"] for d in docs if d["kind"] == "SitePool"]
    assert all(p["superlink"]["insecure"] is False and p["superlink"]["caSecretRef"] for p in pools)
    assert all(
        p["auth"]["privateKeySecretRef"]["name"].startswith("supernode-auth-") for p in pools
    )
    assert all(p["gpus"] == 4 for p in pools)
    (link,) = [
        d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "superlink"
    ]
    args = link["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--enable-supernode-auth" in args and "--insecure" not in args


def test_crd_schema_is_structural_without_cel_and_matches_the_sites_rule():
    crd = yaml.safe_load((K8S / "crds" / "sitepools.yaml").read_text())
    assert "x-kubernetes-validations" not in (K8S / "crds" / "sitepools.yaml").read_text()
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert schema["properties"]["spec"]["properties"]["site"]["pattern"] == SITE_NAME_RE.pattern


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_of_every_overlay_passes_a_server_dry_run(cluster, overlay):
    cluster.kubectl("create", "namespace", "curtail", check=False)  # namespaced objects need it
    out = cluster.kubectl("apply", "--dry-run=server", "-k", str(K8S / overlay), check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("(server dry run)") == len(_render(overlay))
