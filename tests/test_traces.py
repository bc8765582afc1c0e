"""MCI traces: each malformed input gives its specific error; interpolation; WattTime long
files; the seeded synthetic generator and the CLI."""

import numpy as np
import pytest

from pilot.energy import synthetic as S
from pilot.energy import trace_cli
from pilot.energy import traces as T
from pilot.energy.traces import TraceError, load_trace

HEAD = "point_time,CAISO_NORTH,SPP_TX\n"


def wide(tmp_path, rows: list[str], head: str = HEAD, name: str = "t.csv"):
    p = tmp_path / name
    p.write_text(head + "\n".join(rows) + "\n")
    return p


def ok_rows(n: int = 6) -> list[str]:
    return [f"2024-06-01T00:{5 * i:02d}:00Z,{100 + i},{200 + 2 * i}" for i in range(n)]


def test_wide_csv_loads_and_interpolates_linearly(tmp_path):
    tr = load_trace(wide(tmp_path, ok_rows()))
    assert tr.regions == ["CAISO_NORTH", "SPP_TX"] and tr.step == 300.0
    t0 = T.parse_time("2024-06-01T00:00:00Z")
    assert tr.at("CAISO_NORTH", t0 + 450) == pytest.approx(101.5)
    ts = np.array([t0, t0 + 75, t0 + 1500])
    np.testing.assert_allclose(tr.series("SPP_TX", ts), [200.0, 200.5, 210.0])
    np.testing.assert_allclose(tr.series_all(ts)[1], tr.series("SPP_TX", ts))
    with pytest.raises(TraceError, match="outside the trace"):
        tr.at("SPP_TX", t0 - 1)


def test_offsets_other_than_utc_are_converted(tmp_path):
    rows = [f"2024-06-01T02:{5 * i:02d}:00+02:00,{100 + i},{200}" for i in range(3)]
    tr = load_trace(wide(tmp_path, rows))
    assert tr.start == T.parse_time("2024-06-01T00:00:00Z")


@pytest.mark.parametrize(
    "mutate,message",
    [
        (
            lambda r: [r[0], r[2], r[1], *r[3:]],
            "timestamps not sorted: row 4 \\(2024-06-01T00:05:00Z\\) comes before row 3",
        ),
        (lambda r: [r[0], r[1], r[1], *r[2:]], "duplicate timestamp 2024-06-01T00:05:00Z"),
        (
            lambda r: [r[0], r[1].replace(",101,", ",abc,"), *r[2:]],
            "non-numeric value 'abc' in column 'CAISO_NORTH' row 3",
        ),
        (
            lambda r: [x.replace("Z,", ",") for x in r],
            "naive timestamp '2024-06-01T00:00:00' in row 2",
        ),
        (
            lambda r: [r[0], *[x.rsplit(",", 1)[0] + "," for x in r[1:5]], r[5]],
            "NaN gap of 1500 s in column 'SPP_TX'",
        ),
        (
            lambda r: [r[0].replace(",100,", ",,"), *r[1:]],
            "'CAISO_NORTH' starts with missing values",
        ),
    ],
    ids=["unsorted", "duplicate", "non-numeric", "naive", "nan-gap", "nan-edge"],
)
def test_malformed_wide_csv_gives_specific_error(tmp_path, mutate, message):
    p = wide(tmp_path, mutate(ok_rows()))
    with pytest.raises(TraceError, match=message) as e:
        load_trace(p)
    assert str(p) in str(e.value)


def test_short_nan_gap_is_filled_by_interpolation(tmp_path):
    rows = ok_rows()
    rows[2] = "2024-06-01T00:10:00Z,NaN,204"
    tr = load_trace(wide(tmp_path, rows), max_gap_s=900)
    assert tr.at("CAISO_NORTH", tr.times[2]) == pytest.approx(102.0)


def test_missing_region_is_named(tmp_path):
    with pytest.raises(
        TraceError, match="region\\(s\\) NEM_SA missing; file has CAISO_NORTH, SPP_TX"
    ):
        load_trace(wide(tmp_path, ok_rows()), regions=["CAISO_NORTH", "NEM_SA"])


def test_trace_too_short_for_the_requested_run(tmp_path):
    tr = load_trace(wide(tmp_path, ok_rows()))
    with pytest.raises(TraceError, match="too short for the requested run"):
        tr.require(tr.start, tr.start + 48 * 3600)
    with pytest.raises(TraceError, match="too short"):
        load_trace(wide(tmp_path, ok_rows()), start=tr.start, end=tr.start + 3600)


def test_watttime_long_files_convert_lbs_per_mwh_and_align(tmp_path):
    a = tmp_path / "CAISO_NORTH.csv"
    a.write_text(
        "point_time,value\n"
        + "".join(f"2024-06-01T00:{5 * i:02d}:00Z,{200 + i}\n" for i in range(6))
    )
    b = tmp_path / "b.csv"  # named explicitly, and starting 5 min later
    b.write_text(
        "point_time,value\n" + "".join(f"2024-06-01T00:{5 * i:02d}:00Z,1000\n" for i in range(1, 7))
    )
    tr = load_trace([str(a), f"NEM_SA={b}"])
    assert tr.regions == ["CAISO_NORTH", "NEM_SA"]
    assert tr.start == T.parse_time("2024-06-01T00:05:00Z") and len(tr.times) == 5
    assert tr.at("NEM_SA", tr.start) == pytest.approx(453.592)
    assert tr.at("CAISO_NORTH", tr.start) == pytest.approx(201 * 0.453592)
    single = load_trace(a, units="g/kWh")  # one long file, region from its name
    assert single.regions == ["CAISO_NORTH"] and single.values[0, 0] == 200.0


def test_synthetic_is_seeded_realistic_and_dips_at_local_midday():
    regions = ["CAISO_NORTH", "SPP_TX", "NEM_SA", "DE"]
    a = S.synthetic(regions, 96, seed=1, marginal=False)
    b = S.synthetic(regions, 96, seed=1, marginal=False)
    np.testing.assert_array_equal(a.values, b.values)
    assert not np.array_equal(a.values, S.synthetic(regions, 96, seed=2, marginal=False).values)
    assert a.step == 300.0 and a.values.min() >= 20 and a.values.max() <= 900
    smooth = S.synthetic(regions, 96, seed=1, gusts=False, marginal=False)
    # gusts only lower the signal, and only in places
    assert (a.values <= smooth.values).all() and (a.values == smooth.values).mean() > 0.9
    short_off_midday = 0
    for r in regions:
        off = S.REGION_UTC_OFFSET_H[r]
        w = T.windows(smooth.times, smooth.row(r), 100.0)
        assert len(w) >= 3, r
        for lo, hi in w:  # without gusts: the solar dips only, at local midday
            mid_local_h = ((lo + hi) / 2 / 3600 + off) % 24
            assert 9.5 <= mid_local_h <= 14.5, (r, mid_local_h)
        for lo, hi in T.windows(a.times, a.row(r), 100.0):
            mid_local_h = ((lo + hi) / 2 / 3600 + off) % 24
            if hi - lo >= 3600:  # the long windows are still the solar ones
                assert 9.5 <= mid_local_h <= 14.5, (r, mid_local_h)
            elif not 9 <= mid_local_h <= 15:
                short_off_midday += 1
    assert short_off_midday >= 2 * len(regions)  # wind dips at other hours


def test_marginal_synthetic_jumps_at_window_edges_and_has_short_excursions_inside():
    regions = ["CAISO_NORTH", "SPP_TX", "NEM_SA"]
    tr = S.synthetic(regions, 96, seed=2, gusts=False)
    assert (tr.values == S.synthetic(regions, 96, seed=2, gusts=False).values).all()
    below = tr.values < 100.0
    # every crossing of the threshold is a jump: from a near-zero level to >= 150 (a gas unit
    # inside a window) or to fossil levels (>= 450 at a window's edge), within one sample
    cross = below[:, 1:] != below[:, :-1]
    lo = np.minimum(tr.values[:, 1:], tr.values[:, :-1])[cross]
    hi = np.maximum(tr.values[:, 1:], tr.values[:, :-1])[cross]
    assert cross.sum() >= 12 and (lo < 0.95 * 100).all() and (hi >= 150).all()
    assert (hi >= S.SYNTH_FOSSIL_MIN_G).sum() >= 8  # window edges
    # excursions: runs above the threshold of at most 2 samples between windows
    runs = []
    for row in below:
        edges = np.flatnonzero(np.diff(np.concatenate([[1], row.astype(np.int8), [1]])))
        runs += [b - a for a, b in zip(edges[::2], edges[1::2], strict=True) if a > 0]
    assert any(n <= 2 for n in runs) and any(n > 12 for n in runs)
    assert (tr.values[below] < 0.95 * 100).all() and tr.values.min() >= 5

    with pytest.raises(TraceError, match="no UTC offset known for region\\(s\\) PJM"):
        S.synthetic(["PJM"], 24, seed=1)
    assert S.synthetic(["PJM"], 24, seed=1, utc_offsets={"PJM": -5}).regions == ["PJM"]


def test_cli_synth_then_check_roundtrips(tmp_path, capsys):
    out = tmp_path / "s.csv"
    assert (
        trace_cli.main(
            [
                "synth",
                "--regions",
                "CAISO_NORTH,NEM_SA",
                "--hours",
                "24",
                "--seed",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    tr = load_trace(out)
    ref = S.synthetic(["CAISO_NORTH", "NEM_SA"], 24, seed=3)
    np.testing.assert_allclose(tr.values, ref.values, atol=0.006)
    assert (
        trace_cli.main(["synth", "--hours", "24", "--seed", "3", "--no-gusts", "--out", str(out)])
        == 0
    )
    smooth = S.synthetic(["CAISO_NORTH", "SPP_TX", "NEM_SA"], 24, seed=3, gusts=False)
    np.testing.assert_allclose(load_trace(out).values, smooth.values, atol=0.006)
    assert trace_cli.main(["check", str(out)]) == 0
    assert "windows < 100" in capsys.readouterr().out


def test_cli_check_reports_one_line_and_exit_code_2(tmp_path, capsys):
    p = wide(tmp_path, [r.replace("Z,", ",") for r in ok_rows()])
    assert trace_cli.main(["check", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "naive timestamp" in err and "\n" not in err


def test_bundled_default_trace_is_valid():
    from pathlib import Path

    p = Path(__file__).resolve().parents[1] / "configs" / "traces" / "synthetic-3site.csv"
    tr = load_trace(p)
    assert tr.regions == ["CAISO_NORTH", "SPP_TX", "NEM_SA"]
    assert tr.end - tr.start == 48 * 3600 and tr.step == 300
    assert all(T.windows(tr.times, tr.row(r), 100.0) for r in tr.regions)
    # it is the marginal seed-44 trace without gusts (the demo is tuned on it)
    ref = S.synthetic(tr.regions, 48, seed=44, gusts=False)
    np.testing.assert_allclose(tr.values, ref.values, atol=0.006)
