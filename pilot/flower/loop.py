"""Elastic, curtailment-aware, time-based rounds over the Flower Grid (the ServerApp's logic).

One control loop, one thread, our own push/pull over the Grid (never the blocking
``send_and_receive``):

1. read the latest per-site signals and forecasts from Redis and ask the pure policy which
   sites to provision and which to train (PAUSE / LOCAL / FEDERATED);
2. drive the provisioner (start/stop SuperNodes); map node ids to sites with QUERY messages,
   refreshed whenever a new node id appears;
3. rounds are time-based in simulated seconds: a LOCAL round lasts ``round_max_s`` (so a
   checkpoint exists even when one site trains alone), a FEDERATED one ``round_min_s``; a
   site that becomes ready mid-round gets the current global model at once with the
   remaining deadline, and a join that turns a LOCAL round FEDERATED shortens it (the
   ``round:<n>:end`` key stops the sites already training);
4. a site that must leave gets ``stop:<site>``, returns its partial work (which counts), and
   only then is deprovisioned; a node that dies, errors or stays silent past
   ``reply_grace_s`` is dropped and its data lease returns to the pool;
5. closing a round: validate replies, average them weighted by tokens trained, apply the
   outer optimizer, commit the data ledger, write an atomic checkpoint.

Waiting never spins: with nothing in flight the loop blocks on the signals stream
(XREAD BLOCK); with messages in flight it polls the Grid every ``poll_s``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nanochat.paths import atomic_write_text, resolve
from pilot.control.aggregate import (
    OuterOptimizer,
    ReplyError,
    decode_state,
    encode_state,
    transfer_dtype,
    validate_state,
)
from pilot.control.data_ledger import Assignment, DataLedger, LedgerError
from pilot.control.fleet import Fleet
from pilot.control.leases import lease, unread_rest
from pilot.control.rounds import Participant, Reply, Round
from pilot.control.run_config import RunConfig, RunConfigError, runtime_api_address
from pilot.control.server_state import CheckpointMismatch, ServerState
from pilot.control.validation import RoundValidation, Validation
from pilot.events.reader import load_events, loss_curve
from pilot.flower.messages import MessageError, SiteInfo, TrainOrder, TrainReport
from pilot.infra.procs import RunStopped

log = logging.getLogger(__name__)

QUERY_RETRY_S = 5.0  # wall seconds before re-asking a node that failed a QUERY
IDLE_BLOCK_MS = 5000  # longest block on the signals stream with nothing in flight
REPORT_TIMEOUT_S = 300.0  # wall seconds the run-end report may take
LOSS_CURVE_POINTS = 64  # per-step losses of a reply, binned to this many for the events/figure
# energy simulation meta status -> run end reason (pilot/energy/cosim.py)
SIM_ENDS = {"finished": "trace_end", "stopped": "trace_end", "failed": "energy_sim_failed"}


# ------------------------------------------------------------------------------ the loop
class ElasticStrategy:
    def __init__(self, grid: Any, cfg: RunConfig, signals: Any, provisioner: Any = None):
        from pilot.config.sites import load_sites
        from pilot.control.policy import make_policy
        from pilot.energy.carbon import Ledger
        from pilot.events.log import EventLog
        from pilot.infra.runlog import RunLog

        self.grid, self.cfg, self.sig = grid, cfg, signals
        self.sites = load_sites(cfg.sites_file)
        self.policy = make_policy(cfg.policy, self.sites)
        self.dtype = transfer_dtype(cfg.transfer_dtype)
        self.clock = self._wait_clock()
        self.carbon = Ledger()
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        self.events = EventLog(
            cfg.run_dir / "events.jsonl", self.clock_now, signals, observers=[self.carbon.observe]
        )
        self.runlog = RunLog(
            cfg.run_dir,
            cfg.wandb,
            cfg.wandb_project,
            cfg.name,
            {"preset": str(cfg.preset), **cfg.train},
        )
        self.provisioner = provisioner or self._make_provisioner()
        # the global model's val bpb after every aggregation, in a background thread
        self.validation = RoundValidation(
            cfg.train,
            resolve(cfg.data_dir),
            resolve(cfg.tokenizer_dir),
            self.events,
            self.runlog,
        )
        # the checkpointed state (weights, outer optimizer, data ledger, counters, read rates):
        # set by start(), from the checkpoint or fresh
        self.state: ServerState | None = None
        # live state (not checkpointed)
        self._wire: tuple[int, Any] | None = None  # (round, encoded global ArrayRecord)
        self.round: Round | None = None
        self.fleet = Fleet(query_retry_s=QUERY_RETRY_S)  # which node is which site, who is up
        self.startup_s: float | None = None  # wall seconds from TRAIN push to first step
        self.last_signal_id = "$"
        self.last_mode: tuple | None = None

    # -- setup --------------------------------------------------------------------------------
    def _wait_clock(self):
        """The run's clock from the energy simulation's meta; blocks until it is published."""
        from pilot.energy.clock import Clock

        while True:
            meta = self.sig.meta()
            if "speedup" in meta and ("sim_time" in meta or "sim_start" in meta):
                return Clock.from_meta(meta)
            log.info("waiting for the energy simulation to publish %s", self.sig.key("meta"))
            self.last_signal_id, _ = self.sig.wait_signals("$", block_ms=2000)

    def clock_now(self) -> float:
        return self.clock.sim_now()

    def _refresh_clock(self) -> dict:
        from pilot.energy.clock import Clock

        meta = self.sig.meta()
        if "speedup" in meta:
            self.clock = Clock.from_meta(meta)
        return meta

    def _make_provisioner(self):
        from pilot.provisioner import make_provisioner

        return make_provisioner(
            self.cfg.provisioner,
            sites=self.sites.sites,
            superlink=self.cfg.superlink or runtime_api_address(),
            state_dir=self.cfg.run_dir / "nodes",
            log_dir=self.cfg.run_dir / "logs",
            to_wall=lambda sim_s: self.clock.to_wall(sim_s),
            stop_timeout_s=self.cfg.node_stop_timeout_s,
            root_certificates=self.cfg.root_certificates,
            auth_keys_dir=self.cfg.supernode_auth_keys,
            namespace=self.cfg.k8s_namespace,
            kubeconfig=self.cfg.k8s_kubeconfig,
        )

    def _load_state(self) -> bool:
        """The run's state from its newest checkpoint (True), else a fresh one (False)."""
        from nanochat.dataset import chunk_table

        outer = OuterOptimizer(self.cfg.outer, self.cfg.outer_lr, self.cfg.outer_momentum)
        try:
            loaded = ServerState.load(self.cfg.run_dir / "checkpoint", self.cfg.train, outer)
        except CheckpointMismatch as e:
            raise RunConfigError(str(e)) from None
        if loaded is None:
            ledger = DataLedger(chunk_table(resolve(self.cfg.data_dir)))
            self.state = ServerState.fresh(self.cfg.train, outer, ledger)
            return False
        self.state = loaded[0]
        # ClientApps of the round that was in flight stop now; its number is never reused
        self.sig.end_round(self.state.round_n)
        return True

    def _checkpoint(self) -> None:
        assert self.state is not None
        meta = {
            "run": self.cfg.name,
            "train_config": self.cfg.train,
            "carbon_ledger": self.carbon.to_dict(),
        }
        self.state.save(self.cfg.run_dir / "checkpoint", meta)
        atomic_write_text(self.cfg.run_dir / "ledger.json", json.dumps(self.carbon.to_dict()))

    # -- main ---------------------------------------------------------------------------------
    def start(self) -> bool:
        """The run's state from its checkpoint (True) or fresh (False), its earlier
        incarnation's events replayed and its provisioned sites adopted; run_start emitted."""
        resumed = self._load_state()
        assert self.state is not None
        # An earlier incarnation of this run (killed, or died before its first checkpoint):
        # replaying its events rebuilds the carbon ledger up to the crash, including what
        # happened after the last checkpoint, and says which sites are still provisioned.
        if self.events.path.exists():
            for ev in load_events(self.events.path):
                self.carbon.observe(ev)
        for site in sorted(set(self.carbon.open) & set(self.sites.names)):
            self.provisioner.start(site)  # adopts the running node, or restarts it
            self.fleet.provision(site)
        for site in self.sites.names:
            self.sig.clear_stop(site)
        meta = self.sig.meta()
        self.events.emit(
            "run_start",
            run=self.cfg.name,
            preset=str(self.cfg.preset),
            # the trace the energy simulation replays wins over the sites file's default
            trace=meta.get("trace") or (str(self.sites.trace) if self.sites.trace else None),
            sites=str(self.cfg.sites_file),
            threshold=self.sites.threshold,
            policy=self.policy.cfg.name,
            sim_start=meta.get("sim_start"),
            speedup=self.clock.speedup,
            resumed=resumed,
            round=self.state.round_n,
            global_step=self.state.global_step,
            outer=self.cfg.outer,
            transfer_dtype=self.cfg.transfer_dtype,
        )
        return resumed

    def run(self) -> str:
        self.start()
        reason = "error"
        try:
            while True:
                end = self._end_reason()
                if end is not None and self.round is None:
                    reason = end
                    break
                self._tick()
        except RunStopped:  # flwr stop / SIGTERM: end the run properly, then let it go on
            reason = "stopped"
            raise
        finally:
            self.validation.close()  # the last round's bpb is recorded before run_end
            self._shutdown(reason)
        return reason

    def _end_reason(self) -> str | None:
        assert self.state is not None
        if self.state.ledger.exhausted:
            return "data"
        if self.state.global_step >= self.cfg.num_iterations:
            return "steps"
        return SIM_ENDS.get(self.sig.status() or "")

    def _tick(self) -> None:
        self._refresh_clock()
        self.validation.poll()
        self._poll_nodes()
        self._pull()
        self._serve_lease_requests()
        status = self.provisioner.status()
        decision = self._decide(self._ready(status))
        self._provision(decision, status)
        self._drive_round(decision)
        self._wait()

    def _wait(self) -> None:
        busy = self.round is not None or self.fleet.waiting()
        block_ms = int(self.cfg.poll_s * 1000) if busy else IDLE_BLOCK_MS
        self.last_signal_id, _ = self.sig.wait_signals(self.last_signal_id, block_ms=block_ms)

    # -- nodes --------------------------------------------------------------------------------
    def _poll_nodes(self) -> None:
        from flwr.app import Message, RecordDict

        now, on_grid = time.time(), set(self.grid.get_node_ids())
        for nid in self.fleet.vanished(on_grid):
            site = self.fleet.gone(nid)
            if site is not None and self.round is not None and site in self.round.pending():
                self._drop(site, "node disconnected")
        fresh = self.fleet.to_ask(on_grid, now)
        if not fresh:
            return
        msgs = [
            Message(RecordDict(), dst_node_id=nid, message_type="query", ttl=120) for nid in fresh
        ]
        for nid, mid in zip(fresh, self.grid.push_messages(msgs), strict=True):
            if mid:
                self.fleet.asked(nid, mid, now)

    def _on_query_reply(self, nid: int, msg: Any) -> None:
        try:
            if msg.has_error():
                raise MessageError(f"QUERY failed: {msg.error.reason}")
            info = SiteInfo.from_message(msg)
        except (MessageError, KeyError) as e:
            self.fleet.query_failed_at(nid, time.time())
            self.events.emit("fault", error=f"node {nid}: {e}")
            return
        if info.site not in self.sites.names:
            self.events.emit(
                "fault",
                error=f"node {nid} says it is site {info.site!r}, which is not in "
                f"{self.cfg.sites_file}",
                site=info.site,
            )
            return
        self.fleet.map(nid, info.site, info.gpus, info.device)

    def _pull(self) -> None:
        ids = list(self.fleet.queries)
        if self.round is not None:
            ids += [
                p.msg_id for s, p in self.round.participants.items() if s in self.round.pending()
            ]
        if not ids:
            return
        for msg in self.grid.pull_messages(ids):
            mid = msg.metadata.reply_to_message_id
            nid = self.fleet.answered(mid)
            if nid is not None:
                self._on_query_reply(nid, msg)
            elif self.round is not None:
                for site, p in self.round.participants.items():
                    if p.msg_id == mid and site in self.round.pending():
                        self._on_train_reply(site, msg)
                        break
        self.fleet.expire_queries(time.time())

    # -- policy and provisioning ---------------------------------------------------------------
    def _ready(self, status: dict[str, str]) -> set[str]:
        """Sites that can train (a provisioner reports "provisioning" until the site's modelled
        start-up delay has passed); provisioned sites that became ready are announced."""
        ready = self.fleet.ready(status)
        for site in self.fleet.newly_ready(ready):
            self.events.emit(
                "provision_complete",
                site=site,
                node_id=self.fleet.site_node[site],
                **self.fleet.node_info[site],
            )
        return ready

    def _decide(self, ready: set[str]):
        now = self.clock.sim_now()
        mci, forecast = {}, {}
        for s in self.sites.sites:
            st = self.sig.site(s.name)
            if st is not None and "mci" in st:
                mci[s.name] = float(st["mci"])
            forecast[s.name] = self.sig.forecast(s.name)
        decision = self.policy.step(now, mci, forecast, ready)
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
        for site in sorted(self.fleet.provisioned):
            if status.get(site, "").startswith("failed"):
                self._replace_node(site, status[site])
        for site in sorted(decision.provision - self.fleet.provisioned):
            reason = decision.reasons.get(site, "")
            self.events.emit("provision_decided", site=site, reason=reason)
            self.sig.clear_stop(site)
            self.provisioner.start(site)
            self.fleet.provision(site)
            self.events.emit("provision_started", site=site, reason=reason)
        for site in sorted(self.fleet.provisioned - decision.provision):
            if site in self.fleet.leaving:
                continue
            reason = decision.reasons.get(site, "released")
            if self.round is not None and site in self.round.pending():
                self._request_leave(site, reason)  # deprovisioned once its reply is in
            else:
                self._deprovision(site, reason)

    def _replace_node(self, site: str, state: str) -> None:
        """The site's SuperNode process died: drop its work in flight at once (no need to
        wait out the reply grace for a death we saw) and start a new node."""
        why = f"SuperNode of {site} {state}; restarting it"
        if self.round is not None and site in self.round.pending():
            self._drop(site, why)
        else:
            self.events.emit("fault", error=why, site=site)
        # the dead node's id may linger on the Grid until its heartbeat expires: no more
        # work for it; the new node is mapped by its QUERY reply
        self.fleet.unmap(site)
        self.provisioner.stop(site, drain=False)
        if site in self.fleet.provisioned:  # _drop may have deprovisioned a leaving site
            self.provisioner.start(site)

    def _request_leave(self, site: str, reason: str, warm: bool = False) -> None:
        """Stop ``site``'s training in the running round; its partial reply counts. ``warm``:
        the policy keeps it provisioned (idle), so it may resume in this round."""
        assert self.round is not None
        self.sig.request_stop(site, reason, ttl_s=self.cfg.stop_ttl_s)
        self.fleet.leave(site, reason)
        if warm:
            self.round.warm.add(site)
        self.events.emit("leave", site=site, round=self.round.n, reason=reason, warm=warm)

    def _left(self, site: str) -> None:
        """A leaving site's reply is in (or it was dropped): no longer leaving. The next
        ``_provision`` releases it unless the policy keeps it warm."""
        self.fleet.left(site)

    def _deprovision(self, site: str, reason: str) -> None:
        self.provisioner.stop(site, drain=True)
        self.fleet.deprovision(site)
        self.sig.clear_stop(site)
        self.events.emit("deprovision", site=site, reason=reason)

    # -- rounds -------------------------------------------------------------------------------
    def _drive_round(self, decision) -> None:
        trainable = {
            s for s in decision.train if s in self.fleet.site_node and s not in self.fleet.leaving
        }
        if self.round is None:
            if trainable and self._end_reason() is None:
                self._open_round(trainable, decision)
            return
        r, now = self.round, time.time()
        if r.deadline_wall > now and self._end_reason() is not None:
            # The replay is over (or failed): no simulated time is left to train in, so the
            # round ends now and every site returns its partial work (early end below).
            r.deadline_wall = now
        # leaves: still training but no longer in the train set (above the threshold: warm
        # while the policy keeps the site provisioned; window closed: released after)
        for site in r.pending():
            if site not in decision.train and site not in self.fleet.leaving:
                warm = site in decision.provision
                self._request_leave(site, decision.reasons.get(site, "window closed"), warm)
        # joins: ready mid-round, with at least join_min_s of training left once the
        # ClientApp has started (the measured TRAIN start-up lag); a warm site that paused
        # in this round resumes from its own partial weights
        remaining = r.deadline_wall - now - (self.startup_s or 0.0)
        joiners = sorted(s for s in trainable if s not in r.participants or s in r.paused())
        if joiners and remaining >= self.clock.to_wall(self.cfg.join_min_s):
            active = [s for s in r.pending() if s not in self.fleet.leaving]
            if len(active) + len(joiners) >= 2:
                # the round becomes FEDERATED: sync after round_min_s, not round_max_s
                r.deadline_wall = min(
                    r.deadline_wall, now + self.clock.to_wall(self.cfg.round_min_s)
                )
            self._send_train(r, joiners, joined=True)
        # early end for sites whose messages carry a later deadline
        if (
            now >= r.deadline_wall
            and not r.end_signalled
            and any(p.deadline_wall > r.deadline_wall for p in r.participants.values())
        ):
            self.sig.end_round(r.n)
            r.end_signalled = True
        # silent sites: dropped after the grace period
        for site in r.pending():
            due = min(r.participants[site].deadline_wall, r.deadline_wall)
            if now > due + self.cfg.reply_grace_s:
                self._drop(site, f"no reply {self.cfg.reply_grace_s:.0f} s after the deadline")
        # everyone replied (or was dropped) and no warm site may resume before the deadline
        if not r.pending() and (now >= r.deadline_wall or not r.paused() & self.fleet.provisioned):
            self._close_round()

    def _open_round(self, sites: set[str], decision) -> None:
        from pilot.control.policy import Mode

        self.state.round_n += 1
        now = time.time()
        length = (
            self.cfg.round_min_s
            if decision.mode == Mode.FEDERATED and len(sites) > 1
            else self.cfg.round_max_s
        )
        self.round = Round(
            n=self.state.round_n,
            start_wall=now,
            deadline_wall=now + self.clock.to_wall(length),
            base_step=self.state.global_step,
        )
        self.events.emit(
            "round_start",
            round=self.state.round_n,
            sites=sorted(sites),
            deadline_t=self.clock.sim_now(self.round.deadline_wall),
            global_step=self.state.global_step,
            mode=str(Mode.of(len(sites))),
        )
        self._send_train(self.round, sorted(sites), joined=False)
        if not self.round.participants:  # no data could be assigned to anyone
            self.round = None

    def _global_record(self, r: Round):
        if self._wire is None or self._wire[0] != r.n:
            self._wire = (r.n, encode_state(self.state.weights, self.dtype))
        return self._wire[1]

    def _assign(self, site: str, train_s: float, world: int | None = None) -> Assignment:
        assert self.state is not None
        readers = max(1, len(self.sites.site(site).gpus)) if world is None else 1
        return lease(
            self.state.ledger,
            site,
            readers,
            self.state.rates.get(site),
            train_s,
            self.cfg.chunks_per_assignment,
            self.cfg.assignment_slack,
            world,
        )

    def _serve_lease_requests(self) -> None:
        """A rank that read its whole assignment before the deadline asks for more (see
        pilot.flower.train_job): lease it what it can read in the time left; no chunks when its round
        is over, it is leaving, or the data is."""
        for req in self.sig.lease_requests():
            if isinstance(req, str):
                self.events.emit("fault", error=f"malformed lease request {req[:200]!r}")
                continue
            site, r, now = req["site"], self.round, time.time()
            live = (
                r is not None
                and r.n == req["round"]
                and r.deadline_wall > now
                and site in r.pending()
                and site not in self.fleet.leaving
                and site in self.sites.names
            )
            if not live:
                self.sig.reply_lease(req["id"], Assignment(site=site).to_dict())
                continue
            assert r is not None
            assignment = self._assign(site, r.deadline_wall - now, world=req["world"])
            self.sig.reply_lease(req["id"], assignment.to_dict())
            if assignment.chunks:
                r.participants[site].assignment.chunks.extend(assignment.chunks)
                r.participants[site].assignment.start_rows.update(assignment.start_rows)
                self.events.emit(
                    "lease_extended",
                    site=site,
                    round=r.n,
                    rank=req["rank"],
                    chunks=len(assignment.chunks),
                    rows=assignment.rows,
                )

    def _send_train(self, r: Round, sites: list[str], joined: bool) -> None:
        from flwr.app import Message

        now = time.time()
        msgs, planned = [], []
        for site in sites:
            # a paused site resumes from its own weights, at its own place in the schedule,
            # reading on where it stopped in the chunks it still holds
            before = r.replies.get(site)
            assignment = unread_rest(r, before) if before else Assignment(site)
            if not assignment.chunks:
                assignment = self._assign(site, r.deadline_wall - now - (self.startup_s or 0.0))
            if not assignment.chunks:
                continue
            self.sig.clear_stop(site)
            step = r.base_step + (before.steps if before else 0)
            order = TrainOrder(
                run=self.cfg.name,
                round=r.n,
                global_step=step,
                deadline_wall=r.deadline_wall,
                assignment=assignment.to_dict(),
                train_config=self.cfg.train,
                transfer_dtype=self.cfg.transfer_dtype,
                data_dir=self.cfg.data_dir,
                tokenizer_dir=self.cfg.tokenizer_dir,
                max_steps=max(0, self.cfg.num_iterations - step),
            )
            model = encode_state(before.state, self.dtype) if before else self._global_record(r)
            content = order.to_record(model)
            ttl = max(60.0, r.deadline_wall - now + self.cfg.reply_grace_s + 60.0)
            msgs.append(
                Message(
                    content,
                    dst_node_id=self.fleet.site_node[site],
                    message_type="train",
                    group_id=str(r.n),
                    ttl=ttl,
                )
            )
            planned.append((site, assignment))
        if not msgs:
            return
        for (site, assignment), mid in zip(planned, self.grid.push_messages(msgs), strict=True):
            if not mid:
                if site not in r.replies:  # a failed resume keeps its lease for its reply
                    self.state.ledger.release(site)
                self.events.emit(
                    "fault", error="TRAIN message could not be pushed", site=site, round=r.n
                )
                continue
            resumed = r.resume(site)
            r.participants[site] = Participant(
                site, self.fleet.site_node[site], mid, r.deadline_wall, assignment, joined, now
            )
            if joined:
                self.events.emit(
                    "join",
                    site=site,
                    round=r.n,
                    deadline_t=self.clock.sim_now(r.deadline_wall),
                    resumed=resumed,
                )

    def _drop(self, site: str, why: str) -> None:
        """The site's work in this round is lost (its part before a pause included: the lease
        covers both); its rows return to the pool."""
        assert self.round is not None and self.state is not None
        self.round.dropped.add(site)
        self.round.earlier.pop(site, None)
        released = self.state.ledger.release(site)
        self.events.emit(
            "fault", error=why, site=site, round=self.round.n, released_chunks=released
        )
        self._left(site)

    def _on_train_reply(self, site: str, msg: Any) -> None:
        assert self.round is not None and self.state is not None
        r = self.round
        if msg.has_error():
            self._drop(site, f"TRAIN failed: {msg.error.reason}")
            return
        try:
            reply = self._parse_reply(site, msg)
        except (ReplyError, LedgerError, KeyError, TypeError, ValueError) as e:
            self._drop(site, f"bad reply dropped: {e}")
            return
        if site in r.earlier:
            reply = r.earlier.pop(site).then(reply)
        r.replies[site] = reply
        self._left(site)

    def _parse_reply(self, site: str, msg: Any) -> Reply:
        """Validate a TRAIN reply and record its energy; raises on anything unusable."""
        assert self.round is not None and self.state is not None
        report = TrainReport.from_message(msg)
        # Energy was spent whether or not the weights are usable: account it first. A measured
        # total is shared among the reply's intervals by duration, so it is counted once.
        self._emit_intervals(site, report)
        report.check(site)
        state = decode_state(msg.content["model"])
        validate_state(state, self.state.weights, self.dtype)
        new_rows = self.state.ledger.check(site, report.consumed)
        total_s = sum(e - s for s, e in report.intervals)
        if new_rows > 0 and total_s > 0:
            self.state.rates[site] = new_rows / total_s
        if report.intervals:  # TRAIN pushed -> first step: process start, imports, model, data
            lag = report.intervals[0][0] - self.round.participants[site].sent_wall
            self.startup_s = lag if self.startup_s is None else 0.5 * (self.startup_s + lag)
        return Reply(
            site,
            state,
            report.tokens,
            report.steps,
            report.loss if report.loss is not None else math.nan,
            report.consumed,
            report.stopped_by,
            report.cropped_tokens,
        )

    def _emit_intervals(self, site: str, report: TrainReport) -> None:
        """One train_interval event per span of the reply, its curve and energy shared out."""
        assert self.round is not None
        spans = report.intervals
        total_s = sum(e - s for s, e in spans)
        curve = loss_curve(report.losses, LOSS_CURVE_POINTS)
        done = 0.0  # share of the reply's training time before this span
        for start, end in spans:
            share = (end - start) / total_s if total_s > 0 else 1.0 / len(spans)
            lo, hi = round(done * len(curve)), round((done + share) * len(curve))
            done += share
            self.events.emit(
                "train_interval",
                site=site,
                round=self.round.n,
                start=self.clock.sim_now(start),
                end=self.clock.sim_now(end),
                tokens=report.tokens,
                steps=report.steps,
                loss=report.loss if report.steps else None,
                curve=curve[lo:hi],
                energy_j=report.energy_j * share if report.energy_j is not None else None,
                stopped_by=report.stopped_by,
                cropped_tokens=report.cropped_tokens,
            )

    def _close_round(self) -> None:
        assert self.round is not None and self.state is not None
        r = self.round
        replies = list(r.replies.values())
        worked = [rep for rep in replies if rep.tokens > 0]
        loss = self.state.apply(replies, r.base_step)
        committed: dict[str, dict[str, list[int]]] = {}
        for rep in replies:  # rows read are consumed even when no full step ran
            done = self.state.ledger.committed()
            self.state.ledger.commit(rep.site, rep.consumed)
            committed[rep.site] = {k: [done[k], v] for k, v in rep.consumed.items() if v > done[k]}
        sites = sorted(r.replies)
        tokens = sum(rep.tokens for rep in worked)
        cropped = sum(rep.cropped for rep in replies)
        # committed: the row ranges [from, to) per chunk this round made permanent, so that
        # exactly-once can be audited from the events alone
        self.events.emit(
            "round_end",
            round=r.n,
            sites=sites,
            tokens=tokens,
            loss=loss,
            dropped=sorted(r.dropped),
            committed=committed,
            cropped_tokens=cropped,
        )
        if worked:
            self.events.emit(
                "aggregate",
                round=r.n,
                loss=loss,
                tokens=tokens,
                global_step=self.state.global_step,
                sites=sorted(rep.site for rep in worked),  # the sites averaged
                weights={rep.site: rep.tokens for rep in worked},
                committed_rows=self.state.ledger.committed_rows,
                total_rows=self.state.ledger.total_rows,
            )
        self.round = None
        self._checkpoint()
        now = self.clock.sim_now()
        row = {
            "round": r.n,
            "t": now,
            "global_step": self.state.global_step,
            "tokens": self.state.tokens,
            "loss": loss,  # round-mean train loss (work-weighted), not the global model's
            "sites": len(sites),
            "committed_rows": self.state.ledger.committed_rows,
            "cropped_tokens": cropped,
        }
        job = Validation(r.n, now, self.state.global_step, self.state.tokens, row)
        self.validation.after_round(job, self.state.weights if worked else None)

    # -- shutdown -----------------------------------------------------------------------------
    def _shutdown(self, reason: str) -> None:
        if self.round is not None:  # an error mid-round: nothing of it is committed
            for site in self.round.pending():
                self.sig.request_stop(site, f"run ended: {reason}", ttl_s=self.cfg.stop_ttl_s)
                if self.state is not None:
                    self.state.ledger.release(site)
            self.round = None
        for site in sorted(self.fleet.provisioned):
            self._deprovision(site, f"run ended: {reason}")
        self.provisioner.close()
        self.events.emit(
            "run_end",
            reason=reason,
            global_step=self.state.global_step,
            tokens=self.state.tokens,
            round=self.state.round_n,
        )
        atomic_write_text(self.cfg.run_dir / "ledger.json", json.dumps(self.carbon.to_dict()))
        self.events.export_csv()
        self.runlog.close()
        write_report(self.cfg.run_dir)  # logs a failure, never raises: the run's error wins


def write_report(run_dir: Path) -> None:
    """The run's report, built by ``python -m pilot.analysis.report --after-run`` in a child
    process (the live loop imports no analysis code); its lines go to this log. Never raises."""
    import pilot

    root = str(Path(pilot.__file__).resolve().parents[1])  # this pilot, wherever Flower put it
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    argv = [sys.executable, "-m", "pilot.analysis.report", str(run_dir), "--after-run"]
    try:
        out = subprocess.run(
            argv,
            env={**os.environ, "PYTHONPATH": path},
            capture_output=True,
            text=True,
            timeout=REPORT_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("report not written (%s): rebuild it with %s", e, " ".join(argv[1:-1]))
        return
    for line in out.stdout.splitlines():
        log.info("%s", line)
    for line in out.stderr.strip().splitlines()[-3:]:  # a crash's last words
        log.warning("report: %s", line)
