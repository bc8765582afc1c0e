"""Marginal carbon intensity (MCI, gCO2/kWh) traces: load, validate, interpolate, save.

Two input layouts:
- wide CSV: ``point_time`` + one column per region (CAISO_NORTH, SPP_TX, NEM_SA, DE, ...)
- WattTime-style long CSVs: one file per region with ``point_time,value`` (lbs CO2/MWh)

Timestamps must carry a UTC offset (``Z`` or ``+hh:mm``): a naive timestamp is ambiguous
by up to a day across the regions we care about, which would silently shift every window.
Synthetic traces: pilot.energy.synthetic; command line: ``python -m pilot.energy.trace_cli``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

LBS_PER_MWH_TO_G_PER_KWH = 0.453592  # 1 lb = 453.592 g, 1 MWh = 1000 kWh
UNITS = {"g/kWh": 1.0, "lbs/MWh": LBS_PER_MWH_TO_G_PER_KWH}
DEFAULT_MAX_GAP_S = 900.0  # fill NaN runs up to 15 min (3 missing 5-min points) by interpolation
TIME_COLUMN = "point_time"
_OFFSET_RE = r"(?:Z|z|[+-]\d{2}:?\d{2})$"  # an explicit UTC offset at the end of an ISO timestamp
_NAN_TOKENS = {"", "nan", "NaN", "NAN", "null", "NULL", "None", "NA", "N/A", "-"}
DAY_S = 86_400.0  # the one definition of a day in seconds


class TraceError(ValueError):
    """A trace file or request that cannot be used; the message says where and what."""


@dataclass
class Trace:
    """MCI samples on a common time axis: ``values[r, i]`` is region r at ``times[i]``."""

    times: np.ndarray  # (n,) float64 epoch seconds UTC, strictly increasing
    regions: list[str]
    values: np.ndarray  # (n_regions, n) float64 gCO2/kWh

    def __post_init__(self) -> None:
        self.times = np.asarray(self.times, dtype=np.float64)
        self.values = np.atleast_2d(np.asarray(self.values, dtype=np.float64))
        if self.values.shape != (len(self.regions), len(self.times)):
            raise TraceError(
                f"values shape {self.values.shape} != (regions={len(self.regions)}, times={len(self.times)})"
            )
        if len(self.times) < 2:
            raise TraceError("a trace needs at least 2 time points")
        if np.any(np.diff(self.times) <= 0):
            raise TraceError("trace times must be strictly increasing")
        self._row = {r: i for i, r in enumerate(self.regions)}

    @property
    def start(self) -> float:
        return float(self.times[0])

    @property
    def end(self) -> float:
        return float(self.times[-1])

    @property
    def step(self) -> float:
        """Median sample spacing in seconds."""
        return float(np.median(np.diff(self.times)))

    def row(self, region: str) -> np.ndarray:
        if region not in self._row:
            raise TraceError(
                f"region {region!r} not in trace; available: {', '.join(self.regions)}"
            )
        return self.values[self._row[region]]

    def at(self, region: str, t: float) -> float:
        """MCI of ``region`` at instant ``t``, linearly interpolated; raises outside the trace."""
        if not self.start <= t <= self.end:
            raise TraceError(
                f"time {iso(t)} is outside the trace ({iso(self.start)} .. {iso(self.end)})"
            )
        return float(np.interp(t, self.times, self.row(region)))

    def series(self, region: str, ts: np.ndarray) -> np.ndarray:
        """Vectorised ``at`` over an array of instants."""
        ts = np.asarray(ts, dtype=np.float64)
        self._check_range(ts)
        return np.interp(ts, self.times, self.row(region))

    def series_all(self, ts: np.ndarray, regions: list[str] | None = None) -> np.ndarray:
        """(len(regions), len(ts)) interpolated values; one index search shared by all rows."""
        ts = np.asarray(ts, dtype=np.float64)
        self._check_range(ts)
        i = np.clip(np.searchsorted(self.times, ts, side="right") - 1, 0, len(self.times) - 2)
        t0, t1 = self.times[i], self.times[i + 1]
        w = (ts - t0) / (t1 - t0)
        # gather exactly the needed (row, column) cells: no copy of whole rows of a long trace
        rows = np.arange(len(self.regions)) if regions is None else [self.index(r) for r in regions]
        v0, v1 = self.values[np.ix_(rows, i)], self.values[np.ix_(rows, i + 1)]
        return v0 * (1.0 - w) + v1 * w

    def require(self, start: float, end: float) -> None:
        """Raise a TraceError unless the trace covers [start, end] (a run's span)."""
        if start < self.start or end > self.end:
            raise TraceError(
                f"trace too short for the requested run: need {iso(start)} .. {iso(end)} "
                f"({(end - start) / 3600:.1f} h), trace covers {iso(self.start)} .. {iso(self.end)}; "
                "pick a later --start, fewer --hours, or a longer trace"
            )

    def select(self, regions: list[str]) -> Trace:
        return Trace(self.times, list(regions), self.values[[self.index(r) for r in regions]])

    def index(self, region: str) -> int:
        """Row of ``region`` in ``values``; raises a TraceError naming the available ones."""
        if region not in self._row:
            self.row(region)  # raises with the list of available regions
        return self._row[region]

    def _check_range(self, ts: np.ndarray) -> None:
        if ts.size and (ts.min() < self.start or ts.max() > self.end):
            bad = ts.min() if ts.min() < self.start else ts.max()
            raise TraceError(
                f"time {iso(float(bad))} is outside the trace ({iso(self.start)} .. {iso(self.end)})"
            )


def iso(t: float) -> str:
    return pd.Timestamp(t, unit="s", tz="UTC").strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str | float) -> float:
    """ISO timestamp with offset (or epoch seconds) -> epoch seconds. Naive strings are refused."""
    if isinstance(s, int | float):
        return float(s)
    if not re.search(_OFFSET_RE, s.strip()):
        raise TraceError(f"timestamp {s!r} has no UTC offset; write it as e.g. {s}Z")
    return pd.Timestamp(s).timestamp()


def windows(times: np.ndarray, values: np.ndarray, threshold: float) -> list[tuple[float, float]]:
    """Curtailment windows [(start, end)] where the linearly interpolated signal is < threshold.

    Boundaries are the interpolated crossing times; a window open at either edge is clipped."""
    below = values < threshold
    out: list[tuple[float, float]] = []
    start = float(times[0]) if below[0] else None
    for i in np.flatnonzero(below[1:] != below[:-1]):
        v0, v1, t0, t1 = values[i], values[i + 1], times[i], times[i + 1]
        tc = float(t0 + (v0 - threshold) / (v0 - v1) * (t1 - t0))
        if below[i + 1]:
            start = tc
        else:
            out.append((start, tc))
            start = None
    if start is not None:
        out.append((start, float(times[-1])))
    return out


# ----------------------------------------------------------------------------- loading


def _parse_times(raw: pd.Series, where: str) -> np.ndarray:
    raw = raw.astype(str).str.strip()
    naive = ~raw.str.contains(_OFFSET_RE, regex=True)
    if naive.any():
        i = int(np.flatnonzero(naive.to_numpy())[0])
        raise TraceError(
            f"{where}: naive timestamp {raw.iloc[i]!r} in row {i + 2} ({TIME_COLUMN}); "
            "timestamps must be UTC with an explicit offset, e.g. 2024-06-01T00:00:00Z"
        )
    try:
        ts = pd.to_datetime(raw, utc=True, format="ISO8601")
    except (ValueError, TypeError) as exc:
        raise TraceError(f"{where}: unparseable timestamp in {TIME_COLUMN}: {exc}") from None
    # resolution-agnostic (pandas may parse to s, ms, us or ns)
    times = ((ts - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(np.float64)
    d = np.diff(times)
    if np.any(d == 0):
        i = int(np.flatnonzero(d == 0)[0])
        raise TraceError(
            f"{where}: duplicate timestamp {raw.iloc[i + 1]} (rows {i + 2} and {i + 3}); "
            "keep one row per instant"
        )
    if np.any(d < 0):
        i = int(np.flatnonzero(d < 0)[0])
        raise TraceError(
            f"{where}: timestamps not sorted: row {i + 3} ({raw.iloc[i + 1]}) comes before "
            f"row {i + 2} ({raw.iloc[i]}); sort the file by {TIME_COLUMN}"
        )
    return times


def _parse_values(raw: pd.Series, where: str, column: str) -> np.ndarray:
    text = raw.astype(str).str.strip()
    missing = text.isin(_NAN_TOKENS) | raw.isna()
    nums = pd.to_numeric(text.where(~missing), errors="coerce")
    bad = nums.isna() & ~missing
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise TraceError(
            f"{where}: non-numeric value {text.iloc[i]!r} in column {column!r} row {i + 2}"
        )
    v = nums.to_numpy(dtype=np.float64)
    if np.isinf(v).any():
        i = int(np.flatnonzero(np.isinf(v))[0])
        raise TraceError(f"{where}: infinite value in column {column!r} row {i + 2}")
    return v


def _fill_gaps(
    times: np.ndarray, v: np.ndarray, max_gap_s: float, where: str, col: str
) -> np.ndarray:
    nan = np.isnan(v)
    if not nan.any():
        return v
    ok = np.flatnonzero(~nan)
    if ok.size < 2:
        raise TraceError(f"{where}: column {col!r} has fewer than 2 numeric values")
    if nan[0] or nan[-1]:
        edge = "starts" if nan[0] else "ends"
        raise TraceError(
            f"{where}: column {col!r} {edge} with missing values (NaN gap at "
            f"{iso(times[0] if nan[0] else times[-1])}); cannot interpolate at the edge, trim the file"
        )
    # each NaN run lies between two valid samples; its gap is the time between them
    gaps = np.diff(times[ok])
    big = np.flatnonzero((gaps > max_gap_s) & (np.diff(ok) > 1))
    if big.size:
        j = int(big[0])
        raise TraceError(
            f"{where}: NaN gap of {gaps[j]:.0f} s in column {col!r} from {iso(times[ok[j]])} "
            f"to {iso(times[ok[j + 1]])} exceeds max_gap_s={max_gap_s:.0f}; "
            "fix the data or raise max_gap_s"
        )
    out = v.copy()
    out[nan] = np.interp(times[nan], times[ok], v[ok])
    return out


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise TraceError(f"{path}: trace file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: not a readable CSV ({exc})") from None
    if TIME_COLUMN not in df.columns:
        raise TraceError(f"{path}: missing column {TIME_COLUMN!r}; found {list(df.columns)}")
    if len(df) < 2:
        raise TraceError(f"{path}: needs at least 2 rows, found {len(df)}")
    return df


def load_trace(
    paths: str | Path | list[str | Path] | dict[str, str | Path],
    regions: list[str] | None = None,
    max_gap_s: float = DEFAULT_MAX_GAP_S,
    units: str | None = None,
    start: float | None = None,
    end: float | None = None,
) -> Trace:
    """Load a wide CSV, or WattTime-style long CSVs (one per region), into a Trace.

    ``paths``: one wide CSV; or long files as a list (region = file stem, or ``REGION=path``)
    or a ``{region: path}`` dict. ``units``: "g/kWh" or "lbs/MWh"; default g/kWh for wide
    files and lbs/MWh (WattTime's MOER unit) for long files. ``start``/``end`` (epoch s), if
    given, must be covered (else "too short" error). Long files are aligned on the union of
    their timestamps within their common span, by linear interpolation."""
    if units is not None and units not in UNITS:
        raise TraceError(f"unknown units {units!r}; use one of {', '.join(UNITS)}")
    files = _as_files(paths)
    if len(files) == 1 and files[0][0] is None and not _is_long(Path(files[0][1])):
        trace = _load_wide(Path(files[0][1]), regions, max_gap_s, UNITS[units or "g/kWh"])
    else:
        files = [(r or Path(p).stem, p) for r, p in files]
        trace = _load_long(files, regions, max_gap_s, UNITS[units or "lbs/MWh"])
    if start is not None or end is not None:
        trace.require(trace.start if start is None else start, trace.end if end is None else end)
    return trace


def _as_files(paths) -> list[tuple[str | None, str]]:
    if isinstance(paths, dict):
        return [(r, str(p)) for r, p in paths.items()]
    if isinstance(paths, str | Path):
        paths = [paths]
    files: list[tuple[str | None, str]] = []
    for p in paths:
        p = str(p)
        if "=" in p and not Path(p).exists():
            region, p = p.split("=", 1)
            files.append((region, p))
        else:
            files.append((None, p))
    if len(files) > 1:
        files = [(r or Path(p).stem, p) for r, p in files]
    return files


def _is_long(path: Path) -> bool:
    """A single file with a 'value' column is a WattTime long file named after its region."""
    try:
        with path.open() as f:
            header = [c.strip() for c in f.readline().split(",")]
    except OSError:
        return False
    return "value" in header


def _load_wide(path: Path, regions: list[str] | None, max_gap_s: float, scale: float) -> Trace:
    df = _read_csv(path)
    have = [c for c in df.columns if c != TIME_COLUMN]
    if regions is None:
        regions = have
    missing = [r for r in regions if r not in have]
    if missing:
        raise TraceError(
            f"{path}: region(s) {', '.join(missing)} missing; file has {', '.join(have)}"
        )
    if not regions:
        raise TraceError(f"{path}: no region columns besides {TIME_COLUMN!r}")
    times = _parse_times(df[TIME_COLUMN], str(path))
    values = np.stack(
        [
            _fill_gaps(times, _parse_values(df[r], str(path), r), max_gap_s, str(path), r)
            for r in regions
        ]
    )
    return Trace(times, list(regions), values * scale)


def _load_long(files, regions: list[str] | None, max_gap_s: float, scale: float) -> Trace:
    by_region = {}
    for region, p in files:
        path = Path(p)
        df = _read_csv(path)
        if "value" not in df.columns:
            raise TraceError(
                f"{path}: missing column 'value' (WattTime long format: point_time,value)"
            )
        times = _parse_times(df[TIME_COLUMN], str(path))
        by_region[region] = (
            times,
            _fill_gaps(
                times, _parse_values(df["value"], str(path), "value"), max_gap_s, str(path), "value"
            ),
        )
    if regions is None:
        regions = list(by_region)
    missing = [r for r in regions if r not in by_region]
    if missing:
        raise TraceError(
            f"region(s) {', '.join(missing)} missing; long files given for {', '.join(by_region)}"
        )
    lo = max(by_region[r][0][0] for r in regions)
    hi = min(by_region[r][0][-1] for r in regions)
    if hi <= lo:
        raise TraceError(f"long files for {', '.join(regions)} do not overlap in time")
    grid = np.unique(np.concatenate([by_region[r][0] for r in regions]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    values = np.stack([np.interp(grid, *by_region[r]) for r in regions])
    return Trace(grid, list(regions), values * scale)


def save_wide_csv(trace: Trace, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stamps = pd.to_datetime(trace.times, unit="s", utc=True).strftime("%Y-%m-%dT%H:%M:%SZ")
    df = pd.DataFrame({TIME_COLUMN: stamps})
    for r, v in zip(trace.regions, trace.values, strict=True):
        df[r] = np.round(v, 2)
    df.to_csv(path, index=False)
