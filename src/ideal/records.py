"""Typed records of a run: what each round's update did and what the whole run found.

    UpdateRecord   RUN/round-K/mixture.json's "update": the rule, the round it started from, m,
                   the realised relative changes (the rest of what the rule recorded rides along)
    RoundRecord    one entry of RUN/summary.json's "rounds" (SPEC.md); also its "final": the
                   returned mixture trained with the run's recipe, under a search recipe
    Compute        RUN/summary.json's "compute": seconds of the rounds and of the final training,
                   and the whole run in units of one SFT at the run's recipe (cost_in_sfts)
    RunSummary     RUN/summary.json: the rounds, the probe's facts, the selected round, the final
                   training and the compute

The loop writes them once (ideal.run.summary computes the summary); the command line and the reports
only read them, so no module re-derives "was round 1 the probe?" or spells a key by hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

# what a round was, in the words the console and the report use
KIND_D0 = "D0"
KIND_PROBE = "uniform probe"
KIND_FINAL = "final"  # RUN/final/: the returned mixture trained with the run's own recipe


@dataclass(frozen=True)
class UpdateRecord:
    """How a round's mixture followed from an earlier round (mixture.json's "update")."""

    rule: str
    from_round: int
    step: float | None = None
    beta_realised: dict[str, float] = field(default_factory=dict)
    probe: bool = False  # round 1 under update.first_round uniform
    details: dict[str, Any] = field(default_factory=dict)  # requested, beta, constraints, ...

    def to_json(self) -> dict[str, Any]:
        core = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "details"}
        return {**self.details, **core}

    @classmethod
    def from_json(cls, data: dict[str, Any], round_: int) -> UpdateRecord:
        """A stored record; one written before `from_round` existed started from round K-1."""
        names = {f.name for f in fields(cls)} - {"details"}
        core = {k: v for k, v in data.items() if k in names}
        core.setdefault("from_round", round_ - 1)
        core.setdefault("rule", "ideal")
        return cls(**core, details={k: v for k, v in data.items() if k not in names})


@dataclass(frozen=True)
class RoundRecord:
    """One round of summary.json."""

    round: int
    kind: str  # D0 | uniform probe | the rule's name (ideal, uniform, ...)
    from_round: int | None  # the round its update started from (None for D0)
    volumes: dict[str, int]
    test_accuracy: dict[str, float | None]
    test_accuracy_mean: float | None
    test_accuracy_worst: float | None
    reference_loss: dict[str, float | None]
    reference_loss_mean: float
    test_loss: dict[str, float | None] = field(default_factory=dict)  # held out, like accuracy
    test_loss_mean: float | None = None
    test_loss_worst: float | None = None  # the largest capability's test loss
    reference_accuracy: dict[str, float | None] = field(default_factory=dict)
    reference_accuracy_mean: float | None = None
    predicted_reference_loss_change: float | None = None
    realised_reference_loss_change: float | None = None
    seconds: dict[str, float | None] = field(default_factory=dict)
    # an IDEAL update: per domain the sensitivity, its standard error, z and what the step used
    direction: dict[str, dict[str, float | None]] | None = None
    # a candidate step (update.candidates): one row per candidate, the radius before and after
    candidates: list[dict[str, Any]] | None = None
    scale: float | None = None
    scale_next: float | None = None
    # update.rescore: the first sample's cap (copies a domain) when its noise moved nothing and
    # the direction is every copy's
    rescored_from: int | None = None

    @property
    def shares(self) -> dict[str, float]:
        total = sum(self.volumes.values())
        return {d: v / total if total else 0.0 for d, v in self.volumes.items()}

    def describe(self) -> str:
        """What the round was, in a few words: D0, the uniform probe, an IDEAL step from round K."""
        if self.kind in (KIND_D0, KIND_PROBE):
            return self.kind
        if self.kind == KIND_FINAL:
            return f"round {self.round}'s mixture trained with the run's recipe"
        return f"{self.kind} step from round {self.from_round}"


@dataclass(frozen=True)
class Compute:
    """The whole run's seconds: its rounds per stage (train, influence, eval, proxy), the final
    training and its evaluation (with `search:`), and the unit of `cost_in_sfts`: one SFT with
    the run's recipe, the final training's seconds, else round 0's (D0)."""

    rounds: dict[str, float]
    final: dict[str, float] = field(default_factory=dict)
    sft_seconds: float | None = None
    sft: str = ""  # what the unit is: "final training" | "round 0 training"
    trainings: int = 0  # models trained: every round, every candidate, the final training

    @property
    def total(self) -> float:
        return sum(self.rounds.values()) + sum(self.final.values())

    @property
    def cost_in_sfts(self) -> float | None:
        return self.total / self.sft_seconds if self.sft_seconds else None

    def to_json(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "final": self.final,
            "total": self.total,
            "sft_seconds": self.sft_seconds,
            "sft": self.sft,
            "cost_in_sfts": self.cost_in_sfts,
            "trainings": self.trainings,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Compute:
        return cls(data["rounds"], data.get("final") or {}, data.get("sft_seconds"),
                   data.get("sft", ""), data.get("trainings", 0))  # fmt: skip


@dataclass(frozen=True)
class RunSummary:
    """RUN/summary.json."""

    rounds: list[RoundRecord]
    select: str
    selected_round: int | None
    probe_round: int | None = None  # the round that was the uniform probe
    continued_from: int | None = None  # after the probe: the round the IDEAL updates went on from
    search: str | None = None  # the search recipe in words (`search:`); None: the run's recipe
    final: RoundRecord | None = None  # with `search:`: RUN/final/, once trained and evaluated
    compute: Compute | None = None
    stopped: str | None = None  # why the rounds ended before `rounds` (an update that kept none)

    def to_json(self) -> dict[str, Any]:
        return {
            "rounds": [asdict(r) for r in self.rounds],
            "select": self.select,
            "selected_round": self.selected_round,
            "probe_round": self.probe_round,
            "continued_from": self.continued_from,
            "search": self.search,
            "final": None if self.final is None else asdict(self.final),
            "compute": None if self.compute is None else self.compute.to_json(),
            "stopped": self.stopped,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSummary:
        names = {f.name for f in fields(RoundRecord)}
        rounds = []
        for entry in data["rounds"]:
            entry = {k: v for k, v in entry.items() if k in names}
            k = entry["round"]
            entry.setdefault("kind", KIND_D0 if k == 0 else "ideal")
            entry.setdefault("from_round", None if k == 0 else k - 1)
            rounds.append(RoundRecord(**entry))
        final, compute = data.get("final"), data.get("compute")
        return cls(
            rounds,
            data.get("select", "last"),
            data.get("selected_round"),
            data.get("probe_round"),
            data.get("continued_from"),
            data.get("search"),
            None
            if final is None
            else RoundRecord(**{k: v for k, v in final.items() if k in names}),
            None if compute is None else Compute.from_json(compute),
            data.get("stopped"),
        )

    @property
    def selected(self) -> RoundRecord | None:
        if self.selected_round is None:
            return None
        return next(r for r in self.rounds if r.round == self.selected_round)

    def probe_note(self) -> str | None:
        """A line saying that round 1 was the uniform probe and where the IDEAL updates went on."""
        if self.probe_round is None or self.continued_from is None:
            return None
        chosen = (
            f"round {self.probe_round} (uniform)"
            if self.continued_from == self.probe_round
            else "round 0 (D0)"
        )
        return (
            f"round {self.probe_round} is the uniform probe (update.first_round); the IDEAL "
            f"updates went on from {chosen}, the lower mean reference loss"
        )
