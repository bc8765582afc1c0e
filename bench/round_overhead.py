"""Benchmark: fixed cost of one TRAIN round on a site, per model size, and bytes on the wire.

For each depth it plays what a SuperNode does for a TRAIN message on three paths:

  per-message  a fresh process per message (Flower starts a new ClientApp process per
               message; node config trainer="per-message"): start Python, import
               torch/flwr/nanochat, inflate the global model, build model + optimizers + data
               loader, train, save the inner optimizer state, encode and deflate the reply
  cold         the node's persistent trainer (pilot.flower.trainer) on its first order: the
               relay starts it, it imports torch and builds the model
  warm         the same trainer's next round: the global weights are copied in place

and prints for each

  start_to_first_step_s   message in (or process start) -> first training step begins
  last_step_to_reply_s    last step ends -> reply deflated into Flower's wire objects
  bytes_fp32 / bytes_bf16 Flower wire bytes of the global model sent to a site (transfer_dtype
                          fp32 vs bf16; trained-like weights, so nothing deduplicates)

and, per depth, the bytes of a site's update (its pseudo-gradient) for each update_dtype as
ratios of the fp32 weights: ``bytes_ratio_bf16=.. bytes_ratio_int8=..``.

Network and SuperLink queueing are not included (they depend on the deployment). A tiny
demo corpus and tokenizer are built in a temp dir. Last line, the largest model's:
``cold_start_s=.. warm_start_s=.. warm_reply_s=.. fixed_share_600s=..`` (the warm round's
fixed cost as a share of a 600 s round).

    python bench/round_overhead.py [--depths 2 4 8 12]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB = 1024
SEQ = 256
STEPS = 3  # training steps per measured round


def _deflate(record) -> tuple[int, dict]:
    """Flower's wire form of a record: every nested object deflated (what push_messages
    sends). Returns (bytes, objects)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    objs = {oid: o.deflate() for oid, o in get_all_nested_objects(record).items()}
    return sum(len(b) for b in objs.values()), objs


def _inflate(record_id: str, objs: dict):
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    return inflate_object_from_contents(record_id, objs)


def client(spec_path: str) -> None:
    """One TRAIN, as a ClientApp process would run it; prints a JSON line of timings."""
    t_start = float(json.loads(Path(spec_path).read_text())["t_spawn"])
    import pickle

    import torch  # noqa: F401 - counted in the start-up, as in a real ClientApp

    from pilot.control.aggregate import decode_state, encode_state
    from pilot.flower.train_job import Job, run_job

    spec = json.loads(Path(spec_path).read_text())
    with open(spec["wire"], "rb") as f:
        record_id, objs = pickle.load(f)
    weights = decode_state(_inflate(record_id, objs))
    job = Job(**spec["job"], deadline_wall=time.time() + 3600)
    state, res = run_job(job, weights)
    reply = encode_state(state, torch.float32)
    nbytes, _ = _deflate(reply)
    t_reply = time.time()
    print(
        json.dumps(
            {
                "start_to_first_step_s": res.intervals[0][0] - t_start,
                "last_step_to_reply_s": t_reply - res.intervals[0][1],
                "steps": res.steps,
                "step_s": (res.intervals[0][1] - res.intervals[0][0]) / max(1, res.steps),
                "reply_bytes": nbytes,
            }
        )
    )


def _persistent(node_dir: Path, job: dict, record_id: str, objs: dict) -> dict:
    """One TRAIN through the node's persistent trainer, timed as the ClientApp would see it:
    inflate the message, relay it, deflate the reply."""
    import os

    from pilot.control.wire import raw_to_record, record_to_raw
    from pilot.flower.trainer import relay

    t0 = time.time()
    arrays = record_to_raw(_inflate(record_id, dict(objs)))  # inflating consumes the dict
    fields, out = relay.train(node_dir, {**job, "deadline_wall": t0 + 3600}, arrays, 0, os.getpid())
    nbytes, _ = _deflate(raw_to_record(out))
    t_reply = time.time()
    (start, _), (_, end) = fields["intervals"][0], fields["intervals"][-1]
    steps = max(1, fields["steps"])
    return {
        "start_to_first_step_s": start - t0,
        "last_step_to_reply_s": t_reply - end,
        "step_s": (end - start) / steps,
        "reply_bytes": nbytes,
    }


def _per_message(tmp: Path, depth: int, job: dict, wire: Path) -> dict:
    """One TRAIN in a fresh process, as Flower runs a ClientApp per message."""
    spec = tmp / f"spec-{depth}.json"
    spec.write_text(json.dumps({"t_spawn": time.time(), "wire": str(wire), "job": job}))
    out = subprocess.run(
        [sys.executable, __file__, "--client", str(spec)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _job(
    depth: int, round_n: int, step: int, data: Path, tok: Path, chunks: list, tmp: Path
) -> dict:
    train_config = {
        "depth": depth,
        "vocab_size": VOCAB,
        "sequence_len": SEQ,
        "device_batch_size": 2,
        "total_batch_size": 2 * SEQ,
        "num_iterations": 1000,
    }
    return {
        "site": "bench",
        "run": f"bench-d{depth}",
        "round": round_n,
        "global_step": step,
        "assignment": {"site": "bench", "chunks": chunks, "start_rows": {}},
        "train_config": train_config,
        "data_dir": str(data),
        "tokenizer_dir": str(tok),
        "state_dir": str(tmp / "state" / f"d{depth}"),
        "transfer_dtype": "fp32",
        "max_steps": STEPS,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 12])
    ap.add_argument("--client", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        client(args.client)
        return

    import pickle

    import torch

    from nanochat.dataset import chunk_table, demo_texts, read_row_group, write_shards
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer
    from pilot.control.aggregate import encode_state
    from pilot.control.updates import UPDATE_DTYPES, encode_update
    from pilot.control.wire import raw_to_record
    from pilot.flower.trainer import relay

    tmp = Path(tempfile.mkdtemp(prefix="round-overhead-"))
    data, tok = tmp / "data", tmp / "tokenizer"
    write_shards(demo_texts()[:300], data, shard_docs=100, row_group_size=25)
    texts = [t for c in chunk_table(data) for t in read_row_group(data, c.shard, c.row_group)]
    Tokenizer.train(texts, vocab_size=VOCAB).save(tok)
    chunks = [list(c) for c in chunk_table(data)][:4]

    print(
        "depth params_M path start_to_first_step_s last_step_to_reply_s step_s "
        "bytes_fp32 bytes_bf16"
    )
    last = ""
    for depth in args.depths:
        model = GPT(GPTConfig.from_depth(depth, VOCAB, SEQ))
        model.init_weights()
        # nanochat zero-initialises some matrices and Flower stores identical array chunks
        # once: perturb the weights as training would, or the byte counts flatter the wire
        state = {k: v + 1e-3 * torch.randn_like(v) for k, v in model.state_dict().items()}
        params = sum(t.numel() for t in state.values())
        rec32 = encode_state(state, torch.float32)
        b32, objs = _deflate(rec32)
        b16, _ = _deflate(encode_state(state, torch.bfloat16))
        # the update a site sends back (its pseudo-gradient), each update_dtype on the wire
        trained = {k: v - 1e-4 * torch.randn_like(v) for k, v in state.items()}
        ups = {
            d: _deflate(raw_to_record(encode_update(state, trained, d)))[0] for d in UPDATE_DTYPES
        }
        wire = tmp / f"wire-{depth}.pkl"
        with open(wire, "wb") as f:
            pickle.dump((rec32.object_id, objs), f)
        node = tmp / f"node-d{depth}"
        runs = {
            "per-message": _per_message(
                tmp, depth, _job(depth, 1, 0, data, tok, chunks, tmp), wire
            ),
            "cold": _persistent(
                node, _job(depth, 1, 0, data, tok, chunks, tmp), rec32.object_id, objs
            ),
            "warm": _persistent(
                node, _job(depth, 2, STEPS, data, tok, chunks, tmp), rec32.object_id, objs
            ),
        }
        relay.stop(node)
        for path, m in runs.items():
            print(
                f"{depth} {params / 1e6:.1f} {path} {m['start_to_first_step_s']:.2f} "
                f"{m['last_step_to_reply_s']:.2f} {m['step_s']:.3f} {b32} {b16}"
            )
        cold, warm = runs["cold"], runs["warm"]
        fixed = warm["start_to_first_step_s"] + warm["last_step_to_reply_s"]
        last = (
            f"depth={depth} per_message_start_s={runs['per-message']['start_to_first_step_s']:.2f} "
            f"cold_start_s={cold['start_to_first_step_s']:.2f} "
            f"warm_start_s={warm['start_to_first_step_s']:.2f} "
            f"warm_reply_s={warm['last_step_to_reply_s']:.2f} "
            f"fixed_share_600s={fixed / 600:.4f}"
        )
        ratios = (
            f"update_bytes fp32={ups['fp32']} bf16={ups['bf16']} int8={ups['int8']} "
            f"bytes_ratio_bf16={ups['bf16'] / b32:.3f} bytes_ratio_int8={ups['int8'] / b32:.3f}"
        )
    print(ratios)
    print(last)


if __name__ == "__main__":
    main()
