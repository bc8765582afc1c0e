"""Kubernetes provisioner: each site is a SitePool (k8s/crds/sitepools.yaml) whose operator
runs the SuperNode; this class only writes ``/scale`` and reads the pools' status.

- Sites map to SitePools by ``spec.site`` in the site's cluster: a site in the sites config
  may name its own ``kubeconfig``/``context``/``namespace``; the default is the run's
  ``k8s_kubeconfig`` (or in-cluster config) and ``k8s_namespace``. A site with no pool, or
  with two, is an error at construction, i.e. at run start.
- ``start``/``stop`` record the wanted replica count and return at once; one worker thread
  patches ``/scale`` and retries failures with exponential backoff, so a slow or absent API
  server never blocks the ServerApp's control loop.
- ``stop(drain=False)`` also deletes the pod at once (grace 0), at most once a minute: the
  ServerApp uses it for a node that stopped answering.
- ``status()`` reads a list+watch cache per cluster (pilot.k8s.cache); a wanted count the
  cache does not show yet reads ``provisioning``/``stopping``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pilot.k8s import GROUP, PLURAL, VERSION, pod_name
from pilot.k8s.cache import PoolCache
from pilot.k8s.client import Kube, api_client, path
from pilot.provisioner.base import Provisioner

JSON = dict[str, Any]
log = logging.getLogger(__name__)
KILL_EVERY_S = 60.0


@dataclass
class _Pool:
    cache: PoolCache
    name: str
    want: int | None = None  # replicas asked for and not yet written
    next_try: float = 0.0
    failures: int = 0
    last_kill: float = -KILL_EVERY_S

    @property
    def kube(self) -> Kube:
        return self.cache.kube

    def body(self) -> JSON | None:
        return self.cache.snapshot().get(self.name)


def _pool_state(body: JSON | None) -> str:
    """The provisioner state a SitePool's spec and status read as (KUBERNETES.md's table)."""
    if body is None:
        return "failed:SitePool deleted"
    spec, st = body["spec"], body.get("status", {})
    if spec.get("suspend"):
        return "failed:suspended"
    current = st.get("observedGeneration", 0) >= body["metadata"].get("generation", 0)
    if current and st.get("phase") == "Failed":
        ready = next((c for c in st.get("conditions", []) if c["type"] == "Ready"), {})
        return f"failed:{ready.get('reason', 'Failed')}"
    if not spec.get("replicas"):
        return "stopped" if current and not st.get("replicas") else "stopping"
    return "running" if current and st.get("readyReplicas", 0) >= 1 else "provisioning"


class KubernetesProvisioner(Provisioner):
    def __init__(
        self,
        sites: Iterable[Any],
        namespace: str = "curtail",
        kubeconfig: str = "",
        max_backoff_s: float = 30.0,
        **_: Any,
    ):
        self.max_backoff_s = max_backoff_s
        caches: dict[tuple[str, str, str], PoolCache] = {}
        self.pools: dict[str, _Pool] = {}
        for s in sites:
            name = getattr(s, "name", s)
            key = (
                getattr(s, "kubeconfig", "") or kubeconfig,
                getattr(s, "context", ""),
                getattr(s, "namespace", "") or namespace,
            )
            try:
                if key not in caches:
                    caches[key] = PoolCache(Kube(api_client(key[0], key[1])), key[2])
                    caches[key].start()
                self.pools[name] = _Pool(caches[key], self._find(caches[key], name, key))
            except Exception:
                for cache in caches.values():  # no watch threads left behind a failed start
                    cache.close()
                raise
        self._caches = list(caches.values())
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._worker = threading.Thread(target=self._work, daemon=True)
        self._worker.start()

    @staticmethod
    def _find(cache: PoolCache, site: str, key: tuple[str, str, str]) -> str:
        names = sorted(n for n, p in cache.snapshot().items() if p["spec"]["site"] == site)
        where = f"namespace {key[2]!r} of {key[0] or 'the default cluster'}"
        where += f" (context {key[1]!r})" if key[1] else ""
        if not names:
            raise ValueError(
                f"site {site!r} has no SitePool in {where}: apply one with spec.site: {site}"
                " (k8s/sitepools/)"
            )
        if len(names) > 1:
            raise ValueError(f"site {site!r} has {len(names)} SitePools in {where}: {names}")
        return names[0]

    def _pool(self, site: str) -> _Pool:
        if site not in self.pools:
            raise ValueError(f"unknown site {site!r}; the sites config has {sorted(self.pools)}")
        return self.pools[site]

    def _want(self, site: str, replicas: int) -> None:
        pool = self._pool(site)
        with self._lock:
            pool.want, pool.next_try, pool.failures = replicas, 0.0, 0
        self._wake.set()

    # -- interface ----------------------------------------------------------------------------
    def start(self, site: str) -> None:
        self._want(site, 1)

    def stop(self, site: str, drain: bool = True) -> None:
        self._want(site, 0)
        pool = self._pool(site)
        if not drain and time.monotonic() - pool.last_kill >= KILL_EVERY_S:
            pool.last_kill = time.monotonic()
            threading.Thread(target=self._kill, args=(pool,), daemon=True).start()

    def status(self) -> dict[str, str]:
        out = {}
        with self._lock:
            wants = {site: pool.want for site, pool in self.pools.items()}
        for site, pool in self.pools.items():
            state = _pool_state(pool.body())
            if wants[site] is not None and not state.startswith("failed:"):
                state = "provisioning" if wants[site] else "stopping"  # not written yet
            out[site] = state
        return out

    def close(self) -> None:
        super().close()
        deadline = time.monotonic() + 10.0  # let the last scale-downs reach the API server
        while time.monotonic() < deadline and any(p.want is not None for p in self.pools.values()):
            time.sleep(0.1)
        self._closed = True
        self._wake.set()
        for cache in self._caches:
            cache.close()

    # -- worker -------------------------------------------------------------------------------
    def _kill(self, pool: _Pool) -> None:
        ns = pool.cache.namespace
        try:
            pool.kube.delete(path("", "v1", "pods", ns, pod_name(pool.name)), gracePeriodSeconds=0)
        except Exception as exc:  # gone already, or no permission: the scale-down still holds
            log.warning(f"deleting pod {pod_name(pool.name)} failed: {exc!r}")

    def _scale(self, pool: _Pool, replicas: int) -> None:
        url = path(GROUP, VERSION, PLURAL, pool.cache.namespace, pool.name, "scale")
        pool.kube.patch(url, {"spec": {"replicas": replicas}})

    def _work(self) -> None:
        while not self._closed:
            self._wake.clear()  # before reading intents: a start() from now on wakes us again
            now = time.monotonic()
            with self._lock:
                due = [(p, p.want) for p in self.pools.values() if p.want is not None]
            for pool, want in due:
                if pool.next_try > now:
                    continue
                try:
                    self._scale(pool, want)
                except Exception as exc:
                    with self._lock:
                        pool.failures += 1
                        delay = min(self.max_backoff_s, 0.5 * 2**pool.failures)
                        pool.next_try = time.monotonic() + delay
                    log.warning(f"scaling SitePool {pool.name} to {want} failed ({exc!r})")
                    continue
                with self._lock:
                    if pool.want == want:  # else a newer intent arrived meanwhile
                        pool.want = None
            waits = [
                p.next_try - time.monotonic() for p in self.pools.values() if p.want is not None
            ]
            self._wake.wait(max(0.05, min(waits)) if waits else None)
