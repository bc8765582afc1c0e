"""The what-if simulator's --compare table: the oracle, the prototype rule and ours, side by side."""

from __future__ import annotations

from typing import Any

# (row label, policy, forecaster); the oracle first, every ratio is against it
COMPARE_RUNS = (
    ("oracle", "oracle", None),
    ("prototype", "prototype", None),
    ("ours: persistence", "forecast", "persistence"),
    ("ours: noisy", "forecast", "noisy"),
    ("ours: perfect", "forecast", "perfect"),
)

COMPARE_HEAD = [
    "policy",
    "kg CO2",
    "kWh",
    "train site-h",
    "in-window site-h",
    "energy in window",
    "windows used",
    "prov. wasted kWh",
    "vs best single site",
    "vs oracle",
]


def compare_row(name: str, doc: dict[str, Any], oracle_kg: float) -> list[str]:
    t = doc["total"]
    best = min(
        (b["emissions_kg"] for k, b in doc["baselines"].items() if k.startswith("single_site:")),
        default=0.0,
    )
    return [
        name,
        f"{t['emissions_kg']:.3f}",
        f"{t['energy_kwh']:.2f}",
        f"{t['train_hours']:.2f}",
        f"{t['in_window_train_hours']:.2f}",
        f"{t['curtailed_energy_share']:.1%}",
        f"{t['windows_used']}/{t['windows_total']}",
        f"{t['provisioning_energy_wasted_kwh']:.3f}",
        f"{t['emissions_kg'] / best:.1%}" if best > 0 else "n/a",
        f"{t['emissions_kg'] / oracle_kg:.3f}x" if oracle_kg > 0 else "n/a",
    ]


def compare_rows(docs: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per run (the oracle first: the ratios' reference), then the continuous
    baseline (same trace, same span)."""
    oracle_kg = next(iter(docs.values()))["total"]["emissions_kg"]
    rows = [compare_row(n, d, oracle_kg) for n, d in docs.items()]
    cont = next(iter(docs.values()))["baselines"]["continuous_federated"]
    rows.append(
        [
            "continuous",
            f"{cont['emissions_kg']:.3f}",
            f"{cont['energy_kwh']:.2f}",
            "",
            "",
            "",
            "",
            "",
            "",
            f"{cont['emissions_kg'] / oracle_kg:.1f}x" if oracle_kg > 0 else "n/a",
        ]
    )
    return rows
