"""Benchmark: work-weighted averaging of 3 model states (>= 100M fp32 params each).

Compares, on the same inputs and in the same process:
  floor   a plain memory copy of the same input bytes (torch copy_ into preallocated buffers)
  ours    pilot.control.aggregate: decode the received ArrayRecords (zero-copy) + weighted_average
          into the server's reused fp32 scratch state
  flower  flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords on Flower's own
          ArrayRecords of the same tensors (what FedAvg uses)
Prints one line per measurement and, last, ``ratio_vs_floor=… ratio_vs_flower=…`` (our time
divided by theirs: < 2 and < 0.33 are the goals).

    python bench/aggregate.py [--layers 12] [--dim 768] [--vocab 16384] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import time

import torch


def make_state(layers: int, dim: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """A GPT-shaped state dict (embedding, unembedding, attention and MLP matrices)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"wte": (vocab, dim), "lm_head": (vocab, dim)}
    for i in range(layers):
        for name in ("q", "k", "v", "proj"):
            shapes[f"h.{i}.attn.{name}"] = (dim, dim)
        shapes[f"h.{i}.mlp.fc"] = (4 * dim, dim)
        shapes[f"h.{i}.mlp.proj"] = (dim, 4 * dim)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def time_floor(states: list[dict[str, torch.Tensor]], repeat: int) -> float:
    """Copy the same input bytes once into preallocated buffers."""
    dst = {k: torch.empty_like(t) for k, t in states[0].items()}

    def floor() -> None:
        for s in states:
            for k, t in s.items():
                dst[k].copy_(t)

    return best_of(floor, repeat)


def time_ours(
    states: list[dict[str, torch.Tensor]], weights: list[float], repeat: int
) -> tuple[float, float]:
    """(first call, best steady-state call). The server keeps one fp32 scratch state across
    rounds, as the floor's destination is preallocated; the first call also allocates it."""
    from pilot.control.aggregate import decode_state, encode_state, weighted_average

    records = [encode_state(s, torch.float32) for s in states]
    scratch: dict[str, torch.Tensor] | None = None

    def ours() -> None:
        nonlocal scratch
        scratch = weighted_average([decode_state(r) for r in records], weights, out=scratch)

    return best_of(ours, 1), best_of(ours, repeat)


def time_flower(
    states: list[dict[str, torch.Tensor]], weights: list[float], repeat: int
) -> tuple[float, torch.Tensor]:
    """Flower's FedAvg helper on Flower's own ArrayRecords; returns (time, its 'wte')."""
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    records = [
        RecordDict({"model": ArrayRecord(s), "metrics": MetricRecord({"tokens": w})})
        for s, w in zip(states, weights, strict=True)
    ]
    result = {}

    def flower() -> None:
        result["rec"] = aggregate_arrayrecords(records, "tokens")

    t = best_of(flower, repeat)
    return t, torch.from_numpy(result["rec"]["wte"].numpy())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--flower-repeat", type=int, default=1)
    args = ap.parse_args()

    from pilot.control.aggregate import weighted_average

    states = [make_state(args.layers, args.dim, args.vocab, seed) for seed in range(3)]
    weights = [1200.0, 800.0, 2000.0]
    n_params = sum(t.numel() for t in states[0].values())
    n_bytes = 3 * n_params * 4
    print(
        f"params_per_state={n_params / 1e6:.1f}M input_bytes={n_bytes / 2**30:.2f}GiB "
        f"threads={torch.get_num_threads()}"
    )

    t_floor = time_floor(states, args.repeat)
    print(f"floor_copy_s={t_floor:.3f} ({n_bytes / t_floor / 2**30:.1f} GiB/s)")
    t_cold, t_ours = time_ours(states, weights, args.repeat)
    print(f"ours_first_call_s={t_cold:.3f} (includes allocating the output)")
    print(f"ours_s={t_ours:.3f}")
    expected_wte = weighted_average(states, weights)["wte"]
    t_flower, flower_wte = time_flower(states, weights, args.flower_repeat)
    print(f"flower_s={t_flower:.3f}")
    print(f"max_abs_diff_vs_flower={float((flower_wte - expected_wte).abs().max()):.2e}")
    print(f"ratio_vs_floor={t_ours / t_floor:.2f} ratio_vs_flower={t_ours / t_flower:.3f}")


if __name__ == "__main__":
    main()
