"""Benchmark: fixed cost of one TRAIN round on a site, per model size, and bytes on the wire.

For each depth it plays what a SuperNode does for one TRAIN message, in a fresh process
(Flower starts a new ClientApp process per message): start Python, import torch/flwr/nanochat,
inflate the global model from Flower's wire objects, build model + optimizers + data loader,
train 3 steps, save the inner optimizer state, encode and deflate the reply. It prints

  start_to_first_step_s   process start -> first training step begins (imports included)
  last_step_to_reply_s    last step ends -> reply deflated into Flower's wire objects
  bytes_fp32 / bytes_bf16 Flower wire bytes of the model, each way per round (transfer_dtype
                          fp32 vs bf16; trained-like weights, so nothing deduplicates)

Network and SuperLink queueing are not included (they depend on the deployment). A tiny
demo corpus and tokenizer are built in a temp dir. Last line: the largest model's numbers.

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

    tmp = Path(tempfile.mkdtemp(prefix="round-overhead-"))
    data, tok = tmp / "data", tmp / "tokenizer"
    write_shards(demo_texts()[:300], data, shard_docs=100, row_group_size=25)
    texts = [t for c in chunk_table(data) for t in read_row_group(data, c.shard, c.row_group)]
    Tokenizer.train(texts, vocab_size=VOCAB).save(tok)
    chunks = [list(c) for c in chunk_table(data)][:4]

    print(
        "depth params_M start_to_first_step_s last_step_to_reply_s step_s "
        "bytes_fp32 bytes_bf16 encode_fp32_s"
    )
    last = ""
    for depth in args.depths:
        model = GPT(GPTConfig.from_depth(depth, VOCAB, SEQ))
        model.init_weights()
        # nanochat zero-initialises some matrices and Flower stores identical array chunks
        # once: perturb the weights as training would, or the byte counts flatter the wire
        state = {k: v + 1e-3 * torch.randn_like(v) for k, v in model.state_dict().items()}
        params = sum(t.numel() for t in state.values())
        t0 = time.perf_counter()
        rec32 = encode_state(state, torch.float32)
        b32, objs = _deflate(rec32)
        t_enc = time.perf_counter() - t0
        b16, _ = _deflate(encode_state(state, torch.bfloat16))
        wire = tmp / f"wire-{depth}.pkl"
        with open(wire, "wb") as f:
            pickle.dump((rec32.object_id, objs), f)
        train_config = {
            "depth": depth,
            "vocab_size": VOCAB,
            "sequence_len": SEQ,
            "device_batch_size": 2,
            "total_batch_size": 2 * SEQ,
            "num_iterations": 1000,
        }
        job = {
            "site": "bench",
            "run": f"bench-d{depth}",
            "round": 1,
            "global_step": 0,
            "assignment": {"site": "bench", "chunks": chunks, "start_rows": {}},
            "train_config": train_config,
            "data_dir": str(data),
            "tokenizer_dir": str(tok),
            "state_dir": str(tmp / "state"),
            "transfer_dtype": "fp32",
            "max_steps": 3,
        }
        spec = tmp / f"spec-{depth}.json"
        spec.write_text(json.dumps({"t_spawn": time.time(), "wire": str(wire), "job": job}))
        out = subprocess.run(
            [sys.executable, __file__, "--client", str(spec)],
            capture_output=True,
            text=True,
            check=True,
        )
        m = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{depth} {params / 1e6:.1f} {m['start_to_first_step_s']:.2f} "
            f"{m['last_step_to_reply_s']:.2f} {m['step_s']:.3f} {b32} {b16} {t_enc:.2f}"
        )
        last = (
            f"depth={depth} params={params / 1e6:.1f}M "
            f"start_to_first_step_s={m['start_to_first_step_s']:.2f} "
            f"last_step_to_reply_s={m['last_step_to_reply_s']:.2f} "
            f"bytes_fp32={b32} bytes_bf16={b16} bf16_ratio={b16 / b32:.3f}"
        )
    print(last)


if __name__ == "__main__":
    main()
