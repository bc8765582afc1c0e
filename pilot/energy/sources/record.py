"""What a run saw, appended as it happens (line-buffered CSV), so a live run can be replayed:

    trace.csv         point_time + one column per region: the MCI published at each tick,
                      empty where the region was stale. A wide trace pilot.energy.traces loads:
                      ``python -m pilot.analysis.simulate --trace trace.csv`` replays the run's inputs.
    observations.csv  received_at, source, region, point_time, mci: every new provider value
    forecasts.csv     issued_at, source, region, point_time, mci: every forecast issued;
                      ``read_forecasts`` loads it for the "recorded" forecaster
                      (``pilot.analysis.simulate --forecaster recorded --forecasts forecasts.csv``)

Re-opening a directory appends to it (a resumed run), if it records the same regions and
ends before the new run starts.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from pilot.config.sites import SitesConfig
from pilot.energy.forecast import Forecaster, RecordedForecasts, forecast_error, make_forecaster
from pilot.energy.sources.base import Series, SourceError
from pilot.energy.traces import Trace, parse_time

TRACE = "trace.csv"
OBSERVATIONS = "observations.csv"
FORECASTS = "forecasts.csv"
FORECAST_COLUMNS = ["issued_at", "source", "region", "point_time", "mci"]


def stamp(t: float) -> str:
    """ISO 8601 with offset, sub-second digits kept (pilot.energy.traces parses it)."""
    return datetime.fromtimestamp(t, UTC).isoformat()


class SignalRecord:
    def __init__(self, directory: str | Path, regions: list[str], start: float):
        self.dir = Path(directory)
        self.regions = sorted(set(regions))
        self.trace_path = self.dir / TRACE
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            last = _last_time(self.trace_path, ["point_time", *self.regions])
            if last is not None and last >= start:
                raise SourceError(
                    f"{self.trace_path} already records up to {stamp(last)}, after this run's "
                    f"start {stamp(start)}: record into another directory"
                )
            self._trace = _open(self.trace_path, ["point_time", *self.regions])
            cols = ["source", "region", "point_time", "mci"]
            self._obs = _open(self.dir / OBSERVATIONS, ["received_at", *cols])
            self._fc = _open(self.dir / FORECASTS, FORECAST_COLUMNS)
        except OSError as exc:
            raise SourceError(f"cannot record signals in {self.dir}: {exc.strerror}") from None
        self._lock = threading.Lock()

    def tick(self, t: float, mci: dict[str, float | None]) -> None:
        """One row: each region's published MCI at tick ``t`` (None: stale)."""
        cells = ["" if mci.get(r) is None else repr(mci[r]) for r in self.regions]
        self._write(self._trace, [stamp(t), *cells])

    def observed(self, source: str, region: str, t: float, mci: float, received: float) -> None:
        self._write(self._obs, [stamp(received), source, region, stamp(t), repr(mci)])

    def forecast(self, source: str, region: str, issued: float, series: Series) -> None:
        with self._lock:
            for t, v in series:
                self._fc.write(",".join([stamp(issued), source, region, stamp(t), repr(v)]) + "\n")

    def close(self) -> None:
        for f in (self._trace, self._obs, self._fc):
            f.close()

    def _write(self, f: TextIO, cells: list[str]) -> None:
        with self._lock:
            f.write(",".join(cells) + "\n")


def _open(path: Path, header: list[str]) -> TextIO:
    fresh = not path.exists() or path.stat().st_size == 0
    f = path.open("a", buffering=1)  # line-buffered: a crash loses at most a partial line
    if fresh:
        f.write(",".join(header) + "\n")
    return f


def _last_time(path: Path, header: list[str]) -> float | None:
    """The last row's time of an existing record; refuses one with other columns."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    lines = path.read_text().splitlines()
    if lines[0] != ",".join(header):
        raise SourceError(
            f"{path} records columns {lines[0]!r}, not {','.join(header)!r}: "
            "record into another directory"
        )
    rows = [ln for ln in lines[1:] if ln.strip()]
    return parse_time(rows[-1].split(",", 1)[0]) if rows else None


def read_forecasts(path: str | Path) -> RecordedForecasts:
    """A recorded forecasts.csv, issue by issue; SourceError (one line naming the file and
    the row) for a missing, empty or malformed file. Rows of one issue are contiguous and
    in point order, as SignalRecord.forecast writes them."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise SourceError(f"recorded forecasts {path}: cannot read it ({exc.strerror})") from None
    if not lines or lines[0] != ",".join(FORECAST_COLUMNS):
        raise SourceError(
            f"recorded forecasts {path}: expected the header {','.join(FORECAST_COLUMNS)!r} "
            "of a live run's forecasts.csv"
        )
    issues: dict[tuple[str, float], Series] = {}
    prev = None
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = line.split(",")
        where = f"recorded forecasts {path} line {n}"
        if len(cells) != len(FORECAST_COLUMNS):
            raise SourceError(f"{where}: {len(cells)} columns, expected {len(FORECAST_COLUMNS)}")
        issued, _, region, t, v = cells
        try:
            key, point = (region, _epoch(issued)), (_epoch(t), float(v))
        except ValueError as exc:
            raise SourceError(f"{where}: {exc}") from None
        # a new issue; an issue recorded again (a resumed run) replaces the earlier rows
        if key != prev or point[0] == issues[key][0][0]:
            issues[key], prev = [], key
        series = issues[key]
        if series and point[0] <= series[-1][0]:
            raise SourceError(f"{where}: point_time {t} not after the issue's previous point")
        series.append(point)
    fc = RecordedForecasts({}, {})
    for region, issued in sorted(issues):
        fc.issued.setdefault(region, []).append(issued)
        fc.series.setdefault(region, []).append(issues[region, issued])
    return fc


def _epoch(stamp_: str) -> float:
    t = datetime.fromisoformat(stamp_)
    if t.tzinfo is None:
        raise ValueError(f"timestamp {stamp_!r} has no UTC offset")
    return t.timestamp()


def forecaster(
    sites: SitesConfig, name: str, trace: Trace | None, forecasts: str | Path | None = None
) -> Forecaster:
    """pilot.energy.forecast.make_forecaster for a sites config: the noisy error model of its
    [policy]; "recorded" replays ``forecasts`` (default: its [policy] forecasts file)."""
    recorded = None
    if name == "recorded":
        path = forecasts or sites.forecasts
        if path is None:
            raise SourceError(
                'forecaster "recorded" needs a live run\'s forecasts.csv: pass --forecasts FILE'
                " or set [policy] forecasts in the sites file"
            )
        recorded = read_forecasts(path)
    return make_forecaster(name, trace, forecast_error(sites), recorded)
