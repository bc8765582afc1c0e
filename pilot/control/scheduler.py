"""The round scheduler: when a round opens, who leaves and joins it, when it ends and closes,
as pure functions of wall time, the policy's decision and the fleet. The control loop carries
the plans out (stop keys, TRAIN messages, drops, the close).

Times here are wall seconds; the loop converts the run's simulated durations with its clock.
Rounds are time-based: a LOCAL round lasts ``round_max`` (so a checkpoint exists even when one
site trains alone), a FEDERATED one ``round_min``; a join that turns a LOCAL round FEDERATED
shortens it, and the ``round:<n>:end`` key then stops the sites whose TRAIN carried the later
deadline.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from pilot.control.rounds import Round


@dataclass(frozen=True)
class Timing:
    """The scheduler's durations, in wall seconds at the run's current speed-up."""

    round_min: float  # FEDERATED round length (sync period)
    round_max: float  # LOCAL round length (checkpoint period)
    join_min: float  # a site joins a running round only with this much training left
    reply_grace: float  # past a deadline before a silent site is dropped
    startup: float = 0.0  # measured lag from a TRAIN push to its first step


@dataclass
class RoundPlan:
    """What to do to the running round this tick, in this order."""

    deadline_wall: float
    leaves: list[tuple[str, str, bool]] = field(default_factory=list)  # (site, reason, warm)
    joiners: list[str] = field(default_factory=list)


@dataclass
class RoundEnd:
    """After the plan was carried out: the end signal, the silent sites, the close."""

    signal_end: bool
    overdue: list[str]
    close: bool


def round_length(federated: bool, n_sites: int, t: Timing) -> float:
    """A new round's length: the sync period for a FEDERATED round of several sites."""
    return t.round_min if federated and n_sites > 1 else t.round_max


def trainable(train: Collection[str], mapped: Collection[str], leaving: Collection[str]) -> set:
    """Sites the policy trains that have a node and are not on their way out."""
    return {s for s in train if s in mapped and s not in leaving}


def plan_round(
    r: Round,
    now: float,
    train: Collection[str],
    provision: Collection[str],
    reasons: dict[str, str],
    ready: set[str],
    leaving: Collection[str],
    ending: bool,
    t: Timing,
) -> RoundPlan:
    """Leaves and joins for the running round ``r``. ``ready``: trainable sites (see
    ``trainable``); ``ending``: the run is over (the round ends now, partial work returns)."""
    deadline = now if ending and r.deadline_wall > now else r.deadline_wall
    plan = RoundPlan(deadline)
    # leaves: still training but no longer in the train set (above the threshold: warm while
    # the policy keeps the site provisioned; window closed: released after)
    for site in r.pending():
        if site not in train and site not in leaving:
            plan.leaves.append((site, reasons.get(site, "window closed"), site in provision))
    # joins: ready mid-round with at least join_min of training left once the ClientApp has
    # started; a warm site that paused in this round resumes from its own partial weights
    gone = set(leaving) | {site for site, _, _ in plan.leaves}
    paused = r.paused()
    joiners = sorted(s for s in ready if s not in r.participants or s in paused)
    if joiners and deadline - now - t.startup >= t.join_min:
        active = [s for s in r.pending() if s not in gone]
        if len(active) + len(joiners) >= 2:  # the round turns FEDERATED: sync after round_min
            plan.deadline_wall = min(deadline, now + t.round_min)
        plan.joiners = joiners
    return plan


def end_round(r: Round, now: float, provisioned: Collection[str], t: Timing) -> RoundEnd:
    """The end signal for sites whose TRAIN carries a later deadline, the sites silent past
    the grace, and whether the round closes: everyone replied (or was dropped) and no warm
    site may resume before the deadline."""
    signal = (
        now >= r.deadline_wall
        and not r.end_signalled
        and any(p.deadline_wall > r.deadline_wall for p in r.participants.values())
    )
    overdue = [
        s
        for s in r.pending()
        if now > min(r.participants[s].deadline_wall, r.deadline_wall) + t.reply_grace
    ]
    waiting = [s for s in r.pending() if s not in overdue]
    close = not waiting and (now >= r.deadline_wall or not r.paused() & set(provisioned))
    return RoundEnd(signal, overdue, close)


def may_refill(r: Round | None, round_n: int, site: str, now: float, leaving: bool) -> bool:
    """A rank's lease refill is served only in its live round, before the deadline, while its
    site still trains in it."""
    return (
        r is not None
        and r.n == round_n
        and r.deadline_wall > now
        and site in r.pending()
        and not leaving
    )
