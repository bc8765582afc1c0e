"""The SitePool CRD on a real 1.20 API server: schema validation, defaults, pruning, /scale."""

from __future__ import annotations

import json

import pytest
from kubernetes.client.exceptions import ApiException
from kubetest import sitepool

from pilot.k8s import GROUP, PLURAL, VERSION
from pilot.k8s.client import path


@pytest.fixture(scope="module")
def ns(cluster):
    return cluster.namespace("crd")


def _create(cluster, ns, body):
    return cluster.kube.create(path(GROUP, VERSION, PLURAL, ns), body)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"site": "Texas_1"}, "spec.site in body should match"),
        ({"replicas": -1}, "spec.replicas in body should be greater than or equal to 0"),
        ({"replicas": 2}, "spec.replicas in body should be less than or equal to 1"),
        ({"image": ""}, "spec.image in body should be at least 1 chars long"),
        ({"gpus": "four"}, 'spec.gpus in body must be of type integer: "string"'),
        ({"superlink": {"insecure": True}}, "spec.superlink.address: Required value"),
    ],
)
def test_invalid_sitepools_are_rejected_with_the_schema_message(cluster, ns, spec, message):
    body = sitepool("bad")
    body["spec"].update(spec)
    with pytest.raises(ApiException) as err:
        _create(cluster, ns, body)
    assert err.value.status == 422
    assert message in json.loads(err.value.body)["message"]


def test_missing_image_is_rejected(cluster, ns):
    body = sitepool("noimage")
    del body["spec"]["image"]
    with pytest.raises(ApiException) as err:
        _create(cluster, ns, body)
    assert "spec.image: Required value" in json.loads(err.value.body)["message"]


def test_defaults_apply_and_unknown_fields_are_pruned(cluster, ns):
    body = sitepool("defaults")
    body["spec"]["bogus"] = 1
    spec = _create(cluster, ns, body)["spec"]
    assert "bogus" not in spec
    assert spec["replicas"] == 0 and spec["gpus"] == 0 and spec["suspend"] is False
    assert spec["gpuResource"] == "nvidia.com/gpu"
    assert spec["drain"] == {"gracePeriodSeconds": 600, "preStop": True}
    assert spec["storage"] == {"state": {"size": "20Gi"}}
    assert spec["redis"]["urlSecretRef"]["key"] == "url"


def test_kubectl_scale_writes_replicas_and_the_maximum_holds(cluster, ns):
    _create(cluster, ns, sitepool("scaled"))
    cluster.kubectl("-n", ns, "scale", "sitepool/scaled", "--replicas=1")
    url = path(GROUP, VERSION, PLURAL, ns, "scaled")
    assert cluster.kube.get(url)["spec"]["replicas"] == 1
    out = cluster.kubectl("-n", ns, "scale", "sp/scaled", "--replicas=2", check=False)
    assert out.returncode != 0 and "less than or equal to 1" in out.stderr
    assert cluster.kube.get(url)["spec"]["replicas"] == 1


def test_printer_columns_show_site_desired_and_gpus(cluster, ns):
    _create(cluster, ns, sitepool("columns", site="texas", gpus=4))
    out = cluster.kubectl("-n", ns, "get", "sp", "columns").stdout.split("\n")
    assert out[0].split() == ["NAME", "SITE", "DESIRED", "READY", "PHASE", "GPUS", "REASON", "AGE"]
    assert out[1].split()[:3] == ["columns", "texas", "0"]
