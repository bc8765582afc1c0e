"""The Kubernetes provisioner against the running operator, with the SuperLink's own
ServiceAccount token: /scale writes, status from the watch cache, errors at run start."""

from __future__ import annotations

import pytest
from kubetest import sitepool, wait_for
from test_operator import _make_ready, _urls

from pilot.config.sites import Site
from pilot.k8s import GROUP, PLURAL, VERSION
from pilot.k8s.client import path
from pilot.provisioner import make_provisioner

pytestmark = pytest.mark.timeout(300)


def _site(name: str, **k8s: str) -> Site:
    return Site(name, "SPP_TX", [], 1.0, 0.5, 0.0, **k8s)


def test_start_and_stop_scale_the_pool_and_status_follows(cluster, operator):
    ns, _ = operator
    cluster.kube.create(path(GROUP, VERSION, PLURAL, ns), sitepool("texas"))
    pool_url, sts_url, _, pod_url = _urls(ns, "texas")
    wait_for(lambda: cluster.kube.get(pool_url).get("status", {}).get("phase"), 60, "a status")
    kubeconfig = cluster.sa_kubeconfig(ns, "curtail-superlink")
    prov = make_provisioner(
        "kubernetes", sites=[_site("texas")], namespace=ns, kubeconfig=kubeconfig
    )
    try:
        assert prov.status() == {"texas": "stopped"}
        prov.start("texas")
        assert prov.status()["texas"] == "provisioning"  # at once, before the API call lands
        wait_for(lambda: cluster.kube.get_or_none(pod_url), 60, "the pod")
        _make_ready(cluster, pod_url)
        wait_for(lambda: prov.status()["texas"] == "running", 60, "running")
        prov.stop("texas", drain=True)
        assert prov.status()["texas"] == "stopping"
        wait_for(lambda: prov.status()["texas"] == "stopped", 90, "stopped")
        assert cluster.kube.get(sts_url)["spec"]["replicas"] == 0
    finally:
        prov.close()


def test_a_site_without_a_pool_or_with_two_fails_at_run_start(cluster):
    ns = cluster.namespace("prov")
    with pytest.raises(ValueError, match="site 'perth' has no SitePool in namespace"):
        make_provisioner(
            "kubernetes", sites=[_site("perth")], namespace=ns, kubeconfig=cluster.kubeconfig
        )
    for name in ("tx-a", "tx-b"):
        cluster.kube.create(path(GROUP, VERSION, PLURAL, ns), sitepool(name, site="texas"))
    with pytest.raises(ValueError, match=r"site 'texas' has 2 SitePools .*\['tx-a', 'tx-b'\]"):
        make_provisioner(
            "kubernetes", sites=[_site("texas")], namespace=ns, kubeconfig=cluster.kubeconfig
        )


def test_each_site_may_name_its_own_namespace_and_kubeconfig(cluster):
    ns_a, ns_b = cluster.namespace("a"), cluster.namespace("b")
    cluster.kube.create(path(GROUP, VERSION, PLURAL, ns_a), sitepool("texas"))
    cluster.kube.create(path(GROUP, VERSION, PLURAL, ns_b), sitepool("australia", replicas=1))
    sites = [_site("texas"), _site("australia", namespace=ns_b, kubeconfig=cluster.kubeconfig)]
    prov = make_provisioner(
        "kubernetes", sites=sites, namespace=ns_a, kubeconfig=cluster.kubeconfig
    )
    try:
        # no operator here: no status observed these specs yet, so neither reads settled
        assert prov.status() == {"texas": "stopping", "australia": "provisioning"}
        prov.stop("australia")
        url = path(GROUP, VERSION, PLURAL, ns_b, "australia")
        wait_for(lambda: cluster.kube.get(url)["spec"]["replicas"] == 0, 30, "scaled to 0")
    finally:
        prov.close()
