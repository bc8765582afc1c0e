"""The running round over the Grid: opening it, carrying out the scheduler's plans (stop keys,
TRAIN messages to joiners, drops), serving the ranks' lease refills, taking replies in and
closing it into the global model. It owns the live ``Round`` (not checkpointed: a restarted
server opens the next round) and the measured TRAIN start-up lag."""

from __future__ import annotations

import time
from typing import Any

from pilot.control.aggregate import encode_state
from pilot.control.data_ledger import Assignment, LedgerError
from pilot.control.leases import commit, lease, unread_rest
from pilot.control.rounds import Participant, Reply, Round
from pilot.control.scheduler import RoundPlan, Timing, end_round, may_refill
from pilot.flower.context import RunContext
from pilot.flower.messages import MessageError, TrainOrder, TrainReport
from pilot.flower.replies import fixed_costs, interval_events, to_reply

TTL_MARGIN_S = 60.0  # a TRAIN message outlives its deadline and grace by this (wall seconds)


class RoundDriver:
    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.round: Round | None = None
        self.startup_s: float | None = None  # wall seconds from a TRAIN push to its first step

    def pending(self, site: str) -> bool:
        return self.round is not None and site in self.round.pending()

    def timing(self) -> Timing:
        cfg, clock = self.ctx.cfg, self.ctx.clock
        return Timing(
            clock.to_wall(cfg.round_min_s),
            clock.to_wall(cfg.round_max_s),
            clock.to_wall(cfg.join_min_s),
            cfg.reply_grace_s,
            self.startup_s or 0.0,
        )

    # -- open, plan, end --------------------------------------------------------------------
    def open(self, sites: set[str], length_wall: float, mode: str) -> None:
        state, now = self.ctx.server, time.time()
        state.round_n += 1
        self.round = Round(state.round_n, now, now + length_wall, state.global_step)
        self.ctx.events.emit(
            "round_start",
            round=state.round_n,
            sites=sorted(sites),
            deadline_t=self.ctx.clock.sim_now(self.round.deadline_wall),
            global_step=state.global_step,
            mode=mode,
        )
        self.send_train(sorted(sites), joined=False)
        if not self.round.participants:  # no data could be assigned to anyone
            self.round = None

    def carry_out(self, plan: RoundPlan) -> None:
        assert self.round is not None
        self.round.deadline_wall = plan.deadline_wall
        for site, reason, warm in plan.leaves:
            self.request_leave(site, reason, warm)
        if plan.joiners:
            self.send_train(plan.joiners, joined=True)

    def settle(self) -> bool:
        """The end signal, drops of silent sites; True when the round closes now."""
        r = self.round
        assert r is not None
        end = end_round(r, time.time(), self.ctx.fleet.provisioned, self.timing())
        if end.signal_end:
            self.ctx.sig.end_round(r.n)
            r.end_signalled = True
        for site in end.overdue:
            self.drop(site, f"no reply {self.ctx.cfg.reply_grace_s:.0f} s after the deadline")
        return end.close

    def request_leave(self, site: str, reason: str, warm: bool = False) -> None:
        """Stop ``site``'s training in the running round; its partial reply counts. ``warm``:
        the policy keeps it provisioned (idle), so it may resume in this round."""
        assert self.round is not None
        self.ctx.sig.request_stop(site, reason, ttl_s=self.ctx.cfg.stop_ttl_s)
        self.ctx.fleet.leave(site, reason)
        if warm:
            self.round.warm.add(site)
        self.ctx.events.emit("leave", site=site, round=self.round.n, reason=reason, warm=warm)

    # -- data -------------------------------------------------------------------------------
    def assign(self, site: str, train_s: float, world: int | None = None) -> Assignment:
        cfg, state = self.ctx.cfg, self.ctx.server
        readers = max(1, len(self.ctx.sites.site(site).gpus)) if world is None else 1
        rate = state.rates.get(site)
        slack = cfg.assignment_slack
        return lease(
            state.ledger, site, readers, rate, train_s, cfg.chunks_per_assignment, slack, world
        )

    def serve_lease_requests(self) -> None:
        """A rank that read its whole assignment before the deadline asks for more (see
        pilot.flower.train_job): lease it what it can read in the time left; no chunks when
        its round is over, it is leaving, or the data is."""
        ctx = self.ctx
        for req in ctx.sig.lease_requests():
            if isinstance(req, str):
                ctx.events.emit("fault", error=f"malformed lease request {req[:200]!r}")
                continue
            site, r, now = req["site"], self.round, time.time()
            leaving = ctx.fleet.leaving(site)
            if site not in ctx.sites.names or not may_refill(r, req["round"], site, now, leaving):
                ctx.sig.reply_lease(req["id"], Assignment(site=site).to_dict())
                continue
            assert r is not None
            assignment = self.assign(site, r.deadline_wall - now, world=req["world"])
            ctx.sig.reply_lease(req["id"], assignment.to_dict())
            if assignment.chunks:
                r.participants[site].assignment.chunks.extend(assignment.chunks)
                r.participants[site].assignment.start_rows.update(assignment.start_rows)
                ctx.events.emit(
                    "lease_extended",
                    site=site,
                    round=r.n,
                    rank=req["rank"],
                    chunks=len(assignment.chunks),
                    rows=assignment.rows,
                )

    # -- TRAIN out --------------------------------------------------------------------------
    def _order(self, site: str, now: float) -> tuple[Any, Assignment, TrainOrder, Any] | None:
        """``site``'s TRAIN message, lease, order and the weights it carries (None: no data
        left for it). A paused site
        resumes from its own weights, at its own place in the schedule, reading on where it
        stopped in the chunks it still holds."""
        from flwr.app import Message

        ctx, r = self.ctx, self.round
        assert r is not None
        before = r.replies.get(site)
        assignment = unread_rest(r, before) if before else Assignment(site)
        if not assignment.chunks:
            assignment = self.assign(site, r.deadline_wall - now - (self.startup_s or 0.0))
        if not assignment.chunks:
            return None
        ctx.sig.clear_stop(site)
        step = r.base_step + (before.steps if before else 0)
        cfg = ctx.cfg
        order = TrainOrder(
            run=cfg.name,
            round=r.n,
            global_step=step,
            deadline_wall=r.deadline_wall,
            assignment=assignment.to_dict(),
            train_config=cfg.train,
            transfer_dtype=cfg.transfer_dtype,
            data_dir=cfg.data_dir,
            tokenizer_dir=cfg.tokenizer_dir,
            max_steps=max(0, cfg.num_iterations - step),
            update_dtype=cfg.update_dtype,
        )
        base = before.state if before else ctx.server.model.weights
        model = encode_state(base, ctx.dtype) if before else ctx.server.model.encoded(ctx.dtype)
        ttl = max(TTL_MARGIN_S, r.deadline_wall - now + cfg.reply_grace_s + TTL_MARGIN_S)
        node = ctx.fleet.node(site)
        msg = Message(
            order.to_record(model),
            dst_node_id=node,
            message_type="train",
            group_id=str(r.n),
            ttl=ttl,
        )
        return msg, assignment, order, base

    def send_train(self, sites: list[str], joined: bool) -> None:
        ctx, r, now = self.ctx, self.round, time.time()
        assert r is not None
        planned = [(site, o) for site in sites if (o := self._order(site, now)) is not None]
        if not planned:
            return
        mids = ctx.grid.push_messages([msg for _, (msg, _, _, _) in planned])
        for (site, (_, assignment, order, base)), mid in zip(planned, mids, strict=True):
            if not mid:
                if site not in r.replies:  # a failed resume keeps its lease for its reply
                    ctx.server.ledger.release(site)
                ctx.events.emit(
                    "fault", error="TRAIN message could not be pushed", site=site, round=r.n
                )
                continue
            resumed = r.resume(site)
            node = ctx.fleet.node(site)
            r.participants[site] = Participant(
                site, node, mid, r.deadline_wall, assignment, joined, now,
                order.global_step, order.max_steps or 0, base,
            )  # fmt: skip
            if joined:
                deadline_t = ctx.clock.sim_now(r.deadline_wall)
                ctx.events.emit(
                    "join", site=site, round=r.n, deadline_t=deadline_t, resumed=resumed
                )

    # -- replies in -------------------------------------------------------------------------
    def awaited(self) -> dict[str, str]:
        """TRAIN message id -> site, for the replies still expected."""
        r = self.round
        return {} if r is None else {r.participants[s].msg_id: s for s in r.pending()}

    def drop(self, site: str, why: str) -> None:
        """The site's work in this round is lost (its part before a pause included: the lease
        covers both); its rows return to the pool."""
        r = self.round
        assert r is not None
        r.dropped.add(site)
        r.earlier.pop(site, None)
        released = self.ctx.server.ledger.release(site)
        self.ctx.events.emit("fault", error=why, site=site, round=r.n, released_chunks=released)
        self.ctx.fleet.left(site)

    def on_reply(self, site: str, msg: Any) -> None:
        r = self.round
        assert r is not None
        if msg.has_error():
            self.drop(site, f"TRAIN failed: {msg.error.reason}")
            return
        try:
            reply = self._parse(site, msg)
        except (MessageError, LedgerError, KeyError, TypeError, ValueError) as e:
            self.drop(site, f"bad reply dropped: {e}")
            return
        if site in r.earlier:
            reply = r.earlier.pop(site).then(reply)
        r.replies[site] = reply
        self.ctx.fleet.left(site)

    def _parse(self, site: str, msg: Any) -> Reply:
        """Validate a TRAIN reply and record its energy; raises on anything unusable."""
        ctx, r = self.ctx, self.round
        assert r is not None
        report = TrainReport.from_message(msg)
        p = r.participants[site]
        costs = fixed_costs(report, p.sent_wall, time.time())
        # energy was spent whether or not the weights are usable: account it first
        for fields in interval_events(site, r.n, report, ctx.clock.sim_now, costs):
            ctx.events.emit("train_interval", **fields)
        report.check(site, p.step, int(ctx.cfg.train["total_batch_size"]), p.max_steps)
        state = ctx.server
        reply, new_rows = to_reply(site, report, msg, p.base, ctx.cfg.update_dtype, state.ledger)
        total_s = sum(e - s for s, e in report.intervals)
        if new_rows > 0 and total_s > 0:
            state.rates[site] = new_rows / total_s
        if report.intervals:  # TRAIN pushed -> first step: process start, imports, model, data
            lag = report.intervals[0][0] - r.participants[site].sent_wall
            self.startup_s = lag if self.startup_s is None else 0.5 * (self.startup_s + lag)
        return reply

    # -- close ------------------------------------------------------------------------------
    def close(self) -> tuple[Round, float | None, bool]:
        """The replies averaged into the global model and every reply's rows committed (read
        is consumed, even without a full step); returns the round, its work-weighted train
        loss and whether anything was averaged."""
        ctx, r = self.ctx, self.round
        assert r is not None
        state = ctx.server
        replies = list(r.replies.values())
        worked = [rep for rep in replies if rep.tokens > 0]
        loss = state.apply(replies, r.base_step)
        committed = commit(state.ledger, replies)
        tokens = sum(rep.tokens for rep in worked)
        # committed: the row ranges [from, to) per chunk this round made permanent, so that
        # exactly-once can be audited from the events alone
        ctx.events.emit(
            "round_end",
            round=r.n,
            sites=sorted(r.replies),
            tokens=tokens,
            loss=loss,
            dropped=sorted(r.dropped),
            committed=committed,
            cropped_tokens=sum(rep.cropped for rep in replies),
        )
        if worked:
            ctx.events.emit(
                "aggregate",
                round=r.n,
                loss=loss,
                tokens=tokens,
                global_step=state.global_step,
                sites=sorted(rep.site for rep in worked),  # the sites averaged
                weights={rep.site: rep.tokens for rep in worked},
                committed_rows=state.ledger.committed_rows,
                total_rows=state.ledger.total_rows,
            )
        self.round = None
        return r, loss, bool(worked)

    def abort(self, why: str) -> None:
        """The run ends mid-round (an error, a stop): nothing of the round is committed; its
        sites stop and their rows return to the pool."""
        if self.round is None:
            return
        for site in self.round.pending():
            self.ctx.sig.request_stop(site, why, ttl_s=self.ctx.cfg.stop_ttl_s)
            if self.ctx.state is not None:
                self.ctx.state.ledger.release(site)
        self.round = None
