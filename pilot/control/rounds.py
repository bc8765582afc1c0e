"""A round's carried state: who was sent a TRAIN, what each site replied, who was dropped."""

from __future__ import annotations

from dataclasses import dataclass, field

from pilot.control.aggregate import State
from pilot.control.data_ledger import Assignment


@dataclass
class Participant:
    site: str
    node_id: int
    msg_id: str
    deadline_wall: float  # what its TRAIN message says
    assignment: Assignment
    joined: bool  # entered a running round
    sent_wall: float
    step: int = 0  # the global step its TRAIN starts at
    max_steps: int = 0  # the steps its TRAIN allows (the run's budget left)
    base: State | None = (
        None  # the weights its TRAIN carried (fp32): its update is relative to them
    )


@dataclass
class Reply:
    site: str
    state: State
    tokens: int
    steps: int
    loss: float
    consumed: dict[str, int]
    stopped_by: str = ""
    cropped: int = 0  # tokens read but cut off by the loader's packing (not trained on)

    def then(self, later: Reply) -> Reply:
        """This partial reply followed by ``later``, the same site's work after it resumed
        from these weights in the same round: one reply, weighted by all its tokens."""
        tokens = self.tokens + later.tokens
        loss = (
            (self.loss * self.tokens + later.loss * later.tokens) / tokens if tokens else later.loss
        )
        consumed = dict(self.consumed)
        for k, v in later.consumed.items():
            consumed[k] = max(v, consumed.get(k, 0))
        return Reply(
            self.site,
            later.state,
            tokens,
            self.steps + later.steps,
            loss,
            consumed,
            later.stopped_by,
            self.cropped + later.cropped,
        )


@dataclass
class Round:
    n: int
    start_wall: float
    deadline_wall: float  # may shrink when the round turns FEDERATED
    base_step: int
    participants: dict[str, Participant] = field(default_factory=dict)
    replies: dict[str, Reply] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)
    end_signalled: bool = False
    # a site's partial reply from before it paused (warm) and resumed in this round
    earlier: dict[str, Reply] = field(default_factory=dict)
    # sites the server stopped warm in this round (kept provisioned): only these may resume;
    # a site stopped by anyone else (a pod's preStop drain) has left the round
    warm: set[str] = field(default_factory=set)

    def pending(self) -> list[str]:
        return [s for s in self.participants if s not in self.replies and s not in self.dropped]

    def resume(self, site: str) -> bool:
        """``site`` goes on in this round (True) after its partial reply, which waits for the
        rest of its work; False: a fresh participant."""
        if site not in self.replies:
            return False
        self.earlier[site] = self.replies.pop(site)
        self.warm.discard(site)
        return True

    def paused(self) -> set[str]:
        """Sites that stopped on our warm request and may resume in this round."""
        return {s for s, rep in self.replies.items() if rep.stopped_by == "stop" and s in self.warm}
