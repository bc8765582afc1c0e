"""Elastic, curtailment-aware, time-based rounds over the Flower Grid: the ServerApp's control
loop. One thread, our own push/pull over the Grid (never the blocking ``send_and_receive``).

Each tick is wiring between parts that own their state:

1. the latest per-site signals and forecasts from Redis go to the pure policy, which says
   which sites to provision and which to train (PAUSE / LOCAL / FEDERATED);
2. ``NodeDiscovery`` maps node ids to sites (QUERY messages) in the ``Fleet``, the one record
   per site; the provisioner starts and stops SuperNodes, a dead node is restarted within
   the fleet's restart budget;
3. the round scheduler (pilot.control.scheduler) plans leaves, joins, the deadline and the
   close; the ``RoundDriver`` carries the plans out over the Grid and takes replies in;
4. a closed round's average goes through the outer optimizer into the global model, the data
   ledger commits, and the ``ServerState`` is checkpointed as one thing.

Waiting never spins: with nothing in flight the loop blocks on the signals stream
(XREAD BLOCK); with messages in flight it polls the Grid every ``poll_s``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from nanochat.paths import atomic_write_text, resolve
from pilot.control.aggregate import transfer_dtype
from pilot.control.fleet import Fleet, RestartBudget
from pilot.control.run_config import RunConfig
from pilot.control.scheduler import plan_round, round_length, trainable
from pilot.control.validation import RoundValidation, Validation
from pilot.events.reader import load_events
from pilot.flower import setup
from pilot.flower.context import RunContext
from pilot.flower.nodes import NodeDiscovery
from pilot.flower.round_driver import RoundDriver
from pilot.infra.procs import RunStopped

log = logging.getLogger(__name__)

QUERY_RETRY_S = 5.0  # wall seconds before re-asking a node that failed a QUERY
IDLE_BLOCK_MS = 5000  # longest block on the signals stream with nothing in flight
# energy simulation meta status -> run end reason (pilot/energy/cosim.py)
SIM_ENDS = {"finished": "trace_end", "stopped": "trace_end", "failed": "energy_sim_failed"}


class ElasticStrategy:
    def __init__(self, grid: Any, cfg: RunConfig, signals: Any, provisioner: Any = None):
        from pilot.config.sites import load_sites
        from pilot.control.policy import make_policy
        from pilot.energy.carbon import Ledger
        from pilot.events.log import EventLog
        from pilot.infra.runlog import RunLog

        sites = load_sites(cfg.sites_file)
        self.policy = make_policy(cfg.policy, sites)
        clock, self.last_signal_id = setup.wait_clock(signals)
        self.carbon = Ledger()
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        events = EventLog(
            cfg.run_dir / "events.jsonl", self.clock_now, signals, observers=[self.carbon.observe]
        )
        budget = RestartBudget(
            cfg.node_restarts, cfg.node_restart_window_s, cfg.node_restart_backoff_s,
            cfg.node_failed_cooldown_s,
        )  # fmt: skip
        fleet = Fleet(query_retry_s=QUERY_RETRY_S, budget=budget)
        self.ctx = RunContext(
            cfg, sites, grid, signals, events, fleet, clock, transfer_dtype(cfg.transfer_dtype)
        )
        self.cfg, self.sig, self.events, self.fleet = cfg, signals, events, fleet
        self.runlog = RunLog(
            cfg.run_dir,
            cfg.wandb,
            cfg.wandb_project,
            cfg.name,
            {"preset": str(cfg.preset), **cfg.train},
        )
        self.provisioner = provisioner or setup.make_provisioner(
            cfg, sites, lambda sim_s: self.ctx.clock.to_wall(sim_s)
        )
        # the global model's val bpb after every aggregation, in a background thread
        data, tok = resolve(cfg.data_dir), resolve(cfg.tokenizer_dir)
        self.validation = RoundValidation(cfg.train, data, tok, events, self.runlog)
        self.nodes = NodeDiscovery(self.ctx)
        self.rounds = RoundDriver(self.ctx)
        self.last_mode: tuple | None = None  # (mode, train, provision) last emitted

    @property
    def state(self):
        return self.ctx.state

    def clock_now(self) -> float:
        return self.ctx.clock.sim_now()

    # -- start and end ------------------------------------------------------------------------
    def load_state(self) -> bool:
        """The checkpointed state (True) or a fresh one (False); ClientApps of the round that
        was in flight when an earlier server died stop now (its number is never reused)."""
        self.ctx.state, resumed = setup.load_state(self.cfg)
        if resumed:
            self.sig.end_round(self.ctx.state.round_n)
        return resumed

    def start(self) -> bool:
        """The run's state from its checkpoint (True) or fresh (False), its earlier
        incarnation's events replayed and its provisioned sites adopted; run_start emitted."""
        resumed = self.load_state()
        # An earlier incarnation of this run (killed, or died before its first checkpoint):
        # replaying its events rebuilds the carbon ledger up to the crash, including what
        # happened after the last checkpoint, and says which sites are still provisioned.
        if self.events.path.exists():
            for ev in load_events(self.events.path):
                self.carbon.observe(ev)
        sites = self.ctx.sites
        for site in sorted(set(self.carbon.open) & set(sites.names)):
            self.provisioner.start(site)  # adopts the running node, or restarts it
            self.fleet.provision(site)
        for site in sites.names:
            self.sig.clear_stop(site)
        meta, state = self.sig.meta(), self.ctx.server
        self.events.emit(
            "run_start",
            run=self.cfg.name,
            preset=str(self.cfg.preset),
            # the trace the energy simulation replays wins over the sites file's default
            trace=meta.get("trace") or (str(sites.trace) if sites.trace else None),
            sites=str(self.cfg.sites_file),
            threshold=sites.threshold,
            policy=self.policy.cfg.name,
            sim_start=meta.get("sim_start"),
            speedup=self.ctx.clock.speedup,
            resumed=resumed,
            round=state.round_n,
            global_step=state.global_step,
            outer=self.cfg.outer,
            transfer_dtype=self.cfg.transfer_dtype,
            update_dtype=self.cfg.update_dtype,
        )
        return resumed

    def run(self) -> str:
        self.start()
        reason = "error"
        try:
            while (end := self.end_reason()) is None or self.rounds.round is not None:
                self.tick()
            reason = end
        except RunStopped:  # flwr stop / SIGTERM: end the run properly, then let it go on
            reason = "stopped"
            raise
        finally:
            self.validation.close()  # the last round's bpb is recorded before run_end
            self.shutdown(reason)
        return reason

    def end_reason(self) -> str | None:
        state = self.ctx.server
        if state.ledger.exhausted:
            return "data"
        if state.global_step >= self.cfg.num_iterations:
            return "steps"
        return SIM_ENDS.get(self.sig.status() or "")

    def shutdown(self, reason: str) -> None:
        self.rounds.abort(f"run ended: {reason}")
        for site in sorted(self.fleet.provisioned):
            self._deprovision(site, f"run ended: {reason}")
        self.provisioner.close()
        state = self.ctx.server
        self.events.emit(
            "run_end",
            reason=reason,
            global_step=state.global_step,
            tokens=state.tokens,
            round=state.round_n,
        )
        atomic_write_text(self.cfg.run_dir / "ledger.json", json.dumps(self.carbon.to_dict()))
        self.events.export_csv()
        self.runlog.close()
        setup.write_report(self.cfg.run_dir)  # logs a failure, never raises

    # -- the tick -----------------------------------------------------------------------------
    def tick(self) -> None:
        self._refresh_clock()
        self.validation.poll()
        for site in self.nodes.poll():
            if self.rounds.pending(site):
                self.rounds.drop(site, "node disconnected")
        self._pull()
        self.rounds.serve_lease_requests()
        status = self.provisioner.status()
        decision = self._decide(self._ready(status))
        self._provision(decision, status)
        self._drive_round(decision)
        self._wait()

    def _refresh_clock(self) -> None:
        from pilot.energy.clock import Clock

        meta = self.sig.meta()
        if "speedup" in meta:
            self.ctx.clock = Clock.from_meta(meta)

    def _wait(self) -> None:
        busy = self.rounds.round is not None or self.fleet.waiting()
        block_ms = int(self.cfg.poll_s * 1000) if busy else IDLE_BLOCK_MS
        self.last_signal_id, _ = self.sig.wait_signals(self.last_signal_id, block_ms=block_ms)

    def _pull(self) -> None:
        awaited = self.rounds.awaited()
        ids = list(self.fleet.queries) + list(awaited)
        if not ids:
            return
        for msg in self.ctx.grid.pull_messages(ids):
            mid = msg.metadata.reply_to_message_id
            nid = self.fleet.answered(mid)
            if nid is not None:
                self.nodes.on_reply(nid, msg)
            elif mid in awaited and self.rounds.pending(awaited[mid]):
                self.rounds.on_reply(awaited[mid], msg)
        self.fleet.expire_queries(time.time())

    # -- policy and provisioning ---------------------------------------------------------------
    def _ready(self, status: dict[str, str]) -> set[str]:
        """Sites that can train (a provisioner reports "provisioning" until the site's modelled
        start-up delay has passed); provisioned sites that became ready are announced."""
        ready = self.fleet.ready(status)
        for site in self.fleet.newly_ready(ready):
            node = self.fleet.node(site)
            self.events.emit("provision_complete", site=site, node_id=node, **self.fleet.info(site))
        return ready

    def _decide(self, ready: set[str]):
        mci, forecast = {}, {}
        for s in self.ctx.sites.sites:
            st = self.sig.site(s.name)
            if st is not None and "mci" in st:
                mci[s.name] = float(st["mci"])
            forecast[s.name] = self.sig.forecast(s.name)
        decision = self.policy.step(self.clock_now(), mci, forecast, ready)
        key = (decision.mode, tuple(sorted(decision.train)), tuple(sorted(decision.provision)))
        if key != self.last_mode:
            self.last_mode = key
            self.events.emit(
                "mode",
                mode=str(decision.mode),
                train=sorted(decision.train),
                provision=sorted(decision.provision),
                reasons=decision.reasons,
            )
        return decision

    def _provision(self, decision, status: dict[str, str]) -> None:
        now, fleet = time.time(), self.fleet
        for site in sorted(fleet.provisioned):
            if status.get(site, "").startswith("failed") and not fleet.restarting(site):
                self._node_died(site, status[site], now)
        for site in fleet.restarts_due(now):
            self.provisioner.start(site)
        for site in sorted(decision.provision - fleet.provisioned):
            if not fleet.may_provision(site, now):
                continue  # cooling down after its restart budget was spent
            reason = decision.reasons.get(site, "")
            self.events.emit("provision_decided", site=site, reason=reason)
            self.sig.clear_stop(site)
            self.provisioner.start(site)
            fleet.provision(site)
            self.events.emit("provision_started", site=site, reason=reason)
        for site in sorted(fleet.provisioned - decision.provision):
            if fleet.leaving(site):
                continue
            reason = decision.reasons.get(site, "released")
            if self.rounds.pending(site):
                self.rounds.request_leave(site, reason)  # deprovisioned once its reply is in
            else:
                self._deprovision(site, reason)

    def _node_died(self, site: str, state: str, now: float) -> None:
        """The site's SuperNode died: its work in flight is dropped at once (no need to wait
        out the reply grace for a death we saw) and a new node is started when the restart
        budget allows; a crash loop that spent it releases the site for the cool-down."""
        restart_at = self.fleet.died(site, now)
        if restart_at is None:
            why = f"SuperNode of {site} {state}; restart budget spent, released for a cool-down"
        else:
            why = f"SuperNode of {site} {state}; restarting it in {restart_at - now:.0f} s"
        if self.rounds.pending(site):
            self.rounds.drop(site, why)
        else:
            self.events.emit("fault", error=why, site=site)
        # the dead node's id may linger on the Grid until its heartbeat expires: no more
        # work for it; the new node is mapped by its QUERY reply
        self.fleet.unmap(site)
        self.provisioner.stop(site, drain=False)
        if restart_at is None:
            self._deprovision(site, "failed: restart budget spent")

    def _deprovision(self, site: str, reason: str) -> None:
        self.provisioner.stop(site, drain=True)
        self.fleet.deprovision(site)
        self.sig.clear_stop(site)
        self.events.emit("deprovision", site=site, reason=reason)

    # -- rounds -------------------------------------------------------------------------------
    def _drive_round(self, decision) -> None:
        from pilot.control.policy import Mode

        rounds, fleet = self.rounds, self.fleet
        leaving = {s for s in fleet.records if fleet.leaving(s)}
        ready = trainable(decision.train, fleet.site_node, leaving)
        ending = self.end_reason() is not None
        if rounds.round is None:
            if ready and not ending:
                federated = decision.mode == Mode.FEDERATED
                length = round_length(federated, len(ready), rounds.timing())
                rounds.open(ready, length, str(Mode.of(len(ready))))
            return
        plan = plan_round(
            rounds.round, time.time(), decision.train, decision.provision, decision.reasons,
            ready, leaving, ending, rounds.timing(),
        )  # fmt: skip
        rounds.carry_out(plan)
        if rounds.settle():
            self.close_round()

    def close_round(self) -> None:
        r, loss, worked = self.rounds.close()
        state = self.ctx.server
        meta = {
            "run": self.cfg.name,
            "train_config": self.cfg.train,
            "carbon_ledger": self.carbon.to_dict(),
        }
        state.save(self.cfg.run_dir / "checkpoint", meta)
        atomic_write_text(self.cfg.run_dir / "ledger.json", json.dumps(self.carbon.to_dict()))
        now = self.clock_now()
        row = {
            "round": r.n,
            "t": now,
            "global_step": state.global_step,
            "tokens": state.tokens,
            "loss": loss,  # round-mean train loss (work-weighted), not the global model's
            "sites": len(r.replies),
            "committed_rows": state.ledger.committed_rows,
            "cropped_tokens": sum(rep.cropped for rep in r.replies.values()),
        }
        job = Validation(r.n, now, state.global_step, state.tokens, row)
        self.validation.after_round(job, state.model.weights if worked else None)
