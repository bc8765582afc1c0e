"""Curtailment policy (pure: plain values in, plain values out; no I/O, no clocks).

Per site, two questions every tick:
1. Is the site *in a curtailment window*? Hysteresis on the raw MCI: a window opens once MCI
   has stayed < threshold for ``enter_dwell_s`` and closes only once it has stayed >=
   threshold for ``release_delay_s``; a signal flickering around the threshold therefore
   cannot make the federation oscillate. Forecast-confirmed early release: the window closes
   at once when MCI is above, the forecast agrees and sees no reopening within the
   provisioning delay, and the same forecast had predicted this very end (at the last tick
   below, it put the rise at or before the first tick above). Persistence never qualifies,
   so it keeps the hysteresis (``_early_release``).
2. Should the site be *provisioned*? Inside a window: yes (unless the forecast, agreeing with
   the present, says the window is too short to be worth the provisioning energy). Outside:
   yes if the forecast says a window worth having opens so soon that provisioning started at
   the next tick would not be ready by the window's first tick: as late as possible, so the
   site is ready AT the window start and idles exactly its boot (``_too_late_next_tick``).

Graceful degradation with a wrong forecast:
- a forecast that contradicts the present (says above while MCI is below) is ignored, so a
  real window is never skipped because of it: at worst the site is ready
  ``provision_delay`` after the window opens;
- a skip ("too short") is revoked as soon as the predicted window end has passed while MCI
  is still below the threshold;
- pre-provisioning for a predicted window that does not come is held for at most
  ``release_delay_s`` past the predicted opening (longer while the newest forecast still sees
  it open within the provisioning delay: forecasts err in timing), then dropped, and
  pre-provisioning stays off until a real window next opens.

Two equivalent implementations: ``Policy.step`` (one tick, per-site objects, with reasons —
used live by the ServerApp) and ``simulate_batch`` (numpy over sites x ticks, with the
provisioning model "ready ``delay`` after provisioning starts" — used by the what-if simulator
and bench/policy_scale.py). tests/test_policy.py checks that they agree decision by decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import StrEnum

import numpy as np

from pilot.config.sites import SitesConfig
from pilot.energy.forecast import Forecaster
from pilot.energy.traces import Trace


class Mode(StrEnum):
    PAUSE = "PAUSE"  # no site trains
    LOCAL = "LOCAL"  # one site trains alone
    FEDERATED = "FEDERATED"  # several sites train and average

    @staticmethod
    def of(n_train: int) -> Mode:
        return Mode.PAUSE if n_train == 0 else Mode.LOCAL if n_train == 1 else Mode.FEDERATED


@dataclass(frozen=True)
class PolicyConfig:
    name: str = "forecast"
    threshold: float = 100.0  # gCO2/kWh
    enter_dwell_s: float = 0.0
    release_delay_s: float = 600.0
    # useful (ready) window time worth a provisioning cycle. With pre-provisioning a window
    # costs exactly one boot (delay x idle_kw: 240 s, 0.03 kWh for the paper sites); 480 s =
    # twice the paper boot keeps the 8-15 min wind dips and skips the shorter ones, whose boots
    # would cost more provisioning energy than the prototype wastes (tests/test_simulate.py)
    min_window_s: float = 480.0
    horizon_s: float = 3600.0  # forecast look-ahead the policy asks for
    use_forecast: bool = True  # pre-provision and skip short windows from the forecast
    zero_delay: bool = False  # oracle: provisioning is instantaneous, train = in window
    # How long a site above the threshold stays provisioned: "cost" (ours: warm and idle
    # until its idle emissions in this excursion reach what a re-provisioning would cost,
    # ``Policy.hold_cost_g``) or "fixed" (``release_delay_s``)
    release: str = "cost"
    train_in_hold: bool = False  # the prototype trains on through its release delay
    lost_work_mci: float | None = None  # g/kWh pricing window time lost to a boot; None: thr


# Named policies: overrides applied on top of the site config's [policy] knobs.
PRESETS: dict[str, dict] = {
    # ours: hysteresis + forecast-aware pre-provisioning + short-window skipping
    "forecast": {},
    # the published prototype: provision as soon as MCI < threshold, release after 600 s
    # above it, no forecast
    "prototype": dict(
        enter_dwell_s=0.0,
        release_delay_s=600.0,
        min_window_s=0.0,
        use_forecast=False,
        release="fixed",
        train_in_hold=True,
    ),
    # lower bound: perfect foresight and zero provisioning delay -> train exactly while
    # MCI < threshold (no hysteresis needed: nothing is lost by switching)
    "oracle": dict(
        enter_dwell_s=0.0,
        release_delay_s=0.0,
        min_window_s=0.0,
        use_forecast=False,
        zero_delay=True,
        release="fixed",
    ),
}


@dataclass(frozen=True)
class Decision:
    provision: set[str]  # sites that should be (or become) provisioned now
    train: set[str]  # provisioned-and-ready sites that should train now
    mode: Mode
    reasons: dict[str, str]


@dataclass(frozen=True)
class Outlook:
    """What a forecast says, seen from ``now``."""

    now_value: float  # forecast at now (to check it agrees with the measured present)
    t_open: float  # first instant >= now with forecast < threshold (inf: none in horizon)
    t_close: float  # first instant > t_open with forecast >= threshold (inf: beyond horizon)
    t_up: float = math.inf  # first rise >= threshold after t_open, short blips not merged


def outlook(
    fc: list[tuple[float, float]], threshold: float, release_s: float = 0.0
) -> Outlook | None:
    """Crossing times of the linearly interpolated forecast; None for an empty forecast.

    A rise above the threshold that the forecast shows falling back below within
    ``release_s`` does not end the window (the hysteresis would hold it open anyway)."""
    if not fc:
        return None
    t_open = up = t_up = math.inf
    t_prev, v_prev = fc[0]
    if v_prev < threshold:
        t_open = t_prev
    for t, v in fc[1:]:
        if t_open == math.inf:
            if v_prev >= threshold > v:
                t_open = t_prev + (v_prev - threshold) / (v_prev - v) * (t - t_prev)
        elif up == math.inf:
            if v_prev < threshold <= v:
                up = t_prev + (threshold - v_prev) / (v - v_prev) * (t - t_prev)
                t_up = min(t_up, up)
        elif v_prev >= threshold > v:
            down = t_prev + (v_prev - threshold) / (v_prev - v) * (t - t_prev)
            if down - up >= release_s:
                break  # a long enough gap: the window really ends at ``up``
            up = math.inf  # a short blip above: the window goes on
        t_prev, v_prev = t, v
    return Outlook(fc[0][1], t_open, up, t_up)


# ----------------------------------------------------------------------------- step policy


@dataclass
class SiteState:
    in_window: bool = False
    below_since: float | None = None  # first tick of the current run below threshold
    above_since: float | None = None  # first tick of the current run at/above threshold
    entered_at: float | None = None
    provisioned: bool = False  # our previous provision decision
    hold: bool = False  # the plain hysteresis window (no early release): claims are made in it
    pred_close: float | None = None  # window end forecast at the last tick below the threshold
    pre_open: float | None = None  # predicted opening that triggered pre-provisioning
    missed: bool = False  # a predicted window did not come: no pre-provisioning until a real one
    skip_close: float | None = None  # predicted end of a window we skipped as too short
    idle_g: float = 0.0  # idle emissions of a warm hold in the current run above (g)


@dataclass
class Policy:
    cfg: PolicyConfig
    delays: dict[str, float]  # provisioning delay per site (s)
    idle_kw: dict[str, float] = field(default_factory=dict)  # needed by release "cost"
    train_kw: dict[str, float] = field(default_factory=dict)
    state: dict[str, SiteState] = field(default_factory=dict)
    last_now: float | None = None

    def delay(self, site: str) -> float:
        """Provisioning delay this policy plans with (0 for the oracle)."""
        return 0.0 if self.cfg.zero_delay else self.delays[site]

    def hold_cost_g(self, site: str) -> float:
        """What releasing a warm site costs if its window comes back: the boot again
        (``idle_kw`` for the delay) and the window's first ``delay`` seconds of training lost
        to it, both priced at ``lost_work_mci`` (the threshold: the most a window's energy
        costs). A warm site is released once its idle emissions in the excursion reach this
        (the ski-rental rule: never more than twice the cost of the better choice in
        hindsight, with no forecast). Paper sites (240 s, 0.468/2.024 kW, 100 g): 16.6 g,
        i.e. held 160 s through fossil MCI of 800 and 850 s through 150."""
        return hold_cost_g(
            self.delays[site], self.idle_kw[site], self.train_kw[site], self.lost_mci
        )

    @property
    def lost_mci(self) -> float:
        lost = self.cfg.lost_work_mci
        return self.cfg.threshold / 2 if lost is None else lost

    def step(
        self,
        now: float,
        mci: dict[str, float],
        forecast: dict[str, list[tuple[float, float]]] | None = None,
        ready: set[str] | None = None,
    ) -> Decision:
        """One tick. ``mci``: measured MCI per site now (sites missing from it are treated as
        not curtailed); ``forecast``: per-site [(t, mci)] from now; ``ready``: provisioned
        sites able to train now."""
        cfg, thr = self.cfg, self.cfg.threshold
        forecast, ready = forecast or {}, ready or set()
        dt = 0.0 if self.last_now is None else max(0.0, now - self.last_now)
        self.last_now = now
        provision: set[str] = set()
        train: set[str] = set()
        reasons: dict[str, str] = {}
        for site in self.delays:
            st = self.state.setdefault(site, SiteState())
            m = mci.get(site, math.inf)
            d = self.delay(site)
            ol = (
                outlook(forecast.get(site, []), thr, cfg.release_delay_s)
                if cfg.use_forecast
                else None
            )
            early = False
            # 1. hysteresis on the measured signal
            if m < thr:
                st.above_since = None
                st.below_since = now if st.below_since is None else st.below_since
                # what the forecast, agreeing with the present, says about this window's end
                st.pred_close = ol.t_up if ol is not None and ol.now_value < thr else math.inf
                if now - st.below_since >= cfg.enter_dwell_s:
                    st.hold = True
                    if not st.in_window:
                        st.in_window, st.entered_at = True, now
                        st.pre_open, st.missed, st.skip_close = None, False, None
            else:
                st.below_since = None
                if st.above_since is None:
                    st.above_since, st.idle_g = now, 0.0
                else:
                    st.idle_g += self.idle_kw.get(site, 0.0) * m * dt / 3600.0
                if self._released(site, st, now):
                    st.hold = st.in_window = False
                elif st.in_window and _early_release(ol, st, now, thr, cfg.release_delay_s, d):
                    st.in_window, early = False, True
            # 2. provisioning
            if st.in_window:
                why = (
                    f"in window (MCI {m:.0f} < {thr:g})"
                    if m < thr
                    else self._hold_why(site, st, now)
                )
                want, st.pre_open = True, None
                agrees = ol is not None and (ol.now_value < thr) == (m < thr)
                if not st.provisioned and agrees:
                    proven_wrong = st.skip_close is not None and now > st.skip_close and m < thr
                    if not proven_wrong and not _useful(ol, now, d, dt, cfg.min_window_s):
                        want = False
                        if st.skip_close is None:
                            st.skip_close = ol.t_close
                        why = (
                            f"skip: window predicted to end in {ol.t_close - now:.0f} s, "
                            f"< {cfg.min_window_s:.0f} s of ready time"
                            if m < thr
                            else "release hold, no window worth provisioning predicted"
                        )
            else:
                if (
                    st.pre_open is not None
                    and now > st.pre_open + cfg.release_delay_s
                    and not _still_coming(ol, now, thr, d)
                ):
                    st.pre_open, st.missed = None, True  # the predicted window did not come
                pre = ol is not None and not st.missed and _useful(ol, now, d, dt, cfg.min_window_s)
                if pre:
                    want = True
                    if st.pre_open is None:
                        st.pre_open = ol.t_open
                    why = f"pre-provision: window predicted in {ol.t_open - now:.0f} s (delay {d:.0f} s)"
                elif st.pre_open is not None and st.provisioned:
                    want = True
                    why = f"waiting for predicted window ({now - st.pre_open:.0f} s late)"
                else:
                    want, st.pre_open = False, None
                    why = (
                        "window over: the forecast, right about its end, sees no reopening "
                        f"within {max(cfg.release_delay_s, d):.0f} s"
                        if early
                        else f"no window (MCI {m:.0f} >= {thr:g})"
                        if not st.missed
                        else "no window (forecast missed, waiting for a real one)"
                    )
            st.provisioned = want
            if want:
                provision.add(site)
                trains = m < thr or cfg.train_in_hold
                if st.in_window and trains and (site in ready or cfg.zero_delay):
                    train.add(site)
                elif st.in_window and trains:
                    why += "; provisioning, not ready"
            reasons[site] = why
        return Decision(provision, train, Mode.of(len(train)), reasons)

    def _released(self, site: str, st: SiteState, now: float) -> bool:
        """The warm hold (or the prototype's release delay) above the threshold is over."""
        assert st.above_since is not None
        if self.cfg.release == "cost":
            return st.idle_g >= self.hold_cost_g(site)
        return now - st.above_since >= self.cfg.release_delay_s

    def _hold_why(self, site: str, st: SiteState, now: float) -> str:
        assert st.above_since is not None
        above = f"above {self.cfg.threshold:g} for {now - st.above_since:.0f}"
        if self.cfg.release == "cost":
            return f"warm: {above} s, idle {st.idle_g:.1f}/{self.hold_cost_g(site):.1f} g"
        return f"release hold: {above}/{self.cfg.release_delay_s:.0f} s"


def hold_cost_g(delay_s: float, idle_kw: float, train_kw: float, lost_mci: float) -> float:
    """Emissions (g) a re-provisioning costs: see ``Policy.hold_cost_g``."""
    return delay_s / 3600.0 * (idle_kw + train_kw) * lost_mci


def _too_late_next_tick(lead: float, delay: float, dt: float) -> bool:
    """Pre-provision now? The window opens ``lead`` s from now and is seen open (MCI strictly
    below) at the first tick after that, ``floor(lead / dt) + 1`` ticks ahead (ticks every
    ``dt`` s). Start now iff provisioning started at the next tick would not be ready by that
    tick: as late as possible, ready AT the window's first tick. ``dt`` 0 (first tick):
    ``lead <= delay``."""
    if dt <= 0.0 or lead > delay + dt:
        return lead <= delay
    return math.floor(lead / dt) * dt < delay


def _useful(ol: Outlook, now: float, delay: float, dt: float, min_window_s: float) -> bool:
    """Provisioning now is useful if a predicted window opens before provisioning started at
    the next tick could be ready for it, and it extends beyond the horizon or leaves at least
    ``min_window_s`` of ready time once provisioning (started now) has finished."""
    if not _too_late_next_tick(ol.t_open - now, delay, dt):
        return False
    return ol.t_close == math.inf or ol.t_close - max(now + delay, ol.t_open) >= min_window_s


def _still_coming(ol: Outlook | None, now: float, thr: float, delay: float) -> bool:
    """A late predicted window is still worth waiting for: the newest forecast, agreeing that
    it is not open yet, sees it open within the provisioning delay (forecasts err in timing;
    a site released now would not be back in time)."""
    return ol is not None and ol.now_value >= thr and ol.t_open - now <= delay


def _early_release(
    ol: Outlook | None, st: SiteState, now: float, thr: float, release_s: float, delay: float
) -> bool:
    """Leave a window now rather than after the release hold: MCI is above the threshold (the
    caller checks), the forecast agrees, and it predicts no reopening within the provisioning
    delay, so pre-provisioning can bring the site back ready for the next window (if worth it):
    one boot (idle_kw x delay) instead of training through the gap at train_kw above the
    threshold. Reopenings sooner than that are trained through (the hysteresis).

    Only a forecaster proven right on this very window may do so: its forecast at the last tick
    below the threshold must have put the window's end at or before the first tick above it. A
    persistence forecast never does (it holds "below"), nor one that saw the rise as a short
    blip, so a signal flickering around the threshold keeps the hysteresis."""
    return (
        ol is not None
        and st.hold
        and ol.now_value >= thr
        and ol.t_open - now > delay
        and st.pred_close is not None
        and st.above_since is not None
        and st.pred_close <= st.above_since + delay
    )


def policy_config(sites_config: SitesConfig, name: str | None = None) -> PolicyConfig:
    name = name or sites_config.policy
    if name not in PRESETS:
        raise ValueError(f"unknown policy {name!r}; use one of {', '.join(PRESETS)}")
    hold = sites_config.hold
    base = PolicyConfig(
        name=name,
        threshold=sites_config.threshold,
        enter_dwell_s=sites_config.enter_dwell_s,
        release_delay_s=sites_config.release_delay_s if hold == "cost" else float(hold),
        release="cost" if hold == "cost" else "fixed",
        lost_work_mci=sites_config.lost_work_mci,
        min_window_s=sites_config.min_window_s,
        horizon_s=sites_config.horizon_s,
    )
    return replace(base, **PRESETS[name])


def make_policy(name: str | None, sites_config: SitesConfig) -> Policy:
    cfg = policy_config(sites_config, name)
    sites = sites_config.sites
    return Policy(
        cfg,
        {s.name: s.provision_delay_s for s in sites},
        idle_kw={s.name: s.idle_kw for s in sites},
        train_kw={s.name: s.train_kw for s in sites},
    )


# ----------------------------------------------------------------------------- batch policy


@dataclass
class ForecastArrays:
    """Per (site, tick) outlook, the array form of ``outlook`` (NaN now_value: no forecast)."""

    now_value: np.ndarray  # (S, K)
    t_open: np.ndarray  # (S, K), inf = no window within the horizon
    t_close: np.ndarray  # (S, K), inf = beyond the horizon
    t_up: np.ndarray | None = None  # (S, K) Outlook.t_up; None: t_close


def forecast_arrays(
    fc: Forecaster,
    trace: Trace,
    regions: list[str],
    ticks: np.ndarray,
    horizon_s: float,
    threshold: float,
    release_s: float = 0.0,
    mci: np.ndarray | None = None,
) -> ForecastArrays:
    """``outlook(fc.forecast(region, t, horizon_s), threshold, release_s)`` for every site and
    tick, on arrays. ``mci`` (S, K): measured values (what persistence forecasts).

    Crossings live on the forecast's segments; "next crossing at or after segment j" tables are
    reverse running minima, so every (site, tick) query is a gather, not a Python loop."""
    S, K = len(regions), len(ticks)
    if fc.per_tick:
        return _outlook_arrays(fc, regions, ticks, horizon_s, threshold, release_s, mci)
    if fc.kind == "persistence":
        cur = trace.series_all(ticks, regions) if mci is None else mci
        t_open = np.where(cur < threshold, ticks[None, :], np.inf)
        return ForecastArrays(cur.copy(), t_open, np.full((S, K), np.inf), np.full((S, K), np.inf))
    g_times = trace.times + fc.shift_s
    avail = (ticks >= g_times[0]) & (ticks <= g_times[-1])
    out = ForecastArrays(*(np.full((S, K), v) for v in (np.nan, np.inf, np.inf, np.inf)))
    if not avail.any():
        return out
    tk = ticks[avail]
    h_end = np.minimum(tk + horizon_s, g_times[-1])
    # only the samples these ticks can see (bounded memory when the caller chunks)
    lo = min(max(0, int(np.searchsorted(g_times, tk[0], side="right")) - 1), len(g_times) - 2)
    hi = max(min(len(g_times), int(np.searchsorted(g_times, h_end[-1], side="left")) + 1), lo + 2)
    gt = g_times[lo:hi]
    g = trace.values[:, lo:hi][[trace.index(r) for r in regions]]  # (S, n), slice first
    n = gt.size
    big = n - 1  # "no such segment": a padding column of inf
    seg_dt = np.diff(gt)
    v0, v1 = g[:, :-1], g[:, 1:]
    pad = np.full((S, 1), np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        down = (v0 >= threshold) & (v1 < threshold)
        up = (v0 < threshold) & (v1 >= threshold)
        down_t = np.hstack(
            [np.where(down, gt[:-1] + (v0 - threshold) / (v0 - v1) * seg_dt, np.inf), pad]
        )
        up_t = np.hstack(
            [np.where(up, gt[:-1] + (threshold - v0) / (v1 - v0) * seg_dt, np.inf), pad]
        )
    idx = np.arange(n)

    def next_at_or_after(mask: np.ndarray) -> np.ndarray:
        return np.minimum.accumulate(np.where(mask, idx, big)[:, ::-1], axis=1)[:, ::-1]

    nd, nu = next_at_or_after(np.isfinite(down_t)), next_at_or_after(np.isfinite(up_t))
    # gap after each up crossing until the next down crossing; long gaps really end a window
    down_after = _take(down_t, nd[:, np.minimum(idx + 1, big)])
    with np.errstate(invalid="ignore"):  # inf - inf where there is no crossing
        nul = next_at_or_after(np.isfinite(up_t) & (down_after - up_t >= release_s))
    last_down = np.maximum.accumulate(np.where(np.isfinite(down_t), idx, -1), axis=1)

    seg = np.clip(np.searchsorted(gt, tk, side="right") - 1, 0, n - 2)[None, :]  # tick's segment
    w = (tk - gt[seg]) / seg_dt[seg]
    now_v = g[:, seg[0]] * (1.0 - w) + g[:, seg[0] + 1] * w
    below = now_v < threshold
    # open now, or at the next down crossing (one in the tick's own segment lies after it)
    j_down = nd[:, seg[0]]
    t_open = np.where(below, tk[None, :], _take(down_t, j_down))
    seg_open = np.where(below, seg, j_down)
    # the window ends at the first up crossing followed by a long gap, or by no down crossing
    # the forecast can see (none up to h_end: segments after the last down <= h_end)
    e = np.clip(np.searchsorted(gt, h_end, side="right") - 1, 0, n - 2)[None, :]
    down_e = down_t[:, e[0]] <= h_end[None, :]
    q = np.where(down_e, e, last_down[:, np.maximum(e[0] - 1, 0)])
    q = np.where((e == 0) & ~down_e, -1, q)
    first_up = _take(nu, seg_open)
    unseen = _take(nu, np.minimum(np.maximum(q + 1, seg_open), big))
    t_close = _take(up_t, np.minimum(_take(nul, first_up), unseen))
    t_open = np.where(t_open <= h_end[None, :], t_open, np.inf)
    t_close = np.where(np.isfinite(t_open) & (t_close <= h_end[None, :]), t_close, np.inf)
    t_up = _take(up_t, first_up)
    t_up = np.where(np.isfinite(t_open) & (t_up <= h_end[None, :]), t_up, np.inf)
    out.now_value[:, avail], out.t_open[:, avail], out.t_close[:, avail] = now_v, t_open, t_close
    out.t_up[:, avail] = t_up
    return out


def _outlook_arrays(
    fc: Forecaster,
    regions: list[str],
    ticks: np.ndarray,
    horizon_s: float,
    threshold: float,
    release_s: float,
    mci: np.ndarray | None,
) -> ForecastArrays:
    """``forecast_arrays`` one forecast at a time, through ``outlook`` itself (a forecast
    issued at each tick: ~20 us per site and tick)."""
    S, K = len(regions), len(ticks)
    out = ForecastArrays(*(np.full((S, K), v) for v in (np.nan, np.inf, np.inf, np.inf)))
    for i, region in enumerate(regions):
        for k, now in enumerate(ticks):
            cur = None if mci is None else float(mci[i, k])
            ol = outlook(fc.forecast(region, float(now), horizon_s, cur), threshold, release_s)
            if ol is not None:
                out.now_value[i, k], out.t_open[i, k] = ol.now_value, ol.t_open
                out.t_close[i, k], out.t_up[i, k] = ol.t_close, ol.t_up
    return out


def _take(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Row-wise gather: ``out[s, k] = a[s, idx[s, k]]``."""
    return np.take_along_axis(a, idx, axis=1)


@dataclass
class BatchState:
    """Per-site policy + provisioning state carried between ``simulate_batch`` chunks."""

    in_window: np.ndarray
    hold: np.ndarray  # plain hysteresis window (no early release)
    pred_close: np.ndarray  # window end forecast at the last tick below (NaN: none yet)
    below_since: np.ndarray
    above_since: np.ndarray
    provisioned: np.ndarray
    prov_since: np.ndarray  # when the current provisioning started (NaN: not provisioned)
    pre_open: np.ndarray
    missed: np.ndarray
    skip_close: np.ndarray
    idle_g: np.ndarray  # idle emissions of the current run above (SiteState.idle_g)
    last_now: float = math.nan

    @classmethod
    def new(cls, S: int) -> BatchState:
        nan = lambda: np.full(S, np.nan)  # noqa: E731
        false = lambda: np.zeros(S, dtype=bool)  # noqa: E731
        return cls(
            false(), false(), nan(), nan(), nan(), false(), nan(), nan(), false(), nan(), nan()
        )


@dataclass
class BatchResult:
    provision: np.ndarray  # (S, K) bool
    train: np.ndarray  # (S, K) bool
    ready: np.ndarray  # (S, K) bool, before the tick's decision
    state: BatchState

    @property
    def modes(self) -> np.ndarray:
        """(K,) number of training sites per tick: 0 PAUSE, 1 LOCAL, >=2 FEDERATED."""
        return self.train.sum(axis=0)


def _latch(set_: np.ndarray, reset: np.ndarray, init: np.ndarray) -> np.ndarray:
    """(K, S) set/reset latch: the state is that of the latest set or reset event (set wins a
    tie), ``init`` before the first one."""
    k_idx = np.arange(set_.shape[0])[:, None]
    ev_k = np.maximum.accumulate(np.where(set_ | reset, k_idx, -1), axis=0)
    return np.where(ev_k >= 0, np.take_along_axis(set_, np.maximum(ev_k, 0), axis=0), init[None, :])


def _hysteresis(
    cfg: PolicyConfig,
    ticks: np.ndarray,
    below: np.ndarray,
    st: BatchState,
    idle_rate: np.ndarray,
    hold_g: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Plain hysteresis for all (K ticks, S sites) at once: it depends on the measured signal
    only, so it needs no loop. ``idle_rate`` (K, S): idle grams since the previous tick.
    Returns (hold, enter_ok, leave_ok, below_since, above_since, idle_g): the window without
    early release, the ticks that open / close a window, and the warm hold's idle grams."""
    K, S = below.shape
    k_idx = np.arange(K)[:, None]
    fresh = np.isnan(st.below_since) & np.isnan(st.above_since)
    prev = np.vstack([~np.isnan(st.below_since)[None, :], below[:-1]])
    change = below != prev
    change[0] |= fresh
    start_k = np.maximum.accumulate(np.where(change, k_idx, -1), axis=0)
    carried = np.where(below[0], st.below_since, st.above_since)  # a run going on from before
    run_start = np.where(start_k >= 0, ticks[np.maximum(start_k, 0)], carried[None, :])
    bs = np.where(below, run_start, np.nan)
    ab = np.where(below, np.nan, run_start)
    # idle grams of the run above: 0 at its first tick, then the sum of each tick's interval
    csum = np.cumsum(idle_rate, axis=0)
    carried_g = np.nan_to_num(st.idle_g)[None, :] + csum
    idle_g = np.where(start_k >= 0, csum - _take(csum.T, np.maximum(start_k, 0).T).T, carried_g)
    idle_g = np.where(below, np.nan, idle_g)
    with np.errstate(invalid="ignore"):
        enter_ok = below & (ticks[:, None] - bs >= cfg.enter_dwell_s)
        if cfg.release == "cost":
            leave_ok = ~below & (idle_g >= hold_g[None, :])
        else:
            leave_ok = ~below & (ticks[:, None] - ab >= cfg.release_delay_s)
    return _latch(enter_ok, leave_ok, st.hold), enter_ok, leave_ok, bs, ab, idle_g


def simulate_batch(
    cfg: PolicyConfig,
    delays: np.ndarray,
    ticks: np.ndarray,
    mci: np.ndarray,
    fc: ForecastArrays | None = None,
    state: BatchState | None = None,
    *,
    idle_kw: np.ndarray | None = None,
    train_kw: np.ndarray | None = None,
) -> BatchResult:
    """``Policy.step`` over (S sites, K ticks) of arrays, with the provisioning model "ready
    once provisioned for ``delay`` s" (as seen at the start of each tick). Pass the returned
    ``state`` to the next call to process a long horizon in chunks. ``idle_kw``/``train_kw``
    (S,): the sites' power, needed by the "cost" release rule.

    Everything that does not depend on the provisioning feedback (hysteresis, forecast
    usefulness) is computed for the whole chunk at once on (K, S) arrays; the loop over ticks
    carries only the provisioning state."""
    S, K = mci.shape
    thr, rel = cfg.threshold, cfg.release_delay_s
    d = np.zeros(S) if cfg.zero_delay else np.asarray(delays, dtype=np.float64)
    st = state or BatchState.new(S)
    ticks = np.asarray(ticks, dtype=np.float64)
    below = np.ascontiguousarray(mci.T < thr)  # (K, S): one contiguous row per tick
    last0 = ticks[0] if math.isnan(st.last_now) else st.last_now
    dts = np.maximum(0.0, np.diff(ticks, prepend=last0))[:, None]
    if cfg.release == "cost":
        if idle_kw is None or train_kw is None:
            raise ValueError('release "cost" needs the sites\' idle_kw and train_kw')
        lost = thr / 2 if cfg.lost_work_mci is None else cfg.lost_work_mci
        hold_g = hold_cost_g(np.asarray(delays, dtype=np.float64), idle_kw, train_kw, lost)
        idle_rate = np.asarray(idle_kw)[None, :] * mci.T * dts / 3600.0
    else:
        hold_g, idle_rate = np.zeros(S), np.zeros((K, S))
    HOLD, enter_ok, leave_ok, BS, AB, IDLE_G = _hysteresis(cfg, ticks, below, st, idle_rate, hold_g)
    use_fc = fc is not None and cfg.use_forecast
    pred_close_end = st.pred_close
    if use_fc:
        fnow, t_open, t_close, t_up = (
            np.ascontiguousarray(a.T)
            for a in (
                fc.now_value,
                fc.t_open,
                fc.t_close,
                fc.t_close if fc.t_up is None else fc.t_up,
            )
        )
        has = ~np.isnan(fnow)
        lead = t_open - ticks[:, None]
        # early release (_early_release): the window end forecast at the last tick below ...
        with np.errstate(invalid="ignore"):
            pc = np.where(has & (fnow < thr), t_up, np.inf)
        k_idx = np.arange(K)[:, None]
        lb = np.maximum.accumulate(np.where(below, k_idx, -1), axis=0)
        pred_close = np.where(lb >= 0, _take(pc.T, np.maximum(lb, 0).T).T, st.pred_close[None, :])
        if K:
            pred_close_end = pred_close[-1]
        with np.errstate(invalid="ignore"):
            # ... at or before the first tick above, and no reopening within the hold
            early = HOLD & ~below & has & (fnow >= thr) & (lead > d) & (pred_close <= AB + d)
        INW = _latch(enter_ok, leave_ok | early, st.in_window)
        with np.errstate(invalid="ignore", divide="ignore"):
            # _too_late_next_tick: ready by the first tick at/after the opening
            late = np.where(dts > 0, np.floor(lead / dts) * dts < d, lead <= d)
            useful = late & (
                np.isinf(t_close)
                | (t_close - np.maximum(ticks[:, None] + d, t_open) >= cfg.min_window_s)
            )
            # inside a window a skip needs a forecast agreeing with the measured present
            # (below or above) that calls the (remaining or next) window not worth it
            skip_base = has & ((fnow < thr) == below) & ~useful
        pre_base = has & useful
        coming = has & (fnow >= thr) & (lead <= d)  # _still_coming
    else:
        INW = _latch(enter_ok, leave_ok, st.in_window)
        coming = np.zeros((K, S), dtype=bool)
    ENTER = INW & ~np.vstack([st.in_window[None, :], INW[:-1]])
    P = np.zeros((K, S), dtype=bool)
    T = np.zeros((K, S), dtype=bool)
    R = np.zeros((K, S), dtype=bool)
    prov, ps = st.provisioned, st.prov_since
    pre, missed, skc = st.pre_open, st.missed, st.skip_close
    errstate = np.seterr(invalid="ignore")  # NaN comparisons are intended: NaN = "not set"
    for k in range(K):
        now = float(ticks[k])
        inw, enter = INW[k], ENTER[k]
        out = ~inw
        ready = prov & (now - ps >= d)
        pre = np.where(enter, np.nan, pre)
        missed = missed & ~enter
        skc = np.where(enter, np.nan, skc)
        # a predicted window that did not come (and today's forecast no longer sees it soon)
        timeout = out & (now > pre + rel) & ~coming[k]
        missed = missed | timeout
        if use_fc:
            # skip until proven wrong (predicted end passed while still below)
            skip = inw & ~prov & skip_base[k] & ~((now > skc) & below[k])
            skc = np.where(skip & np.isnan(skc), t_close[k], skc)
            pre = np.where(timeout, np.nan, pre)
            want_pre = out & ~missed & pre_base[k]
            hold = out & ~want_pre & ~np.isnan(pre) & prov
            pre = np.where(want_pre & np.isnan(pre), t_open[k], pre)
            want = (inw & ~skip) | want_pre | hold
        else:
            want = inw
        pre = np.where(inw | ~want, np.nan, pre)
        ps = np.where(want, np.where(prov, ps, now), np.nan)
        prov = want
        P[k], R[k] = want, ready
        T[k] = want & inw & (ready | cfg.zero_delay) & (below[k] | cfg.train_in_hold)
    np.seterr(**errstate)
    last = float(ticks[-1]) if K else st.last_now
    if K:
        inw_end, hold_end, bs_end, ab_end = INW[-1], HOLD[-1], BS[-1], AB[-1]
        idle_end = IDLE_G[-1]
    else:
        inw_end, hold_end, bs_end, ab_end = st.in_window, st.hold, st.below_since, st.above_since
        idle_end = st.idle_g
    new = BatchState(
        inw_end,
        hold_end,
        pred_close_end,
        bs_end,
        ab_end,
        prov,
        ps,
        pre,
        missed,
        skc,
        idle_end,
        last,
    )
    return BatchResult(P.T, T.T, R.T, new)
