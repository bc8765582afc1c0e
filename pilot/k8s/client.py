"""A thin dict-in, dict-out Kubernetes REST client over the official client's transport.

The official client's generated models (kubernetes 37, pydantic v2, OpenAPI of 1.37) are
strict about fields an older API server omits or adds; plain JSON avoids that class of
failure and keeps one code path for built-in and custom resources alike."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

JSON = dict[str, Any]
MERGE = "application/merge-patch+json"


def api_client(kubeconfig: str = "", context: str = "") -> client.ApiClient:
    """In-cluster config when running in a pod (and no kubeconfig is named), else the
    kubeconfig (``kubeconfig`` or $KUBECONFIG or ~/.kube/config) at ``context``."""
    cfg = client.Configuration()
    if not kubeconfig and not context:
        try:
            config.load_incluster_config(client_configuration=cfg)
            return client.ApiClient(cfg)
        except config.ConfigException:
            pass
    # $KUBECONFIG read now: the client library reads it once, at import
    config_file = kubeconfig or os.environ.get("KUBECONFIG") or None
    config.load_kube_config(
        config_file=config_file, context=context or None, client_configuration=cfg
    )
    return client.ApiClient(cfg)


def path(
    group: str, version: str, plural: str, namespace: str = "", name: str = "", sub: str = ""
) -> str:
    """``/api/v1/...`` for the core group (``group=""``), ``/apis/<group>/<version>/...`` else."""
    base = f"/api/{version}" if not group else f"/apis/{group}/{version}"
    parts = [base]
    if namespace:
        parts.append(f"namespaces/{namespace}")
    parts.append(plural)
    if name:
        parts.append(name)
    if sub:
        parts.append(sub)
    return "/".join(parts)


class Kube:
    """REST calls returning decoded JSON; HTTP errors raise ``ApiException``."""

    def __init__(self, api: client.ApiClient, timeout_s: float = 30.0):
        self.api = api
        self.timeout_s = timeout_s

    def _send(
        self,
        method: str,
        url: str,
        body: Any = None,
        query: dict[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> Any:
        params = self.api.param_serialize(
            method,
            url,
            query_params=list((query or {}).items()),
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self.api.call_api(*params, _request_timeout=timeout or self.timeout_s)
        if resp.status >= 400:
            resp.read()
            raise ApiException(status=resp.status, reason=resp.reason, body=resp.data)
        return resp

    def request(self, method: str, url: str, body: Any = None, **kw: Any) -> JSON:
        resp = self._send(method, url, body, **kw)
        resp.read()
        return json.loads(resp.data) if resp.data else {}

    def get(self, url: str, **query: Any) -> JSON:
        return self.request("GET", url, query=query)

    def get_or_none(self, url: str) -> JSON | None:
        try:
            return self.get(url)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, url: str, body: JSON) -> JSON:
        return self.request("POST", url, body)

    def patch(self, url: str, body: JSON) -> JSON:
        return self.request("PATCH", url, body, content_type=MERGE)

    def delete(self, url: str, **options: Any) -> JSON:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", **options}
        return self.request("DELETE", url, body)

    def watch(self, url: str, resource_version: str, timeout_s: int = 60) -> Iterator[JSON]:
        """Events of one watch request (ends after ``timeout_s``; the caller re-watches)."""
        query = {
            "watch": "1",
            "resourceVersion": resource_version,
            "timeoutSeconds": timeout_s,
            "allowWatchBookmarks": "true",
        }
        resp = self._send("GET", url, query=query, timeout=timeout_s + 10)
        try:
            for line in resp.response:
                if line.strip():
                    yield json.loads(line)
        except urllib3.exceptions.ProtocolError:
            return  # the server ended the watch mid-chunk (its timeout): the caller re-watches
        finally:
            resp.response.release_conn()
