"""The run's timeline figure: modes over time, each site's MCI and training, the loss curves."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pilot.energy.accounting import Interval, windows

MODE_COLORS = {"PAUSE": "#d9d9d9", "LOCAL": "#fdd49e", "FEDERATED": "#a1d99b"}


def mode_spans(
    events: Sequence[dict[str, Any]], intervals: Iterable[Interval], start: float, end: float
) -> list[tuple[float, float, str]]:
    """(start, end, mode) over [start, end): from `mode` events, else derived from training intervals."""
    marks = sorted(
        (float(e["t"]), str(e["mode"])) for e in events if e["kind"] == "mode" and "mode" in e
    )
    if not marks:
        # No mode events (an older run): the mode is how many sites train at each instant.
        edges = sorted(
            {start, end}
            | {x for iv in intervals if iv.state == "train" for x in (iv.start, iv.end)}
        )
        train = [iv for iv in intervals if iv.state == "train"]
        for a, b in zip(edges, edges[1:], strict=False):
            mid = 0.5 * (a + b)
            n = sum(1 for iv in train if iv.start <= mid < iv.end)
            marks.append((a, "PAUSE" if n == 0 else "LOCAL" if n == 1 else "FEDERATED"))
    spans: list[tuple[float, float, str]] = []
    for (t, m), nxt in zip(marks, marks[1:] + [(end, "")], strict=True):
        a, b = max(t, start), min(nxt[0], end)
        if b <= a:
            continue
        if spans and spans[-1][2] == m and spans[-1][1] == a:
            spans[-1] = (spans[-1][0], b, m)
        else:
            spans.append((a, b, m))
    return spans


def losses(events: Sequence[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Loss points for the figure: the round-mean train loss per round ("global"), each
    site's training curve (bins of its interval's curve spread evenly over the interval, else
    one point at the interval's end) and the global model's val bpb ("val_bpb", at the time
    of the aggregation it measured; site names are DNS labels, so no site can be called so)."""
    out: dict[str, list[tuple[float, float]]] = {"global": [], "val_bpb": []}
    for e in events:
        if e["kind"] == "validation" and e.get("bpb") is not None:
            out["val_bpb"].append((float(e.get("model_t", e["t"])), float(e["bpb"])))
            continue
        loss = e.get("loss")
        if loss is None or not np.isfinite(float(loss)):
            continue
        if e["kind"] == "aggregate":
            out["global"].append((float(e["t"]), float(loss)))
        elif e["kind"] == "train_interval" and e.get("site"):
            pts = out.setdefault(str(e["site"]), [])
            curve, end = e.get("curve") or [], float(e.get("end", e["t"]))
            if not curve:
                pts.append((end, float(loss)))
                continue
            start = float(e.get("start", end))
            width = (end - start) / len(curve)
            pts.extend((start + (i + 0.5) * width, float(c)) for i, c in enumerate(curve))
    return out


# --- the figure -------------------------------------------------------------------------------


def timeline(
    path: str | Path,
    trace: Any,
    sites: Sequence[Any],
    intervals: Sequence[Interval],
    *,
    threshold: float,
    start: float,
    end: float,
    modes: Sequence[tuple[float, float, str]] = (),
    loss: dict[str, list[tuple[float, float]]] | None = None,
    title: str = "",
) -> Path:
    """MCI per site with the threshold; provisioned and training bars per site; mode band; loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_loss = bool(loss) and any(loss.values())
    n = len(sites)
    ratios = [3.0, 0.35 + 0.35 * n, 0.35] + ([1.6] if has_loss else [])
    fig, axes = plt.subplots(
        len(ratios),
        1,
        sharex=True,
        figsize=(12, 2.0 + sum(ratios) * 1.3),
        gridspec_kw={"height_ratios": ratios, "hspace": 0.08},
    )
    h = lambda t: (np.asarray(t, dtype=float) - start) / 3600.0  # noqa: E731  hours since start
    colors = plt.get_cmap("tab10").colors

    _mci_panel(axes[0], trace, sites, threshold, start, end, h, colors)
    axes[0].set_title(title or "curtailment-following training timeline")
    _site_panel(axes[1], trace, sites, intervals, threshold, start, end, h, colors)
    _mode_panel(axes[2], modes, h)
    if has_loss:
        _loss_panel(axes[3], loss, sites, h, colors)
    axes[-1].set_xlim(0, h(end))
    axes[-1].set_xlabel(f"hours since {datetime.fromtimestamp(start, UTC):%Y-%m-%d %H:%M} UTC")
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _mci_panel(ax_mci, trace, sites, threshold, start, end, h, colors) -> None:
    """Each site's MCI and the threshold."""
    ts = np.linspace(start, end, int(min(4000, max(200, (end - start) / 60))))
    for i, s in enumerate(sites):
        ax_mci.plot(
            h(ts),
            trace.series(s.region, ts),
            color=colors[i % 10],
            lw=1.2,
            label=f"{s.name} ({s.region})",
        )
    ax_mci.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax_mci.set_ylabel("MCI (gCO2/kWh)")
    ax_mci.legend(loc="upper right", fontsize=8, ncol=min(4, len(sites) + 1))


def _site_panel(ax_bar, trace, sites, intervals, threshold, start, end, h, colors) -> None:
    """One row per site: its curtailment windows, provisioned spans and training spans."""
    from matplotlib.patches import Patch

    n = len(sites)
    for i, s in enumerate(sites):
        y = n - 1 - i
        # Faint background: the raw curtailment windows, so bars outside them stand out.
        win = windows(trace, s.region, start, end, threshold)
        ax_bar.broken_barh(
            [(h(a), h(b) - h(a)) for a, b in win],
            (y - 0.45, 0.9),
            facecolors="#e5f5e0",
            edgecolor="none",
        )
        prov = [(h(iv.start), h(iv.end) - h(iv.start)) for iv in intervals if iv.site == s.name]
        train = [
            (h(iv.start), h(iv.end) - h(iv.start))
            for iv in intervals
            if iv.site == s.name and iv.state == "train"
        ]
        ax_bar.broken_barh(
            prov, (y - 0.35, 0.7), facecolors=colors[i % 10], alpha=0.25, edgecolor="none"
        )
        ax_bar.broken_barh(train, (y - 0.22, 0.44), facecolors=colors[i % 10], edgecolor="none")
    ax_bar.set_yticks(range(n), [s.name for s in reversed(sites)])
    ax_bar.set_ylim(-0.6, n - 0.4)
    ax_bar.legend(
        handles=[
            Patch(color="#e5f5e0", label="MCI < threshold"),
            Patch(color="grey", alpha=0.25, label="provisioned"),
            Patch(color="grey", label="training"),
        ],
        loc="center left",
        fontsize=7,
        bbox_to_anchor=(1.0, 0.5),
        frameon=False,
    )


def _mode_panel(ax_mode, modes, h) -> None:
    """The band of modes over time."""
    from matplotlib.patches import Patch

    for a, b, m in modes:
        ax_mode.axvspan(h(a), h(b), color=MODE_COLORS.get(m, "white"), lw=0)
    ax_mode.set_yticks([])
    ax_mode.set_ylabel("mode", rotation=0, ha="right", va="center")
    ax_mode.legend(
        handles=[Patch(color=c, label=m) for m, c in MODE_COLORS.items()],
        loc="center left",
        fontsize=7,
        bbox_to_anchor=(1.0, 0.5),
        frameon=False,
    )


def _loss_panel(ax_loss, loss, sites, h, colors) -> None:
    """Sites' training curves and the round-mean train loss (nats/token, left axis) with the
    global model's validation bits per byte (right axis: another unit, so its own scale)."""
    for i, s in enumerate(sites):
        pts = loss.get(s.name, [])
        if pts:
            ax_loss.plot(
                h([p[0] for p in pts]),
                [p[1] for p in pts],
                ".-",
                color=colors[i % 10],
                ms=2,
                lw=0.8,
                alpha=0.6,
                label=s.name,
            )
    g = loss.get("global", [])
    if g:
        ax_loss.plot(
            h([p[0] for p in g]),
            [p[1] for p in g],
            "-o",
            color="k",
            ms=3,
            lw=1.2,
            label="round-mean train loss",
        )
    ax_loss.set_ylabel("train loss (nats)")
    handles, labels = ax_loss.get_legend_handles_labels()
    v = loss.get("val_bpb", [])
    if v:
        ax_bpb = ax_loss.twinx()
        ax_bpb.plot(
            h([p[0] for p in v]),
            [p[1] for p in v],
            "-s",
            color="tab:red",
            ms=3,
            lw=1.2,
            label="global model val bpb",
        )
        ax_bpb.set_ylabel("val bits/byte", color="tab:red")
        more = ax_bpb.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:
        ax_loss.legend(handles, labels, loc="upper right", fontsize=8)
