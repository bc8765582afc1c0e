"""The curtailment policy over a whole trace at once: numpy over (sites x ticks).

``simulate_batch`` makes ``Policy.step``'s decisions (pilot.control.policy), tick for tick,
with the provisioning model "ready ``delay`` after provisioning starts"; the what-if simulator
and bench/policy_scale.py run it, and tests/test_policy.py checks that it agrees with the step
policy decision by decision. The hysteresis and what the forecasts say depend on the measured
signal only, so they are computed for all ticks at once on (K, S) arrays; only the
provisioning state, which feeds back into the next tick, is carried by a loop over ticks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from pilot.control.outlook import ForecastArrays
from pilot.control.policy import PolicyConfig, hold_cost_g


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
    idle_g: np.ndarray  # idle emissions of the current run above (SiteMemory.idle_g)
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


@dataclass(frozen=True)
class _Foresight:
    """What the forecasts say at every (tick, site), as (K, S) arrays: the parts of the
    decision that do not depend on the provisioning state."""

    t_open: np.ndarray
    t_close: np.ndarray
    pred_close: np.ndarray  # window end forecast at the latest tick below (_early_release)
    early: np.ndarray  # the window closes now (_early_release)
    pre_base: np.ndarray  # a window worth pre-provisioning for is due (_useful)
    skip_base: np.ndarray  # the forecast, agreeing with the present, calls the window not worth it
    coming: np.ndarray  # a late predicted window is still due (_still_coming)


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
    (S,): the sites' power, needed by the "cost" release rule."""
    S = mci.shape[0]
    d = np.zeros(S) if cfg.zero_delay else np.asarray(delays, dtype=np.float64)
    st = state or BatchState.new(S)
    ticks = np.asarray(ticks, dtype=np.float64)
    below = np.ascontiguousarray(mci.T < cfg.threshold)  # (K, S): one contiguous row per tick
    last0 = ticks[0] if math.isnan(st.last_now) else st.last_now
    dts = np.maximum(0.0, np.diff(ticks, prepend=last0))[:, None]
    hold_g, idle_rate = _hold_costs(cfg, delays, mci, dts, idle_kw, train_kw)
    hold, enter_ok, leave_ok, bs, ab, idle_g = _hysteresis(cfg, ticks, below, st, idle_rate, hold_g)
    ahead = None
    if fc is not None and cfg.use_forecast:
        ahead = _foresight(cfg, fc, ticks, below, dts, d, st.pred_close, hold, ab)
        leave_ok = leave_ok | ahead.early
    inw = _latch(enter_ok, leave_ok, st.in_window)
    enter = inw & ~np.vstack([st.in_window[None, :], inw[:-1]])
    P, T, R, carried = _provision(cfg, ticks, d, below, inw, enter, ahead, st)
    new = replace(
        st,
        **carried,
        in_window=inw[-1],
        hold=hold[-1],
        pred_close=st.pred_close if ahead is None else ahead.pred_close[-1],
        below_since=bs[-1],
        above_since=ab[-1],
        idle_g=idle_g[-1],
        last_now=float(ticks[-1]),
    )
    return BatchResult(P.T, T.T, R.T, new)


def _hold_costs(
    cfg: PolicyConfig,
    delays: np.ndarray,
    mci: np.ndarray,
    dts: np.ndarray,
    idle_kw: np.ndarray | None,
    train_kw: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(S,) grams a warm hold may burn before its release (``Policy.hold_cost_g``) and (K, S)
    idle grams since the previous tick; zeros unless the release rule is "cost"."""
    S, K = mci.shape
    if cfg.release != "cost":
        return np.zeros(S), np.zeros((K, S))
    if idle_kw is None or train_kw is None:
        raise ValueError('release "cost" needs the sites\' idle_kw and train_kw')
    hold_g = hold_cost_g(np.asarray(delays, dtype=np.float64), idle_kw, train_kw, cfg.lost_mci)
    return hold_g, np.asarray(idle_kw)[None, :] * mci.T * dts / 3600.0


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
    run_g = csum - np.take_along_axis(csum, np.maximum(start_k, 0), axis=0)
    idle_g = np.where(below, np.nan, np.where(start_k >= 0, run_g, carried_g))
    with np.errstate(invalid="ignore"):
        enter_ok = below & (ticks[:, None] - bs >= cfg.enter_dwell_s)
        if cfg.release == "cost":
            leave_ok = ~below & (idle_g >= hold_g[None, :])
        else:
            leave_ok = ~below & (ticks[:, None] - ab >= cfg.release_delay_s)
    return _latch(enter_ok, leave_ok, st.hold), enter_ok, leave_ok, bs, ab, idle_g


def _foresight(
    cfg: PolicyConfig,
    fc: ForecastArrays,
    ticks: np.ndarray,
    below: np.ndarray,
    dts: np.ndarray,
    d: np.ndarray,
    pred_close0: np.ndarray,
    hold: np.ndarray,
    above_since: np.ndarray,
) -> _Foresight:
    """The forecast-based parts of ``Policy.step`` for all (K ticks, S sites) at once.
    ``pred_close0``: the carried window end forecast; ``hold``, ``above_since``: from
    ``_hysteresis``."""
    thr = cfg.threshold
    fnow, t_open, t_close, t_up = (
        np.ascontiguousarray(a.T)
        for a in (fc.now_value, fc.t_open, fc.t_close, fc.t_close if fc.t_up is None else fc.t_up)
    )
    has = ~np.isnan(fnow)
    lead = t_open - ticks[:, None]
    # early release (_early_release): the window end forecast at the last tick below ...
    with np.errstate(invalid="ignore"):
        pc = np.where(has & (fnow < thr), t_up, np.inf)
    k_idx = np.arange(below.shape[0])[:, None]
    lb = np.maximum.accumulate(np.where(below, k_idx, -1), axis=0)
    last_pc = np.take_along_axis(pc, np.maximum(lb, 0), axis=0)
    pred_close = np.where(lb >= 0, last_pc, pred_close0[None, :])
    with np.errstate(invalid="ignore"):
        # ... at or before the first tick above, and no reopening within the hold
        early = hold & ~below & has & (fnow >= thr) & (lead > d) & (pred_close <= above_since + d)
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
    coming = has & (fnow >= thr) & (lead <= d)  # _still_coming
    return _Foresight(t_open, t_close, pred_close, early, has & useful, skip_base, coming)


def _provision(
    cfg: PolicyConfig,
    ticks: np.ndarray,
    d: np.ndarray,
    below: np.ndarray,
    inw: np.ndarray,
    enter: np.ndarray,
    ahead: _Foresight | None,
    st: BatchState,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The provisioning decisions, tick by tick: the one part that feeds back (readiness, skips
    and pre-provisioning depend on what is provisioned). ``inw``/``enter`` (K, S): in a window,
    and the ticks that open one. Returns (provision, train, ready) (K, S) and the carried
    provisioning fields of the ``BatchState``."""
    K, S = below.shape
    P = np.zeros((K, S), dtype=bool)
    T = np.zeros((K, S), dtype=bool)
    R = np.zeros((K, S), dtype=bool)
    prov, ps = st.provisioned, st.prov_since
    pre, missed, skc = st.pre_open, st.missed, st.skip_close
    with np.errstate(invalid="ignore"):  # NaN comparisons are intended: NaN = "not set"
        for k in range(K):
            now = float(ticks[k])
            out = ~inw[k]
            ready = prov & (now - ps >= d)
            pre = np.where(enter[k], np.nan, pre)
            missed = missed & ~enter[k]
            skc = np.where(enter[k], np.nan, skc)
            # a predicted window that did not come (and today's forecast no longer sees it soon)
            timeout = out & (now > pre + cfg.release_delay_s)
            if ahead is not None:
                timeout &= ~ahead.coming[k]
            missed = missed | timeout
            if ahead is not None:
                # skip until proven wrong (predicted end passed while still below)
                skip = inw[k] & ~prov & ahead.skip_base[k] & ~((now > skc) & below[k])
                skc = np.where(skip & np.isnan(skc), ahead.t_close[k], skc)
                pre = np.where(timeout, np.nan, pre)
                want_pre = out & ~missed & ahead.pre_base[k]
                hold = out & ~want_pre & ~np.isnan(pre) & prov
                pre = np.where(want_pre & np.isnan(pre), ahead.t_open[k], pre)
                want = (inw[k] & ~skip) | want_pre | hold
            else:
                want = inw[k]
            pre = np.where(inw[k] | ~want, np.nan, pre)
            ps = np.where(want, np.where(prov, ps, now), np.nan)
            prov = want
            P[k], R[k] = want, ready
            T[k] = want & inw[k] & (ready | cfg.zero_delay) & (below[k] | cfg.train_in_hold)
    carried = dict(provisioned=prov, prov_since=ps, pre_open=pre, missed=missed, skip_close=skc)
    return P, T, R, carried
