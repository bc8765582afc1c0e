"""Curtailment policy: hysteresis, forecast-aware pre-provisioning, graceful degradation, and
the batch implementation agreeing with the step one."""

import math

import numpy as np
import pytest

from pilot.config.sites import Site, SitesConfig
from pilot.control import policy as P
from pilot.control.batch import simulate_batch
from pilot.control.outlook import ForecastArrays, forecast_arrays, outlook
from pilot.energy import forecast as F
from pilot.energy.synthetic import synthetic
from pilot.energy.traces import Trace, windows

DELAY = 240.0
THR = 100.0


def sites_config(regions: list[str], **policy) -> SitesConfig:
    sites = [Site(f"s{i}", r, [0], 2.024, 0.468, DELAY) for i, r in enumerate(regions)]
    knobs = dict(threshold=THR, release_delay_s=600.0, enter_dwell_s=0.0, min_window_s=900.0)
    return SitesConfig(sites, **{**knobs, **policy})


def run_steps(pol: P.Policy, trace: Trace, sites: SitesConfig, ticks, fc: F.Forecaster | None):
    """Drive Policy.step with the provisioning model "ready `delay` s after provisioning"."""
    names = sites.names
    prov_since: dict[str, float] = {}
    prov, train, ready_log = [], [], []
    for now in ticks:
        now = float(now)
        ready = {s for s, t in prov_since.items() if now - t >= pol.delay(s)}
        mci = {s.name: trace.at(s.region, now) for s in sites.sites}
        fcs = (
            {
                s.name: fc.forecast(s.region, now, pol.cfg.horizon_s, mci[s.name])
                for s in sites.sites
            }
            if fc
            else {}
        )
        d = pol.step(now, mci, fcs, ready)
        assert d.mode == P.Mode.of(len(d.train))
        assert d.train <= d.provision and set(d.reasons) == set(names)
        prov_since = {s: prov_since.get(s, now) for s in d.provision}
        prov.append([s in d.provision for s in names])
        train.append([s in d.train for s in names])
        ready_log.append([s in ready for s in names])
    return np.array(prov).T, np.array(train).T, np.array(ready_log).T


def toggles(x: np.ndarray) -> int:
    return int(np.sum(x[1:] != x[:-1]))


def flicker_trace() -> Trace:
    """1 h well above, 4 h flickering 95/105 every 5 min, 2 h well above."""
    step = 300.0
    vals = [300.0] * 12 + [95.0 if i % 2 == 0 else 105.0 for i in range(48)] + [300.0] * 25
    times = 1.7e9 + step * np.arange(len(vals))
    return Trace(times, ["X"], np.array([vals]))


def late(trace: Trace, s: float) -> F.Forecaster:
    """A perfect forecast ``s`` seconds late (a wrong one)."""
    return F.perfect(Trace(trace.times + s, trace.regions, trace.values))


@pytest.mark.parametrize(
    "name,fc_name",
    [
        ("prototype", "persistence"),
        ("forecast", "persistence"),
        ("forecast", "perfect"),
        ("forecast", "late-600"),
        ("forecast", "late-5400"),
    ],
)
def test_flickering_signal_provisions_once_and_ours_trains_only_below(name, fc_name):
    trace = flicker_trace()
    sc = sites_config(["X"])
    pol = P.make_policy(name, sc)
    if fc_name.startswith("late-"):
        fc = late(trace, float(fc_name.split("-")[1]))
    else:
        fc = F.make_forecaster(fc_name, trace)
    prov, train, _ = run_steps(pol, trace, sc, trace.times, fc)
    assert toggles(prov[0]) == 2  # one provisioning cycle: the node stays warm throughout
    below = np.array([trace.at("X", t) < THR for t in trace.times])
    if name == "prototype":  # trains through its release delay
        assert toggles(train[0]) == 2
    else:  # ours stops stepping above the threshold, and steps again below (once ready)
        assert not (train[0] & ~below).any() and toggles(train[0]) > 40
    # the oracle (no hysteresis) follows every flicker: the case is a real flicker
    _, train_o, _ = run_steps(P.make_policy("oracle", sc), trace, sc, trace.times, None)
    assert toggles(train_o[0]) > 40


def merged_windows(trace: Trace, region: str, release_s: float) -> list[tuple[float, float]]:
    """Raw windows with gaps shorter than the release delay merged (what hysteresis sees)."""
    out: list[list[float]] = []
    for a, b in windows(trace.times, trace.row(region), THR):
        if out and a - out[-1][1] < release_s:
            out[-1][1] = b
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


REGIONS = ["CAISO_NORTH", "SPP_TX", "NEM_SA"]


@pytest.mark.parametrize("tick_s", [300.0, 60.0])
def test_right_forecast_makes_site_ready_at_window_start(tick_s):
    trace = synthetic(REGIONS, 72, seed=3)
    sc = sites_config(REGIONS)
    pol = P.make_policy("forecast", sc)
    ticks = np.arange(trace.start, trace.end - 3600, tick_s)
    prov, train, ready = run_steps(pol, trace, sc, ticks, F.perfect(trace))
    checked = 0
    for i, region in enumerate(REGIONS):
        for a, b in merged_windows(trace, region, 600.0):
            if a < trace.start + 2 * DELAY or b - a < 1800 or b > ticks[-1]:
                continue
            # the window starts, for a policy that acts on ticks, at the first tick it is seen
            # open: the site must be ready AT that tick (not after), and not a tick earlier
            # (idle provisioned time is wasted energy)
            k = int(np.searchsorted(ticks, a))  # first tick at/after the window opens
            starts = np.flatnonzero(prov[i, : k + 1] & ~np.r_[False, prov[i, :k]])
            ready_at = ticks[starts[-1]] + DELAY
            assert ready_at <= ticks[k], f"{region}: ready {ready_at - ticks[k]:.0f} s late"
            assert ready_at > ticks[k - 1], f"{region}: ready {ticks[k] - ready_at:.0f} s early"
            assert ready[i, k] and train[i, k]
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize("fc_name", ["persistence", "same_time_yesterday", "shifted"])
def test_wrong_forecast_misses_no_window_by_more_than_the_provisioning_delay(fc_name):
    trace = synthetic(REGIONS, 96, seed=5)
    sc = sites_config(REGIONS)
    pol = P.make_policy("forecast", sc)
    if fc_name == "shifted":  # a forecast 90 min late
        fc = F.perfect(Trace(trace.times + 5400, trace.regions, trace.values))
    else:
        fc = F.make_forecaster(fc_name, trace)
    tick = 300.0
    ticks = np.arange(trace.start, trace.end - 3600, tick)
    prov, train, _ = run_steps(pol, trace, sc, ticks, fc)
    checked = 0
    for i, region in enumerate(REGIONS):
        for a, b in merged_windows(trace, region, 600.0):
            if a < trace.start + tick or b > ticks[-1] or b - a < 1800:
                continue
            k_open = int(np.searchsorted(ticks, a))
            # provisioning has started by the first tick the window is open: ready at most
            # one provisioning delay after that tick
            assert prov[i, k_open], f"{region}: not provisioned when the window at {a} opened"
            k_train = k_open + int(np.argmax(train[i, k_open:]))
            assert train[i, k_train], f"{region}: window at {a} never trained"
            late = ticks[k_train] - a
            assert late <= DELAY + 2 * tick, f"{region}: trained {late:.0f} s after window start"
            checked += 1
    assert checked >= 6


def test_short_predicted_windows_are_skipped_and_long_ones_kept():
    vals = [300.0] * 12 + [60.0] * 2 + [300.0] * 12 + [60.0] * 24 + [300.0] * 14
    times = 1.7e9 + 300.0 * np.arange(len(vals))
    trace = Trace(times, ["X"], np.array([vals]))
    sc = sites_config(["X"])
    prov, train, _ = run_steps(P.make_policy("forecast", sc), trace, sc, times, F.perfect(trace))
    assert not prov[0, :24].any()  # the ~10-min window is not worth 240 s of provisioning
    assert train[0, 26:48].all()
    # the prototype provisions for both
    prov_p, _, _ = run_steps(P.make_policy("prototype", sc), trace, sc, times, None)
    assert prov_p[0, 12:14].all()


def gap_trace() -> Trace:
    """Two windows 15 min apart (a wind lull between two dips), then one long one."""
    vals = [300.0] * 12 + [60.0] * 24 + [300.0] * 3 + [60.0] * 24 + [300.0] * 12
    return Trace(1.7e9 + 300.0 * np.arange(len(vals)), ["X"], np.array([vals]))


@pytest.mark.parametrize("tick_s", [300.0, 60.0])
def test_a_right_forecast_leaves_the_window_at_once_and_is_back_in_time(tick_s):
    trace = gap_trace()
    sc = sites_config(["X"])
    ticks = np.arange(trace.start, trace.end, tick_s)
    prov, train, _ = run_steps(P.make_policy("forecast", sc), trace, sc, ticks, F.perfect(trace))
    below = trace.series("X", ticks) < THR
    # trains exactly while below, like the oracle; released in the 15-min gap and back ready
    np.testing.assert_array_equal(train[0], below)
    idle = prov[0] & ~train[0]
    assert idle.sum() == 2 * math.ceil(DELAY / tick_s)  # one boot per window, no hold
    # the prototype trains through the gap and 600 s past the end
    _, tr_p, _ = run_steps(P.make_policy("prototype", sc), trace, sc, ticks, None)
    assert (tr_p[0] & ~below).sum() * tick_s >= 2 * 600
    # ours with no forecast cannot see the end: it never trains above the threshold, and
    # holds the site warm (idle) only until that costs what a re-provisioning would
    prov_n, tr_n, _ = run_steps(
        P.make_policy("forecast", sc), trace, sc, ticks, F.persistence(trace)
    )
    np.testing.assert_array_equal(tr_n[0], below & prov_n[0] & tr_n[0])
    assert not (tr_n[0] & ~below).any() and (prov_n[0] & ~below).any()


def test_predicted_window_that_never_comes_is_abandoned_after_release_delay():
    vals = [300.0] * 60
    times = 1.7e9 + 300.0 * np.arange(len(vals))
    trace = Trace(times, ["X"], np.array([vals]))
    lying = Trace(times, ["X"], np.array([[300.0] * 12 + [50.0] * 36 + [300.0] * 12]))
    sc = sites_config(["X"])
    prov, train, _ = run_steps(P.make_policy("forecast", sc), trace, sc, times, F.perfect(lying))
    on = np.flatnonzero(prov[0])
    assert on.size and not train.any()
    # pre-provisioned just before the predicted opening, held release_delay_s, then dropped
    assert times[on[-1]] - lying.times[12] <= 600.0 and toggles(prov[0]) == 2


def test_oracle_trains_exactly_while_below_threshold():
    trace = synthetic(REGIONS, 24, seed=2)
    sc = sites_config(REGIONS)
    _, train, _ = run_steps(P.make_policy("oracle", sc), trace, sc, trace.times, None)
    assert (train == (trace.values < THR)).all()


@pytest.mark.parametrize(
    "name,fc_name,tick_s,enter_dwell",
    [
        ("forecast", "perfect", 300.0, 0.0),
        ("forecast", "perfect", 120.0, 300.0),
        ("forecast", "same_time_yesterday", 300.0, 0.0),
        ("forecast", "persistence", 300.0, 0.0),
        ("forecast", "persistence", 60.0, 0.0),
        ("forecast", "noisy", 300.0, 0.0),
        ("prototype", None, 300.0, 0.0),
        ("oracle", None, 300.0, 0.0),
    ],
)
def test_batch_decisions_equal_step_decisions(name, fc_name, tick_s, enter_dwell):
    regions = REGIONS + ["DE"]
    trace = synthetic(regions, 60, seed=11)
    sc = sites_config(regions, enter_dwell_s=enter_dwell)
    ticks = np.arange(trace.start, trace.end - 3600, tick_s)
    fc = F.make_forecaster(fc_name, trace) if fc_name else None
    prov, train, ready = run_steps(P.make_policy(name, sc), trace, sc, ticks, fc)
    cfg = P.policy_config(sc, name)
    mci = trace.series_all(ticks, regions)
    delays = np.array([s.provision_delay_s for s in sc.sites])
    fa = (
        forecast_arrays(fc, trace, regions, ticks, cfg.horizon_s, THR, cfg.release_delay_s, mci)
        if fc
        else None
    )
    # in two chunks, carrying the state over
    half = len(ticks) // 2
    power = dict(
        idle_kw=np.array([s.idle_kw for s in sc.sites]),
        train_kw=np.array([s.train_kw for s in sc.sites]),
    )
    r1 = simulate_batch(cfg, delays, ticks[:half], mci[:, :half], _cols(fa, 0, half), **power)
    r2 = simulate_batch(
        cfg, delays, ticks[half:], mci[:, half:], _cols(fa, half, None), r1.state, **power
    )
    np.testing.assert_array_equal(np.hstack([r1.provision, r2.provision]), prov)
    np.testing.assert_array_equal(np.hstack([r1.train, r2.train]), train)
    np.testing.assert_array_equal(np.hstack([r1.ready, r2.ready]), ready)


def _cols(fa, a, b):
    if fa is None:
        return None
    return ForecastArrays(*(x[:, a:b] for x in (fa.now_value, fa.t_open, fa.t_close, fa.t_up)))


def test_forecast_arrays_equal_outlook_of_forecast_lists():
    trace = synthetic(REGIONS, 30, seed=4)
    ticks = np.arange(trace.start, trace.end, 170.0)  # off-grid ticks
    for fc in (F.perfect(trace), F.same_time_yesterday(trace)):
        fa = forecast_arrays(fc, trace, REGIONS, ticks, 3600.0, THR, 600.0)
        for i, r in enumerate(REGIONS):
            for k, t in enumerate(ticks):
                ol = outlook(fc.forecast(r, float(t), 3600.0), THR, 600.0)
                if ol is None:
                    assert math.isnan(fa.now_value[i, k])
                    continue
                assert fa.now_value[i, k] == pytest.approx(ol.now_value)
                for got, want in (
                    (fa.t_open[i, k], ol.t_open),
                    (fa.t_close[i, k], ol.t_close),
                    (fa.t_up[i, k], ol.t_up),
                ):
                    assert got == pytest.approx(want, abs=1e-3) or (
                        math.isinf(got) and math.isinf(want)
                    )


def test_outlook_merges_blips_shorter_than_the_release_delay():
    fc = [
        (0.0, 200.0),
        (100.0, 50.0),
        (200.0, 150.0),
        (300.0, 50.0),
        (2000.0, 50.0),
        (2100.0, 200.0),
    ]
    ol = outlook(fc, 100.0, release_s=600.0)
    assert ol.t_open == pytest.approx(200 / 3) and ol.t_close == pytest.approx(2100 - 100 * 2 / 3)
    assert outlook(fc, 100.0, release_s=0.0).t_close == pytest.approx(150.0)


# ----------------------------------------------------------------------------- site configs

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_paper_config_reproduces_the_published_setup():
    from pilot.config.sites import load_sites

    c = load_sites(ROOT / "configs" / "paper-3site.toml")
    assert [s.region for s in c.sites] == ["CAISO_NORTH", "SPP_TX", "NEM_SA"]
    assert c.threshold == 100.0 and c.release_delay_s == 600.0 and c.policy == "prototype"
    assert all(
        (s.train_kw, s.idle_kw, s.provision_delay_s) == (2.024, 0.468, 240.0) for s in c.sites
    )
    assert c.trace.exists()
    default = load_sites(ROOT / "configs" / "sites.toml")
    assert default.policy == "forecast" and P.make_policy(None, default).cfg.use_forecast


GOOD = """
[policy]
threshold = 100
[[sites]]
name = "a"
region = "X"
gpus = [0, 1]
train_kw = 2.0
idle_kw = 0.5
provision_delay_s = 240
"""


@pytest.mark.parametrize(
    "edit,message",
    [
        (('name = "a"', 'name = "A_1"'), r"sites\[0\].name: 'A_1' must be a lowercase DNS label"),
        (("train_kw = 2.0\n", ""), r"sites\[0\] \(a\).train_kw: missing"),
        (
            ("idle_kw = 0.5", 'idle_kw = "low"'),
            r"sites\[0\] \(a\).idle_kw: must be a number, got 'low'",
        ),
        (("idle_kw = 0.5", "idle_kw = 3.0"), r"idle_kw: 3.0 exceeds train_kw 2.0"),
        (("gpus = [0, 1]", "gpus = [0, 0]"), r"gpus: device indices must be unique"),
        (("gpus = [0, 1]", "gpu = 2"), r"unknown key\(s\) \['gpu'\]"),
        (("threshold = 100", "threshold = 0"), r"policy.threshold: must be > 0"),
        (("threshold = 100", "name = 'greedy'"), r"policy.name: 'greedy' is not one of"),
        (
            ("threshold = 100", "horizon_s = 60"),
            r"policy.horizon_s: 60 s is shorter than the slowest",
        ),
        (("threshold = 100", "threshold = "), r"invalid TOML"),
    ],
)
def test_bad_site_config_error_names_file_and_field(tmp_path, edit, message):
    from pilot.config.sites import ConfigError, load_sites

    p = tmp_path / "s.toml"
    p.write_text(GOOD.replace(*edit))
    with pytest.raises(ConfigError, match=message) as e:
        load_sites(p)
    assert str(p) in str(e.value)
    p.write_text(GOOD + GOOD[GOOD.index("[[sites]]") :])
    with pytest.raises(ConfigError, match=r"duplicate site name\(s\) \['a'\]"):
        load_sites(p)


def excursion_trace(level: float, minutes: int) -> Trace:
    """1 h at 40 g/kWh, ``minutes`` at ``level`` (1-minute samples), then 1 h at 40."""
    vals = [40.0] * 60 + [level] * minutes + [40.0] * 60
    return Trace(1.7e9 + 60.0 * np.arange(len(vals)), ["X"], np.array([vals]))


@pytest.mark.parametrize("level", [800.0, 150.0])
def test_warm_hold_lasts_until_idle_emissions_reach_a_reprovisioning_cost(level):
    sc = sites_config(["X"])
    pol = P.make_policy("forecast", sc)
    hold_g = pol.hold_cost_g("s0")
    # paper sites, lost work priced at half the threshold: 8.3 g
    assert hold_g == pytest.approx(DELAY / 3600 * (0.468 + 2.024) * THR / 2)
    trace = excursion_trace(level, 60)
    prov, train, _ = run_steps(pol, trace, sc, trace.times, F.persistence(trace))
    above = trace.row("X") >= THR
    assert not (train[0] & above).any()  # never steps above the threshold
    warm_s = 60.0 * (prov[0] & above).sum()
    # idle grams accrue per minute after the first minute above: released at the first tick
    # whose total reaches the cost
    expected = 60.0 * math.ceil(hold_g / (0.468 * level / 60))
    assert warm_s == pytest.approx(expected)
    assert warm_s < 3600 and toggles(prov[0]) == 2  # released in the excursion, then back


def test_short_excursion_is_held_warm_and_training_resumes_without_a_new_boot():
    sc = sites_config(["X"])
    trace = excursion_trace(300.0, 3)  # 3 min at 300 g: cheaper to hold than to reboot
    prov, train, ready = run_steps(
        P.make_policy("forecast", sc), trace, sc, trace.times, F.persistence(trace)
    )
    above = trace.row("X") >= THR
    assert prov[0].all()  # provisioned once, never released in the excursion
    assert not (train[0] & above).any()
    after = np.flatnonzero(above)[-1] + 1
    assert train[0][after] and ready[0][after]  # steps again at once, no boot


def test_noisy_forecast_is_seeded_exact_now_and_errs_more_further_ahead():
    trace = synthetic(REGIONS, 48, seed=2, gusts=False)
    now = trace.start + 6 * 3600.0
    fc = F.noisy(trace, F.ForecastError(time_s=900.0, level=0.15, seed=7))
    a = fc.forecast("SPP_TX", now, 7200.0, current=123.0)
    assert a == fc.forecast("SPP_TX", now, 7200.0, current=123.0)  # seeded
    assert a[0] == (now, 123.0)  # the present is measured
    other = F.noisy(trace, F.ForecastError(seed=8)).forecast("SPP_TX", now, 7200.0)
    assert [v for _, v in other][1:] != [v for _, v in a][1:]
    # no error: the perfect forecast's points exactly
    exact = F.noisy(trace, F.ForecastError(time_s=0.0, level=0.0))
    assert exact.forecast("SPP_TX", now, 3600.0) == F.perfect(trace).forecast("SPP_TX", now, 3600.0)
    # the log-level error's spread grows with the horizon (over many issue times)
    lvl = F.noisy(trace, F.ForecastError(time_s=0.0, level=0.15, seed=1))
    errs = []
    for k in range(200):
        t = trace.start + k * 600.0
        pts = lvl.forecast("CAISO_NORTH", t, 3600.0)
        truth = trace.series("CAISO_NORTH", np.array([p[0] for p in pts]))
        errs.append(np.log(np.array([p[1] for p in pts]) / truth))
    spread = np.std(np.array([e[[1, -1]] for e in errs]), axis=0)
    assert spread[0] < spread[1] and spread[1] == pytest.approx(0.15, rel=0.3)


def recorded_forecasts() -> F.RecordedForecasts:
    """Two issues for X: at 1000 s (a drop ahead) and at 2000 s (the drop later)."""
    return F.RecordedForecasts(
        {"X": [1000.0, 2000.0]},
        {"X": [[(1000.0, 300.0), (1600.0, 50.0)], [(2000.0, 300.0), (3200.0, 50.0)]]},
    )


def test_recorded_forecasts_replay_the_newest_issue_at_or_before_now():
    rec = recorded_forecasts()
    assert rec.latest("X", 999.0) is None and rec.latest("Y", 5000.0) is None
    assert rec.latest("X", 1000.0) == rec.series["X"][0]
    assert rec.latest("X", 1999.0) == rec.series["X"][0]
    assert rec.latest("X", 2000.0) == rec.latest("X", 9e9) == rec.series["X"][1]

    fc = F.make_forecaster("recorded", None, forecasts=rec)
    # before the first issue (and for a region without forecasts): persistence
    assert fc.forecast("X", 500.0, 600.0, 280.0) == [(500.0, 280.0), (1100.0, 280.0)]
    assert fc.forecast("Y", 1500.0, 600.0, 90.0) == [(1500.0, 90.0), (2100.0, 90.0)]
    # then the issue composed from the measured present, as the live source published it
    assert fc.forecast("X", 1200.0, 3600.0, 280.0) == [(1200.0, 280.0), (1600.0, 50.0)]
    assert fc.forecast("X", 2400.0, 3600.0, 290.0) == F.compose(
        2400.0, 290.0, rec.series["X"][1], 3600.0
    )
    assert fc.forecast("X", 2400.0, 3600.0) == []  # no present value and no trace: unknown
    with pytest.raises(ValueError, match="needs a live run's forecasts.csv"):
        F.make_forecaster("recorded", None)


def test_recorded_forecasts_drive_pre_provisioning_in_the_batch_policy_as_in_step():
    """A recorded issue that saw the real drop (3240 s) coming: pre-provisioned from it, the
    site trains from the window's first tick, in both implementations; with persistence only
    a provisioning delay later."""
    times = np.arange(0.0, 6001.0, 60.0)
    trace = Trace(times, ["X"], np.array([np.where(times < 3200.0, 300.0, 50.0)]))
    sc = sites_config(["X"], min_window_s=0.0)
    cfg = P.policy_config(sc, "forecast")
    mci = trace.series_all(times, ["X"])
    issue = [(1000.0, 300.0), (3180.0, 300.0), (3240.0, 50.0), (9000.0, 50.0)]
    rec = F.RecordedForecasts({"X": [1000.0]}, {"X": [issue]})
    first_train = {}
    for name, fc in (("recorded", F.recorded(rec, trace)), ("persistence", F.persistence(trace))):
        prov, train, _ = run_steps(P.make_policy("forecast", sc), trace, sc, times, fc)
        fca = forecast_arrays(fc, trace, ["X"], times, cfg.horizon_s, THR, 600.0, mci)
        res = simulate_batch(
            cfg, np.array([DELAY]), times, mci, fca, idle_kw=np.array([0.468]),
            train_kw=np.array([2.024]),
        )  # fmt: skip
        assert (res.provision == prov).all() and (res.train == train).all()
        first_train[name] = times[np.argmax(train[0])]
    assert first_train == {"recorded": 3240.0, "persistence": 3240.0 + DELAY}
