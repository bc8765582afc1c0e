"""A site's persistent trainer: one long-lived process per node that keeps torch imported and
the model, its optimizers and inner state, the device and any compiled graph in memory
between rounds (pilot.flower.train_job.Worker), so a round starts stepping within a second
of its TRAIN order instead of paying a process start, imports and a model build.

The ClientApp (pilot.flower.trainer.relay) starts it on the node's first TRAIN and relays each
order to it over the local channel (pilot.flower.trainer.channel). It serves one request at a
time and exits when the SuperNode it belongs to is gone, when asked to stop, or when it cannot
listen. An order that fails is answered with the error and drops the warm state; the trainer
lives on. A trainer that dies loses at most the round in flight: the next TRAIN starts a new one,
which takes up the inner state the last round left on node-local disk.

    python -m pilot.flower.trainer.daemon --node-dir DIR --watch-pid PID [--cpu-threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
import traceback
from dataclasses import asdict
from multiprocessing import AuthenticationError
from multiprocessing.connection import Listener
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pilot.infra.procs import alive

if TYPE_CHECKING:
    from pilot.control.wire import RawArray

WATCH_S = 1.0  # how often the trainer checks that its SuperNode still runs


def _log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} trainer[{os.getpid()}] {msg}", flush=True)


def _watch(pid: int, node_dir: Path) -> None:
    """Exit the whole process once ``pid`` (the SuperNode) is gone: a node that died or was
    released takes its trainer with it, even mid-round or still starting."""
    while alive(pid):
        time.sleep(WATCH_S)
    _log(f"node process {pid} is gone: exiting")
    from pilot.flower.trainer.channel import Endpoint

    Path(Endpoint(node_dir).socket).unlink(missing_ok=True)
    os._exit(0)


def _train(
    worker: Any, job_fields: dict, arrays: list[RawArray], received_at: float
) -> tuple[dict, list[RawArray]]:
    """One TRAIN order through the warm worker: (header, new model arrays) or the error."""
    from pilot.control.aggregate import decode_arrays
    from pilot.control.updates import encode_update
    from pilot.flower.train_job import run_job
    from pilot.flower.trainer.channel import Job

    try:
        job = Job(**job_fields)
        base = decode_arrays(arrays)
        state, report = run_job(job, base, worker, received_at)
        feedback = worker.warm.feedback if worker.warm is not None else None
        return {"report": asdict(report)}, encode_update(base, state, job.update_dtype, feedback)
    except Exception as e:  # noqa: BLE001 - the order fails, the trainer does not
        _log(f"round failed:\n{traceback.format_exc()}")
        return {"error": " ".join(" ".join(traceback.format_exception_only(e)).split())}, []


def serve(listener: Listener, worker: Any) -> None:
    """Answer requests one at a time until a ``stop``."""
    from pilot.flower.trainer.channel import PROTOCOL, code_id, recv, send

    while True:
        try:
            conn = listener.accept()
        except (OSError, EOFError, AuthenticationError) as e:  # a wrong key, a caller gone
            _log(f"refused a connection: {type(e).__name__}")
            continue
        with conn:
            try:
                header, arrays = recv(conn)
                received_at = time.time()
                op = header.get("op")
                if op == "hello":
                    send(conn, {"pid": os.getpid(), "code": code_id(), "protocol": PROTOCOL})
                elif op == "train":
                    t0 = time.time()
                    send(conn, *_train(worker, header["job"], arrays, received_at))
                    _log(f"round {header['job']['round']} answered in {time.time() - t0:.1f} s")
                elif op == "stop":
                    worker.wait_saved()
                    send(conn, {})
                    return
                else:
                    send(conn, {"error": f"unknown op {op!r}"})
            except (OSError, EOFError) as e:  # the relay went away: its round is lost, not us
                _log(f"caller gone: {type(e).__name__}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--node-dir", required=True, type=Path)
    ap.add_argument("--watch-pid", required=True, type=int, help="the SuperNode's pid")
    ap.add_argument("--cpu-threads", type=int, default=0, help="torch threads on CPU (0: all)")
    args = ap.parse_args(argv)
    # watch first: everything below can take seconds on a busy box
    threading.Thread(target=_watch, args=(args.watch_pid, args.node_dir), daemon=True).start()
    from pilot.flower.trainer.channel import Endpoint

    endpoint = Endpoint(args.node_dir)
    Path(endpoint.socket).unlink(missing_ok=True)  # a dead trainer's socket

    # everything a round imports, before the first order arrives
    import nanochat.dataloader  # noqa: F401
    import nanochat.tokenizer  # noqa: F401
    import nanochat.train  # noqa: F401
    from nanochat.common import device_setup
    from pilot.control.aggregate import decode_arrays  # noqa: F401
    from pilot.flower.train_job import Worker

    device, autocast_ctx, _, _ = device_setup(threads=args.cpu_threads or None)
    # listen only once torch is imported: a relay that connects is answered at once
    listener = Listener(endpoint.socket, "AF_UNIX", authkey=endpoint.key.read_bytes())
    os.chmod(endpoint.socket, 0o600)
    _log(f"listening on {endpoint.socket} for the node process {args.watch_pid}")
    try:
        serve(listener, Worker(device, autocast_ctx))
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            if endpoint.pidfile.read_text().strip() == str(os.getpid()):
                endpoint.pidfile.unlink()
    _log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
