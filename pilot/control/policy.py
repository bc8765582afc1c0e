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

Two equivalent implementations: ``Policy.step`` here (one tick, per-site objects, with
reasons — used live by the ServerApp) and ``pilot.control.batch.simulate_batch`` (numpy over
sites x ticks — used by the what-if simulator and bench/policy_scale.py). tests/test_policy.py
checks that they agree decision by decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import StrEnum

from pilot.config.sites import SitesConfig
from pilot.control.outlook import Outlook, outlook


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

    @property
    def lost_mci(self) -> float:
        """The MCI (g/kWh) that prices a boot and the window time lost to it."""
        return self.threshold / 2 if self.lost_work_mci is None else self.lost_work_mci


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


@dataclass
class SiteMemory:
    """What the policy carries for one site from one tick to the next."""

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
    state: dict[str, SiteMemory] = field(default_factory=dict)
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
            self.delays[site], self.idle_kw[site], self.train_kw[site], self.cfg.lost_mci
        )

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
            st = self.state.setdefault(site, SiteMemory())
            m = mci.get(site, math.inf)
            ol = (
                outlook(forecast.get(site, []), thr, cfg.release_delay_s)
                if cfg.use_forecast
                else None
            )
            early = self._track_window(site, st, now, m, ol, dt)
            if st.in_window:
                want, why = self._in_window(site, st, now, m, ol, dt)
            else:
                want, why = self._out_of_window(site, st, now, m, ol, dt, early)
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

    def _track_window(
        self, site: str, st: SiteMemory, now: float, m: float, ol: Outlook | None, dt: float
    ) -> bool:
        """Question 1, the hysteresis on the measured MCI ``m``: opens and closes ``st``'s
        window. Returns whether it closed early, on the forecast's word (``_early_release``)."""
        cfg, thr, d = self.cfg, self.cfg.threshold, self.delay(site)
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
            return False
        st.below_since = None
        if st.above_since is None:
            st.above_since, st.idle_g = now, 0.0
        else:
            st.idle_g += self.idle_kw.get(site, 0.0) * m * dt / 3600.0
        if self._released(site, st, now):
            st.hold = st.in_window = False
        elif st.in_window and _early_release(ol, st, now, thr, cfg.release_delay_s, d):
            st.in_window = False
            return True
        return False

    def _in_window(
        self, site: str, st: SiteMemory, now: float, m: float, ol: Outlook | None, dt: float
    ) -> tuple[bool, str]:
        """Question 2 inside a window: (provision?, why). Yes, unless the forecast, agreeing
        with the present, calls the window too short, and only until proven wrong."""
        cfg, thr = self.cfg, self.cfg.threshold
        why = f"in window (MCI {m:.0f} < {thr:g})" if m < thr else self._hold_why(site, st, now)
        st.pre_open = None
        agrees = ol is not None and (ol.now_value < thr) == (m < thr)
        if st.provisioned or not agrees:
            return True, why
        proven_wrong = st.skip_close is not None and now > st.skip_close and m < thr
        if proven_wrong or _useful(ol, now, self.delay(site), dt, cfg.min_window_s):
            return True, why
        if st.skip_close is None:
            st.skip_close = ol.t_close
        if m >= thr:
            return False, "release hold, no window worth provisioning predicted"
        return False, (
            f"skip: window predicted to end in {ol.t_close - now:.0f} s, "
            f"< {cfg.min_window_s:.0f} s of ready time"
        )

    def _out_of_window(
        self,
        site: str,
        st: SiteMemory,
        now: float,
        m: float,
        ol: Outlook | None,
        dt: float,
        early: bool,
    ) -> tuple[bool, str]:
        """Question 2 outside a window: (provision?, why). Pre-provision for a predicted
        window worth having; hold that for a late one, then give up on it (``missed``)."""
        cfg, thr, d = self.cfg, self.cfg.threshold, self.delay(site)
        if (
            st.pre_open is not None
            and now > st.pre_open + cfg.release_delay_s
            and not _still_coming(ol, now, thr, d)
        ):
            st.pre_open, st.missed = None, True  # the predicted window did not come
        if ol is not None and not st.missed and _useful(ol, now, d, dt, cfg.min_window_s):
            if st.pre_open is None:
                st.pre_open = ol.t_open
            return (
                True,
                f"pre-provision: window predicted in {ol.t_open - now:.0f} s (delay {d:.0f} s)",
            )
        if st.pre_open is not None and st.provisioned:
            return True, f"waiting for predicted window ({now - st.pre_open:.0f} s late)"
        st.pre_open = None
        if early:
            return False, (
                "window over: the forecast, right about its end, sees no reopening "
                f"within {max(cfg.release_delay_s, d):.0f} s"
            )
        if st.missed:
            return False, "no window (forecast missed, waiting for a real one)"
        return False, f"no window (MCI {m:.0f} >= {thr:g})"

    def _released(self, site: str, st: SiteMemory, now: float) -> bool:
        """The warm hold (or the prototype's release delay) above the threshold is over."""
        assert st.above_since is not None
        if self.cfg.release == "cost":
            return st.idle_g >= self.hold_cost_g(site)
        return now - st.above_since >= self.cfg.release_delay_s

    def _hold_why(self, site: str, st: SiteMemory, now: float) -> str:
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
    ol: Outlook | None, st: SiteMemory, now: float, thr: float, release_s: float, delay: float
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
