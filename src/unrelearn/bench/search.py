"""A worst-case search over attack settings by successive halving (Jamieson & Talwalkar, 2016).

The adaptive grid has hundreds of attack settings per model, each a 1,000-step fine-tuning: the
worst case over all of them is what a durable defence must survive, and most of its cost goes to
settings that are obviously not the worst. An attacker tuning their fine-tuning would not run
them to the end either. Per concept and contender, every setting (all its seeds) runs to the
first rung, an evaluated step; the ``1/eta`` settings with the highest forget rate so far (mean
over seeds of each seed's highest) continue to the next rung, and so does every setting that
is not clearly weaker (the upper ends of its intervals reach the weakest survivor's rate: early
in an attack on a robust model every rate is near zero, and ranking noise prunes at random);
the survivors of the last rung run to the end. Once a setting has brought the concept back as
often as the original model drew it (the group's score reaches the ``ceiling``, the original's
forget rate), the worst case is settled and the rest is strict halving: at that level the rates
are not noise, and settings tied near the top would otherwise all run to the end. Paused attacks resume from their checkpoints, so a survivor's curve
is exactly the uninterrupted attack's, and a cell finished by the full grid counts at every rung.

What it can miss: a setting that relearns late (a low learning rate) may rank low at the first
rung and be pruned although it would end highest (``benchmarks/halving_replay.py`` measures
this on finished grids). The report names every pruned setting with the forget rate it had
reached; ``eta`` 1 prunes nothing (the full grid).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from unrelearn.bench.grid import Cell, attack_label, digest
from unrelearn.errors import UnrelearnError


@dataclass(frozen=True)
class Work:
    """Run ``cell``'s attack to ``stop_at`` (a rung), or to its end (None)."""

    cell: Cell
    stop_at: int | None


@dataclass
class Pruned:
    setting: str
    rung: int
    score: float
    cells: list[str]


@dataclass
class GroupState:
    """Where the search stands for one concept and contender."""

    concept: str
    contender: str
    rungs: list[int]
    # How many settings reached each level: every one at the first rung, then the survivors; the
    # last entry is the number run (or to be run) to the end.
    candidates: list[int] = field(default_factory=list)
    pruned: list[Pruned] = field(default_factory=list)
    complete: bool = False


def setting_key(cell: Cell) -> str:
    """An attack setting: the attack without its seed (seeds are repeats of one setting)."""
    return digest({"attack": {k: v for k, v in cell.attack.items() if k != "seed"}, "eval_at": list(cell.eval_at)})


def check_eta(eta: int) -> int:
    if isinstance(eta, bool) or not isinstance(eta, int) or eta < 1:
        raise UnrelearnError(f"--halving must be a whole number >= 1 (3 keeps a third of the settings at each rung), got {eta!r}")
    return eta


class Halving:
    def __init__(self, cells: list[Cell], eta: int) -> None:
        self.eta = check_eta(eta)
        groups: dict[tuple[str, str], dict[str, list[Cell]]] = defaultdict(lambda: defaultdict(list))
        for cell in cells:
            groups[(cell.concept, cell.contender.label)][setting_key(cell)].append(cell)
        self.groups = {key: {s: sorted(c, key=lambda c: c.seed) for s, c in settings.items()} for key, settings in groups.items()}

    @staticmethod
    def rungs(settings: dict[str, list[Cell]]) -> list[int]:
        """The evaluated steps every setting of the group shares, strictly inside every attack."""
        cells = [c for group in settings.values() for c in group]
        shortest = min(c.attack["steps"] for c in cells)
        shared = set.intersection(*(set(c.eval_at) for c in cells))
        return sorted(step for step in shared if 0 < step < shortest)

    def cost(self, states: list[GroupState] | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
        """(attack steps, evaluations) of the search and of the full grid. Without ``states``, the
        search's least: every rung prunes to ``1/eta`` (settings that are not clearly weaker
        continue too, so at most it costs the full grid); with the ``states`` of a finished search,
        what it spent. Evaluations at step 0 are shared by all of a model's attacks, not counted."""
        searched, full = [0, 0], [0, 0]
        found = {(s.concept, s.contender): s.candidates for s in states or []}
        for (concept, contender), settings in sorted(self.groups.items()):
            rungs = self.rungs(settings) if self.eta > 1 else []
            cells = [c for group in settings.values() for c in group]
            full[0] += sum(c.attack["steps"] for c in cells)
            full[1] += sum(sum(step > 0 for step in c.eval_at) for c in cells)
            seeds = max(len(group) for group in settings.values())
            alive, reached = len(settings), 0
            for level, rung in enumerate([*rungs, None]):
                if (concept, contender) in found:
                    alive = found[(concept, contender)][level]
                end = rung if rung is not None else max(c.attack["steps"] for c in cells)
                searched[0] += alive * seeds * (end - reached)
                searched[1] += alive * seeds * len({s for c in cells for s in c.eval_at if reached < s <= end})
                alive, reached = math.ceil(alive / self.eta), end
        return (searched[0], searched[1]), (full[0], full[1])

    def plan(
        self, finished: dict[str, list[dict[str, Any]]], partials: dict[tuple[str, int], list[dict[str, Any]]],
        ceilings: dict[str, float] | None = None,
    ) -> tuple[list[Work], list[GroupState]]:
        """What can run now, and each group's state, given the finished cells' curves, the paused
        attacks' curves and, per concept, the original model's forget rate (``ceilings``)."""

        def curve(cell: Cell, rung: int | None) -> list[dict[str, Any]] | None:
            # The paused curve first: the rung was decided on it (a finished cell's curve agrees
            # with it up to the rung, the resumed attack being exact).
            if rung is not None and (cell.key, rung) in partials:
                return partials[(cell.key, rung)]
            return finished.get(cell.key)

        def score(cells: list[Cell], rung: int, bound: int | None = None) -> float:
            """Mean over seeds of each seed's highest forget rate so far (``bound`` 1: of the
            upper ends of its points' intervals, what the setting may have reached)."""

            def value(point: dict[str, Any]) -> float:
                interval = point.get("forget_rate_ci")
                return point["forget_rate"] if bound is None or not interval else interval[bound]

            highs = [max(value(p) for p in curve(c, rung) if p["step"] <= rung) for c in cells]
            return sum(highs) / len(highs)

        ceilings = ceilings or {}
        work: list[Work] = []
        states: list[GroupState] = []
        for (concept, contender), settings in sorted(self.groups.items()):
            rungs = self.rungs(settings) if self.eta > 1 else []
            state = GroupState(concept, contender, rungs)
            candidates = sorted(settings)
            for rung in [*rungs, None]:
                state.candidates.append(len(candidates))
                missing = [c for s in candidates for c in settings[s] if curve(c, rung) is None]
                if missing:
                    work += [Work(c, rung) for c in missing]
                    break
                if rung is None:
                    state.complete = True
                    break
                scores = {s: score(settings[s], rung) for s in candidates}
                ranked = sorted(candidates, key=lambda s: (-scores[s], s))
                keep = math.ceil(len(ranked) / self.eta)
                # A setting continues unless it is clearly weaker: the upper ends of its
                # intervals stay below the weakest survivor's rate. On a model that nothing has
                # relearned yet the rates are noise, and ranking on them prunes at random. A
                # settled worst case (the concept fully back) needs no such care.
                bar = scores[ranked[keep - 1]]
                settled = concept in ceilings and scores[ranked[0]] >= ceilings[concept]
                unclear = [] if settled else [s for s in ranked[keep:] if score(settings[s], rung, bound=1) >= bar]
                survivors = ranked[:keep] + unclear
                state.pruned += [Pruned(attack_label(settings[s][0].attack), rung, scores[s], [c.key for c in settings[s]])
                                 for s in ranked if s not in survivors]  # fmt: skip
                candidates = survivors
            states.append(state)
        return work, states
