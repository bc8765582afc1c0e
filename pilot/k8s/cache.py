"""A list+watch cache of one namespace's SitePools, kept fresh by a daemon thread.

Readers get a snapshot from memory, never a GET: the ServerApp's control loop asks for every
site's state each tick. The thread re-watches when a watch times out and re-lists on 410
Gone or any error, with exponential backoff."""

from __future__ import annotations

import logging
import threading
from typing import Any

from pilot.k8s import GROUP, PLURAL, VERSION
from pilot.k8s.client import Kube, path

JSON = dict[str, Any]
log = logging.getLogger(__name__)


class PoolCache:
    def __init__(self, kube: Kube, namespace: str, watch_s: int = 30, max_backoff_s: float = 30):
        self.kube, self.namespace = kube, namespace
        self.url = path(GROUP, VERSION, PLURAL, namespace)
        self.watch_s, self.max_backoff_s = watch_s, max_backoff_s
        self._pools: dict[str, JSON] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> dict[str, JSON]:
        """List once (errors raise here, at run start), then keep watching; returns the list."""
        rv = self._list()
        self._thread = threading.Thread(target=self._run, args=(rv,), daemon=True)
        self._thread.start()
        return self.snapshot()

    def snapshot(self) -> dict[str, JSON]:
        with self._lock:
            return dict(self._pools)

    def close(self) -> None:
        self._closed.set()  # the thread notices after its current watch returns

    def _list(self) -> str:
        out = self.kube.get(self.url)
        with self._lock:
            self._pools = {p["metadata"]["name"]: p for p in out.get("items", [])}
        return out["metadata"]["resourceVersion"]

    def _apply(self, event: JSON) -> str | None:
        """Fold one watch event into the cache; None asks for a re-list (410 Gone)."""
        kind, obj = event["type"], event["object"]
        if kind == "ERROR":
            return None
        if kind == "BOOKMARK":  # only a newer resourceVersion to resume from
            return obj["metadata"]["resourceVersion"]
        name = obj["metadata"]["name"]
        if kind in ("ADDED", "MODIFIED"):
            with self._lock:
                self._pools[name] = obj
        elif kind == "DELETED":
            with self._lock:
                self._pools.pop(name, None)
        return obj["metadata"]["resourceVersion"]

    def _run(self, rv: str) -> None:
        failures = 0
        while not self._closed.is_set():
            try:
                for event in self.kube.watch(self.url, rv, self.watch_s):
                    new = self._apply(event)
                    rv = new if new is not None else self._list()
                failures = 0
            except Exception as exc:  # the API server restarting, a network blip
                failures += 1
                delay = min(self.max_backoff_s, 0.5 * 2**failures)
                log.warning(f"SitePool watch in {self.namespace} failed ({exc!r}); retry {delay}s")
                if self._closed.wait(delay):
                    return
                try:
                    rv = self._list()
                except Exception as exc2:
                    log.warning(f"SitePool list in {self.namespace} failed: {exc2!r}")
