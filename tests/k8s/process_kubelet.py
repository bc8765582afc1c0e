"""A test-only kubelet that runs Pods as local processes (there is no kubelet or container
runtime here; Linux namespaces stand in for the container, so it needs root).

- Registers a Ready Node and keeps its heartbeat; binds Pending Pods without a node to itself
  when their ``nodeSelector`` matches its labels (and takes those the scheduler bound to it).
- Each Pod gets a sandbox: a ``sleep`` as PID 1 of fresh network, PID and mount namespaces
  (``unshare``), so every pod has its own loopback and ports, and a pod's ``/proc`` shows
  only its own processes. Containers run in it through ``nsenter``.
- Volumes are host directories bind-mounted at their ``mountPath`` in the pod's mount
  namespace: ``emptyDir`` (per pod), ``secret``/``configMap`` (files written from the API)
  and ``persistentVolumeClaim`` (one directory per claim that outlives its pods, like a PV).
- Networking: the pod's loopback addresses ``forward_ports`` reach the host's loopback (a
  per-pod TCP relay), which stands in for Service IPs and DNS.
- Env: ``value``, ``$(VAR)`` expansion, ``secretKeyRef``, ``configMapKeyRef``, ``fieldRef``.
  The command is ``command + args`` (the image's entrypoint does not exist here); the image
  is this checkout: the process runs in ``workdir`` with the kubelet's PATH.
- Status: Running, Ready from the readiness probe (tcpSocket or exec), container statuses
  with restart counts and exit codes; ``restartPolicy`` Always/OnFailure restarts with
  back-off (reported as CrashLoopBackOff, as a kubelet does); Never ends the pod Succeeded
  or Failed.
- Deletion: the preStop exec hook, then SIGTERM to the container's process, SIGKILL of the
  whole pod after ``terminationGracePeriodSeconds``, then the final DELETE (grace 0).

Not modelled: images, users and securityContext (processes run as root), resource limits,
init containers, liveness restarts, httpGet probes, Service VIPs, CNI, DNS.
"""

from __future__ import annotations

import base64
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from pilot.k8s.client import Kube, path

JSON = dict[str, Any]
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


def in_netns(pid: int, fn: Any) -> Any:
    """Run ``fn()`` in this thread inside the network namespace of ``pid`` (sockets it makes
    stay there), then return to the thread's own namespace."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        _setns(target)
        try:
            return fn()
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _relay(listener: socket.socket, port: int) -> None:
    """Accept in the pod's namespace, connect in the host's: the pod reaches host:port."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # closed with the pod
        try:
            up = socket.create_connection(("127.0.0.1", port), timeout=10)
            up.settimeout(None)
        except OSError:
            conn.close()
            continue
        for a, b in ((conn, up), (up, conn)):
            threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


class Container:
    def __init__(self, pod: Pod, spec: JSON):
        self.pod, self.spec, self.name = pod, spec, spec["name"]
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.ready = False
        self.started_at = ""
        self.last_exit: JSON | None = None  # {"exitCode":..., "finishedAt":...}
        self.backoff_until: float | None = None  # waiting to be restarted after an exit

    def argv(self, env: dict[str, str]) -> list[str]:
        words = [*self.spec.get("command", []), *self.spec.get("args", [])]
        return [_expand(w, env) for w in words]

    def start(self) -> None:
        env = self.pod.env(self.spec)
        log = open(self.pod.dir / f"{self.name}.log", "ab")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen(
            self.pod.nsenter(self.argv(env)),
            env=env,
            cwd=self.pod.kubelet.workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.ready, self.started_at = False, _now()

    def main_pid(self) -> int | None:
        """The container's process (nsenter's child, which nsenter waits for)."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        kids = _children(self.proc.pid)
        return kids[0] if kids else None

    def probe(self) -> bool:
        probe = self.spec.get("readinessProbe")
        if not probe:
            return True
        if "tcpSocket" in probe:
            port = int(probe["tcpSocket"]["port"])

            def connect() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    return True
                except OSError:
                    return False

            return in_netns(self.pod.sandbox_pid, connect)
        if "exec" in probe:
            return self.pod.exec(probe["exec"]["command"], timeout=10) == 0
        raise NotImplementedError(f"probe {sorted(probe)} is not modelled")

    def status(self) -> JSON:
        out: JSON = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "restartCount": self.restarts,
            "ready": self.ready,
            "started": self.proc is not None and self.proc.poll() is None,
        }
        if self.proc is not None and self.proc.poll() is None:
            out["state"] = {"running": {"startedAt": self.started_at}}
        elif self.backoff_until is not None:  # as a real kubelet reports a restart back-off
            out["state"] = {"waiting": {"reason": "CrashLoopBackOff"}}
            out["lastState"] = {"terminated": self.last_exit}
        elif self.last_exit is not None:
            out["state"] = {"terminated": self.last_exit}
        else:
            out["state"] = {"waiting": {"reason": "ContainerCreating"}}
        if self.last_exit is not None and "running" in out["state"]:
            out["lastState"] = {"terminated": self.last_exit}
        return out


def _expand(word: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), word)


class Pod:
    def __init__(self, kubelet: ProcessKubelet, body: JSON):
        self.kubelet, self.body = kubelet, body
        meta = body["metadata"]
        self.ns, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.url = path("", "v1", "pods", self.ns, self.name)
        self.dir = kubelet.root / "pods" / self.uid
        self.containers = [Container(self, c) for c in body["spec"]["containers"]]
        self.sandbox: subprocess.Popen | None = None
        self.sandbox_pid = 0
        self.listeners: list[socket.socket] = []
        self.terminating = False
        self.done = threading.Event()
        self.last_status: JSON | None = None

    # -- sandbox ------------------------------------------------------------------------------
    def _mounts(self) -> list[tuple[Path, str]]:
        """(host directory, mountPath) of every volume mount, materialised."""
        spec, kube = self.body["spec"], self.kubelet.kube
        vols: dict[str, Path] = {}
        for vol in spec.get("volumes", []):
            name, d = vol["name"], self.dir / "volumes" / vol["name"]
            if "emptyDir" in vol:
                d.mkdir(parents=True, exist_ok=True)
            elif "persistentVolumeClaim" in vol:
                d = self.kubelet.claim_dir(self.ns, vol["persistentVolumeClaim"]["claimName"])
            elif "secret" in vol or "configMap" in vol:
                kind = "secret" if "secret" in vol else "configMap"
                src = vol[kind]
                obj_name = src["secretName"] if kind == "secret" else src["name"]
                plural = "secrets" if kind == "secret" else "configmaps"
                obj = kube.get(path("", "v1", plural, self.ns, obj_name))
                data = obj.get("data", {})
                d.mkdir(parents=True, exist_ok=True)
                for item in src.get("items") or [{"key": k, "path": k} for k in data]:
                    raw = data[item["key"]]
                    f = d / item["path"]
                    f.write_bytes(base64.b64decode(raw) if kind == "secret" else raw.encode())
                    f.chmod(item.get("mode", src.get("defaultMode", 0o644)))
            else:
                raise NotImplementedError(f"volume {vol} is not modelled")
            vols[name] = d
        return [
            (vols[m["name"]], m["mountPath"])
            for c in spec["containers"]
            for m in c.get("volumeMounts", [])
        ]

    def start_sandbox(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        script = ["ip link set lo up"]
        for host, target in self._mounts():
            script.append(f"mkdir -p '{target}' && mount --bind '{host}' '{target}'")
        script.append("exec sleep infinity")
        self.sandbox = subprocess.Popen(
            ["unshare", "--net", "--pid", "--mount", "--fork", "--mount-proc"]
            + ["sh", "-ec", "; ".join(script)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "sandbox.log", "ab"),  # noqa: SIM115
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            kids = _children(self.sandbox.pid)
            if kids and Path(f"/proc/{kids[0]}/cmdline").read_bytes().startswith(b"sleep"):
                self.sandbox_pid = kids[0]
                break
            if self.sandbox.poll() is not None:
                raise RuntimeError((self.dir / "sandbox.log").read_text()[-2000:])
            time.sleep(0.05)
        else:
            raise RuntimeError(f"sandbox of {self.name} did not come up")
        for port in self.kubelet.forward_ports:
            sock = in_netns(self.sandbox_pid, lambda p=port: socket.create_server(("127.0.0.1", p)))
            self.listeners.append(sock)
            threading.Thread(target=_relay, args=(sock, port), daemon=True).start()

    def nsenter(self, argv: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self.sandbox_pid), "--net", "--pid", "--mount", "--", *argv]

    def exec(self, command: list[str], timeout: float) -> int:
        """Run a command in the pod (a probe or a hook), its output to the pod's hooks.log."""
        env = self.env(self.containers[0].spec)
        with open(self.dir / "hooks.log", "ab") as log:
            try:
                return subprocess.run(
                    self.nsenter(command),
                    env=env,
                    cwd=self.kubelet.workdir,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=max(1.0, timeout),
                ).returncode
            except subprocess.TimeoutExpired:
                return -1

    def env(self, container: JSON) -> dict[str, str]:
        kube, out = self.kubelet.kube, dict(self.kubelet.base_env)
        fields = {
            "metadata.name": self.name,
            "metadata.namespace": self.ns,
            "metadata.uid": self.uid,
            "spec.nodeName": self.kubelet.node,
            "status.podIP": "127.0.0.1",
        }
        for e in container.get("env", []):
            src = e.get("valueFrom")
            if src is None:
                out[e["name"]] = _expand(e.get("value", ""), out)
            elif "fieldRef" in src:
                out[e["name"]] = fields[src["fieldRef"]["fieldPath"]]
            else:
                kind = "secretKeyRef" if "secretKeyRef" in src else "configMapKeyRef"
                ref = src[kind]
                plural = "secrets" if kind == "secretKeyRef" else "configmaps"
                obj = kube.get(path("", "v1", plural, self.ns, ref["name"]))
                raw = obj.get("data", {})[ref["key"]]
                out[e["name"]] = base64.b64decode(raw).decode() if plural == "secrets" else raw
        return out

    # -- life ---------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self.start_sandbox()
            for c in self.containers:
                c.start()
            self._supervise()
        except Exception as exc:
            self.patch_status("Failed", reason="KubeletError", message=repr(exc)[:1000])
            self.kill()
        finally:
            self.done.set()

    def _supervise(self) -> None:
        policy = self.body["spec"].get("restartPolicy", "Always")
        while not self.terminating:
            for c in self.containers:
                code = c.proc.poll() if c.proc is not None else None
                if c.proc is not None and code is not None:
                    c.last_exit = {"exitCode": code, "finishedAt": _now(), "reason": _reason(code)}
                    c.ready = False
                    c.proc = None
                    if policy == "Always" or (policy == "OnFailure" and code != 0):
                        c.backoff_until = time.monotonic() + min(30.0, 2.0 * 2**c.restarts)
                if c.proc is None and c.backoff_until and time.monotonic() >= c.backoff_until:
                    c.backoff_until = None
                    c.restarts += 1
                    c.start()
                if c.proc is not None:
                    c.ready = c.probe()
            if all(c.proc is None and c.backoff_until is None for c in self.containers):
                ok = all(c.last_exit and c.last_exit["exitCode"] == 0 for c in self.containers)
                self.patch_status("Succeeded" if ok else "Failed")
                return
            self.patch_status("Running")
            time.sleep(self.kubelet.period_s)

    def terminate(self, grace_s: float) -> None:
        """preStop hooks, SIGTERM, SIGKILL after the grace period; then the final DELETE."""
        self.terminating = True
        deadline = time.monotonic() + grace_s
        if self.sandbox_pid:
            for c in self.containers:
                hook = c.spec.get("lifecycle", {}).get("preStop", {}).get("exec")
                if hook and c.main_pid() is not None:
                    self.exec(hook["command"], timeout=deadline - time.monotonic())
            for c in self.containers:
                pid = c.main_pid()
                if pid is not None:
                    os.kill(pid, signal.SIGTERM)
            while time.monotonic() < deadline and any(
                c.proc is not None and c.proc.poll() is None for c in self.containers
            ):
                time.sleep(0.1)
            for c in self.containers:
                if c.proc is not None:
                    code = c.proc.poll()
                    if code is None:
                        code = 137
                    c.last_exit = {"exitCode": code, "finishedAt": _now(), "reason": _reason(code)}
        self.kill()
        self.done.wait(30)
        try:
            self.kubelet.kube.delete(
                self.url, gracePeriodSeconds=0, preconditions={"uid": self.uid}
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def kill(self) -> None:
        """SIGKILL everything in the pod: PID 1 of its namespace takes the rest with it."""
        for sock in self.listeners:
            sock.close()
        for c in self.containers:
            if c.proc is not None and c.proc.poll() is None:
                try:
                    os.killpg(c.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.sandbox is not None and self.sandbox.poll() is None:
            os.killpg(self.sandbox.pid, signal.SIGKILL)
            self.sandbox.wait()
        for c in self.containers:
            if c.proc is not None:
                c.proc.wait()

    def patch_status(self, phase: str, reason: str = "", message: str = "") -> None:
        ready = phase == "Running" and all(c.ready for c in self.containers)
        flag = "True" if ready else "False"
        conds = [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": flag},
            {"type": "Ready", "status": flag},
        ]
        status: JSON = {
            "phase": phase,
            "conditions": conds,
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "containerStatuses": [c.status() for c in self.containers],
        }
        if reason:
            status.update(reason=reason, message=message)
        if status == self.last_status:
            return
        try:
            self.kubelet.kube.patch(f"{self.url}/status", {"status": status})
            self.last_status = status
        except ApiException as exc:
            if exc.status != 404:
                raise


def _reason(code: int) -> str:
    return "Completed" if code == 0 else ("OOMKilled" if code == 137 else "Error")


class ProcessKubelet:
    """One Node of ``kube``'s cluster whose Pods run as local processes; ``start()`` runs it
    in a daemon thread, ``close()`` kills every pod it runs."""

    def __init__(
        self,
        kube: Kube,
        node: str,
        root: Path,
        workdir: Path,
        forward_ports: tuple[int, ...] = (),
        env: dict[str, str] | None = None,
        period_s: float = 1.0,
    ):
        if os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "nsenter", "ip")):
            raise RuntimeError("the process kubelet needs root, unshare, nsenter and ip")
        self.kube, self.node, self.root, self.workdir = kube, node, root, workdir
        self.forward_ports, self.period_s = tuple(forward_ports), period_s
        self.base_env = dict(env if env is not None else {"PATH": os.environ["PATH"]})
        self.pods: dict[str, Pod] = {}
        self.gone: list[Pod] = []  # pods deleted from the API, kept for what they left behind
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def claim_dir(self, namespace: str, claim: str) -> Path:
        """The directory standing in for a PVC's volume; it outlives the claim's pods."""
        d = self.root / "volumes" / namespace / claim
        d.mkdir(parents=True, exist_ok=True)
        return d

    def start(self) -> ProcessKubelet:
        self.root.mkdir(parents=True, exist_ok=True)
        node = {
            "metadata": {"name": self.node, "labels": self._labels()},
            "spec": {},
        }
        try:
            self.kube.create("/api/v1/nodes", node)
        except ApiException as exc:
            if exc.status != 409:
                raise
        self._heartbeat()
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        self._thread.join(30)
        for pod in list(self.pods.values()):
            pod.terminating = True
            pod.kill()

    def _heartbeat(self) -> None:
        cap = {"cpu": str(os.cpu_count() or 1), "memory": "64Gi", "pods": "110"}
        status = {
            "capacity": cap,
            "allocatable": cap,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "process kubelet",
                    "lastHeartbeatTime": _now(),
                    "lastTransitionTime": _now(),
                }
            ],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "nodeInfo": {
                "kubeletVersion": "v1.20.0-process",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "containerRuntimeVersion": "process://",
                "kernelVersion": "",
                "osImage": "",
                "kubeProxyVersion": "",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }
        self.kube.patch(f"/api/v1/nodes/{self.node}/status", {"status": status})

    def _loop(self) -> None:
        last_beat = time.monotonic()
        while not self._closed.is_set():
            try:
                if time.monotonic() - last_beat > 10:
                    self._heartbeat()
                    last_beat = time.monotonic()
                self._sync()
            except Exception as exc:  # the API server busy: next period
                print(f"process kubelet {self.node}: {exc!r}", flush=True)
            self._closed.wait(self.period_s)

    def _labels(self) -> dict[str, str]:
        return {"kubernetes.io/hostname": self.node}

    def _selects_me(self, spec: JSON) -> bool:
        labels = self._labels()
        return all(labels.get(k) == v for k, v in (spec.get("nodeSelector") or {}).items())

    def _sync(self) -> None:
        items = self.kube.get("/api/v1/pods")["items"]
        seen = set()
        for body in items:
            meta, spec = body["metadata"], body["spec"]
            uid = meta["uid"]
            seen.add(uid)
            if not spec.get("nodeName") and not meta.get("deletionTimestamp"):
                if not self._selects_me(spec):
                    continue  # the scheduler reports it Unschedulable
                binding = {
                    "apiVersion": "v1",
                    "kind": "Binding",
                    "metadata": {"name": meta["name"]},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": self.node},
                }
                try:
                    self.kube.create(
                        f"{path('', 'v1', 'pods', meta['namespace'], meta['name'])}/binding",
                        binding,
                    )
                except ApiException as exc:
                    if exc.status not in (404, 409):
                        raise
                continue
            if spec.get("nodeName") != self.node:
                continue
            pod = self.pods.get(uid)
            if meta.get("deletionTimestamp"):
                if pod is None:  # never started here: nothing to stop
                    pod = self.pods[uid] = Pod(self, body)
                    pod.done.set()
                if not pod.terminating:
                    grace = float(meta.get("deletionGracePeriodSeconds", 30))
                    threading.Thread(target=pod.terminate, args=(grace,), daemon=True).start()
            elif pod is None and body.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
                pod = self.pods[uid] = Pod(self, body)
                threading.Thread(target=pod.run, daemon=True).start()
        for uid in set(self.pods) - seen:  # gone from the API (force-deleted): kill at once
            pod = self.pods.pop(uid)
            self.gone.append(pod)
            pod.terminating = True
            pod.kill()
