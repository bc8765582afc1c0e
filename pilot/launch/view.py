"""Live progress of a launched run, read from Redis only (the energy simulation's signals and
the ServerApp's events), so it shows what the system itself recorded.

On a terminal it is a `rich` table refreshed in place; elsewhere (CI, pipes, `--no-live`) it
prints one line per event plus a status line now and then, which keeps logs readable.

Per-site state (ViewState) is folded from the events stream (schema in pilot/events/schema.py).
Energy and emissions so far come from pilot.energy.carbon over the events seen, with the rounds still
running counted as training up to the current simulated time.
"""

from __future__ import annotations

import time
from collections import deque
from enum import StrEnum
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pilot.events.log import NOTABLE, describe, hhmm, num


class ViewState(StrEnum):
    """A site as the view shows it, from the events recorded so far and its grid's signal. Not
    pilot.control.fleet.SiteState: that is the control loop's own bookkeeping (ready, leaving,
    failed), which the events do not spell out."""

    TRAINING = "training"  # round_start / join .. leave, round_end or deprovision
    PROVISIONING = "provisioning"  # provision_started .. provision_complete
    IDLE = "idle"  # provisioned and ready, not training
    WARM = "warm"  # left its round warm: still provisioned, idle
    CURTAILED = "curtailed"  # off, but its grid is in a curtailment window right now
    OFF = "off"  # none of the above (or deprovisioned)


STATE_STYLE = {
    ViewState.TRAINING: "bold green",
    ViewState.PROVISIONING: "yellow",
    ViewState.IDLE: "cyan",
    ViewState.CURTAILED: "magenta",
    ViewState.OFF: "dim",
}
MODE_STYLE = {"PAUSE": "dim", "LOCAL": "yellow", "FEDERATED": "bold green"}
CARBON_EVERY_S = 2.0  # recomputing energy/emissions is cheap, but not every 0.5 s refresh
STATUS_EVERY_S = 30.0  # plain mode: a status line this often


class RunState:
    """What the live view shows, folded from events and signals (no rendering here)."""

    def __init__(self, trace: Any = None, sites_config: Any = None):
        self.trace, self.sites_config = trace, sites_config
        self.sites: list[str] = [s.name for s in sites_config.sites] if sites_config else []
        self.state: dict[str, ViewState] = dict.fromkeys(self.sites, ViewState.OFF)
        self.train_since: dict[str, float] = {}
        self.signal: dict[str, dict] = {}
        self.last_log: dict[str, dict] = {}
        self.mode = "PAUSE"
        self.round: int | None = None
        self.global_step: int | None = None
        self.loss: float | None = None  # round-mean train loss of the last aggregate
        self.val_bpb: float | None = None  # the global model's, from the last validation
        self.tokens = 0
        self.sim_now: float | None = None
        self.speedup: float | None = None
        self.joins = self.leaves = 0
        self.modes_seen: set[str] = set()
        self.recent: deque[str] = deque(maxlen=6)
        self.energy_kwh = self.emissions_kg = 0.0
        self._carbon_at = 0.0
        from pilot.energy.carbon import Ledger

        self.ledger = Ledger()

    def _site(self, s: str) -> None:
        if s not in self.state:
            self.sites.append(s)
            self.state[s] = ViewState.OFF

    def observe(self, ev: dict) -> None:
        kind, site, t = ev.get("kind"), ev.get("site"), float(ev.get("t", 0.0))
        self.ledger.observe(ev)
        if site:
            self._site(str(site))
        if kind == "mode":
            self.mode = str(ev.get("mode", self.mode))
            self.modes_seen.add(self.mode)
        elif kind == "provision_started" and site:
            self.state[site] = ViewState.PROVISIONING
        elif kind == "provision_complete" and site:
            self.state[site] = ViewState.IDLE
        elif kind == "round_start":
            self.round = int(ev.get("round", self.round or 0))
            for s in ev.get("sites", []):
                self._site(s)
                self.state[s], self.train_since[s] = ViewState.TRAINING, t
        elif kind == "join" and site:
            self.joins += 1
            self.state[site], self.train_since[site] = ViewState.TRAINING, t
        elif kind == "leave" and site:
            self.leaves += 1
            self._stop_training(site, ViewState.WARM if ev.get("warm") else ViewState.IDLE)
        elif kind == "round_end":
            for s in ev.get("sites", []):
                self._stop_training(s, ViewState.IDLE)
        elif kind == "deprovision" and site:
            self._stop_training(site, ViewState.OFF)
        elif kind == "validation":
            self.val_bpb = ev.get("bpb", self.val_bpb)
        elif kind == "aggregate":
            self.global_step = ev.get("global_step", self.global_step)
            self.loss = ev.get("loss", self.loss)
            self.tokens += int(ev.get("tokens") or 0)
        if kind in NOTABLE:
            self.recent.append(describe(ev))

    def _stop_training(self, site: str, new: ViewState) -> None:
        self.train_since.pop(site, None)
        if site in self.state and (self.state[site] is ViewState.TRAINING or new is ViewState.OFF):
            self.state[site] = new

    def update_signals(self, meta: dict, sites: dict[str, dict]) -> None:
        if meta.get("sim_time") is not None:
            self.sim_now = float(meta["sim_time"])
        if meta.get("speedup") is not None:
            self.speedup = float(meta["speedup"])
        for s, sig in sites.items():
            self._site(s)
            self.signal[s] = sig

    def shown_state(self, site: str) -> ViewState:
        st = self.state.get(site, ViewState.OFF)
        if st is ViewState.OFF and self.signal.get(site, {}).get("curtailed"):
            return ViewState.CURTAILED
        return st

    def update_carbon(self, force: bool = False) -> None:
        """Energy/emissions up to now, with running rounds counted as training so far."""
        if self.trace is None or self.sites_config is None or self.sim_now is None:
            return
        if not force and time.monotonic() - self._carbon_at < CARBON_EVERY_S:
            return
        self._carbon_at = time.monotonic()
        from pilot.energy.accounting import Interval, integrate, mci_fn, site_pieces

        now = self.sim_now
        ivs = self.ledger.intervals(end=max(now, self.ledger.last_t or now))
        energy = emissions = 0.0
        for site in self.sites_config.sites:
            mine = [iv for iv in ivs if iv.site == site.name]
            since = self.train_since.get(site.name)
            if since is not None and now > since:
                # site_pieces normalizes: this span wins over the provisioned (idle) one.
                mine.append(Interval(site.name, since, now, "train"))
            if not mine:
                continue
            try:
                r = integrate(
                    site_pieces(mine, site, self.ledger.measured),
                    mci_fn(self.trace, site.region),
                    self.sites_config.threshold,
                    60.0,
                )
            except ValueError:  # a span past the trace end: keep the last good numbers
                return
            energy += r.energy_kwh
            emissions += r.emissions_kg
        self.energy_kwh, self.emissions_kg = energy, emissions


def _float_or_str(v: str) -> float | str:
    try:
        return float(v)
    except ValueError:
        return v


class LiveView:
    """Context manager around a rich Live (or plain lines) fed from a pilot.infra.signals.Signals."""

    def __init__(
        self,
        run_name: str,
        live: bool = True,
        trace: Any = None,
        sites_config: Any = None,
        console: Console | None = None,
    ):
        self.run_name = run_name
        self.live_mode = live
        self.console = console or Console(highlight=False)
        self.state = RunState(trace, sites_config)
        self.signals: Any = None
        self.phase_text = "starting"
        self._live: Live | None = None
        self._last_id: str | None = None
        self._status_at = time.monotonic()

    # lifecycle

    def __enter__(self) -> LiveView:
        if self.live_mode:
            self._live = Live(
                self.render(), console=self.console, refresh_per_second=2, transient=False
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(self.render())
            self._live.__exit__(*exc)
            self._live = None

    def attach(self, signals: Any) -> None:
        self.signals = signals

    def detach(self) -> None:
        """Read Redis one last time, then never again (it is about to stop)."""
        self.refresh()
        self.signals = None

    # output

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)  # logs: one line per message

    def phase(self, text: str) -> None:
        self.phase_text = text
        if self._live is None:
            self.say(f"· {text}")
        self.refresh()

    def refresh(self) -> None:
        """Pull new events/signals from Redis and redraw (or print new event lines)."""
        if self.signals is not None:
            try:
                self._pull()
            except Exception as e:  # noqa: BLE001 - a view must never take the run down
                self.state.recent.append(f"(live view: cannot read Redis: {type(e).__name__})")
        self.state.update_carbon()
        if self._live is not None:
            self._live.update(self.render())
        elif time.monotonic() - self._status_at > STATUS_EVERY_S:
            self._status_at = time.monotonic()
            self.say(self.status_line())

    def _pull(self) -> None:
        sig = self.signals
        # "(id" makes the range exclusive: only entries after the last one seen.
        since = f"({self._last_id}" if self._last_id else "-"
        for ev in sig.events(since=since):
            self._last_id = ev.pop("id")
            self.state.observe(ev)
            if self._live is None and ev.get("kind") in NOTABLE:
                self.say(describe(ev))
        meta = sig.meta() or {}
        names = self.state.sites or list(meta.get("sites", []))
        self.state.update_signals(meta, {s: sig.site(s) or {} for s in names})
        for s in names:
            # Only the newest step is shown: read one entry from the end of the stream.
            newest = sig.r.xrevrange(sig.key(f"logs:{s}"), count=1)
            if newest:
                self.state.last_log[s] = {k: _float_or_str(v) for k, v in newest[0][1].items()}

    def status_line(self) -> str:
        st = self.state
        sites = " ".join(self._site_status(s) for s in st.sites)
        return (
            f"[{hhmm(st.sim_now)}] {st.mode} round {st.round if st.round is not None else '-'}"
            f" step {st.global_step if st.global_step is not None else '-'}"
            f" round-mean train loss {num(st.loss, '.3f')} val bpb {num(st.val_bpb, '.4f')}"
            f" tokens {st.tokens:,}"
            f" energy {st.energy_kwh:.2f} kWh CO2 {st.emissions_kg:.3f} kg | {sites}"
        )

    def _site_status(self, site: str) -> str:
        """`texas:training(step 37 loss 5.210)`: a training site's newest step from its log
        stream, so plain output shows progress inside a long round, not only at its end."""
        shown = self.state.shown_state(site)
        log = self.state.last_log.get(site, {})
        if shown is not ViewState.TRAINING or "step" not in log:
            return f"{site}:{shown}"
        return f"{site}:training(step {num(log['step'], '.0f')} loss {num(log.get('loss'), '.3f')})"

    def render(self) -> Group:
        st = self.state
        head = Text.assemble(
            (f"curtail-llm · {self.run_name}", "bold"),
            "  ",
            (self.phase_text, "italic"),
            "  sim ",
            (hhmm(st.sim_now), "bold"),
            f" ({num(st.speedup, 'g')}x)  mode ",
            (st.mode, MODE_STYLE.get(st.mode, "")),
        )
        totals = Text(
            f"round {st.round if st.round is not None else '-'} · "
            f"global step {st.global_step if st.global_step is not None else '-'} · "
            f"round-mean train loss {num(st.loss, '.3f')} · "
            f"val bpb {num(st.val_bpb, '.4f')} · tokens {st.tokens:,} · "
            f"energy {st.energy_kwh:.2f} kWh · emissions {st.emissions_kg:.3f} kg CO2 · "
            f"joins {st.joins} leaves {st.leaves}"
        )
        tab = Table(expand=False, pad_edge=False)
        for col, just in (
            ("site", "left"),
            ("state", "left"),
            ("MCI g/kWh", "right"),
            ("window", "center"),
            ("step", "right"),
            ("loss", "right"),
            ("tok/s", "right"),
        ):
            tab.add_column(col, justify=just)
        for s in st.sites:
            sig, log = st.signal.get(s, {}), st.last_log.get(s, {})
            shown = st.shown_state(s)
            curtailed = bool(sig.get("curtailed"))
            tab.add_row(
                s,
                Text(shown, STATE_STYLE.get(shown, "")),
                num(sig.get("mci"), ".0f"),
                "yes" if curtailed else "no" if sig else "-",
                str(log.get("step", "-")),
                num(log.get("loss"), ".3f"),
                num(log.get("tok_s", log.get("tokens_per_s")), ".0f"),
            )
        recent = Text("\n".join(st.recent) or "(no events yet)", style="dim")
        return Group(head, totals, tab, recent)
