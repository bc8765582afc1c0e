"""What crosses the local channel between a site's ClientApp (the relay) and its persistent
trainer, defined once for both sides, torch-free (the relay never imports torch).

One request, one answer, over a ``multiprocessing.connection`` (a Unix socket, authenticated
by a per-node key only the node's own user can read):

- ``hello`` -> ``{"pid", "code", "protocol"}``: who answers, and which code it runs
  (``code_id``).
- ``train`` + the global model's arrays -> ``{"report"}`` (TrainReport fields) + the new
  model's arrays, or ``{"error"}``: the job failed, the trainer lives on.
- ``stop`` -> ``{}``, then the trainer exits.

A message is a small pickled header (the op, the job, the array names/dtypes/shapes) followed by
one raw frame per array, so a multi-GB model never becomes one pickle.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pilot.control.wire import RawArray
from pilot.flower.messages import TrainOrder

PROTOCOL = 1
# Unix socket paths are limited to 107 bytes; a deeper node dir puts the socket in a private
# per-user dir under the system temp dir instead, named after the node dir.
_MAX_SOCKET_PATH = 100


@dataclass
class Job(TrainOrder):
    """A TRAIN order as this node runs it: the order (its dirs resolved here) and the node's
    own settings."""

    site: str = ""
    state_dir: str = ""  # node-local: inner optimizer state lives here between rounds
    # Torch threads when training on the CPU (0: all cores). Several local sites share a box, and
    # oversubscribed torch threads spin: measured here, 2 threads under load ran a tiny model
    # 10-30x slower per step than 1 thread.
    cpu_threads: int = 0


@dataclass(frozen=True)
class Endpoint:
    """Where a node's trainer listens and the files beside it, all derived from the node dir."""

    node_dir: Path

    @property
    def socket(self) -> str:
        path = self.node_dir / "trainer.sock"
        if len(str(path)) <= _MAX_SOCKET_PATH:
            return str(path)
        private = Path(tempfile.gettempdir()) / f"curtail-trainer-{os.getuid()}"
        private.mkdir(mode=0o700, exist_ok=True)
        digest = hashlib.sha1(str(self.node_dir).encode()).hexdigest()[:16]
        return str(private / f"{digest}.sock")

    key = property(lambda self: self.node_dir / "trainer.key")
    pidfile = property(lambda self: self.node_dir / "trainer.pid")
    lock = property(lambda self: self.node_dir / "trainer.lock")
    log = property(lambda self: self.node_dir / "trainer.log")


def code_root() -> str:
    """The directory this code was imported from (a FAB install or a checkout)."""
    return str(Path(__file__).resolve().parents[3])


@functools.cache
def code_id() -> str:
    """A digest of the pilot and nanochat sources this process runs: a trainer of other code
    is replaced, never reused, and one started from a checkout serves the FAB copy of it."""
    root = Path(code_root())
    digest = hashlib.sha1()
    for path in sorted(p for pkg in ("pilot", "nanochat") for p in (root / pkg).rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def send(conn: Connection, header: dict[str, Any], arrays: Sequence[RawArray] = ()) -> None:
    """One message: the header with the arrays' metadata, then each array's bytes."""
    conn.send({**header, "arrays": [a[:4] for a in arrays]})
    for a in arrays:
        conn.send_bytes(a[4])


def recv(conn: Connection) -> tuple[dict[str, Any], list[RawArray]]:
    """One message from ``send``: (header, arrays). EOFError when the other side is gone."""
    header = conn.recv()
    metas = header.pop("arrays")
    return header, [(*meta, conn.recv_bytes()) for meta in metas]
