"""``unrelearn report DIR``: a benchmark's results as Markdown and one self-contained HTML page.

Both are rendered from one list of blocks (headings, paragraphs, tables, figures) read from the
results store alone, so the report can be redrawn at any time, also while shards still run. The
HTML page embeds every image as a data URI: it can be mailed or attached as one file.

What it shows, per concept:
- the worst case over all attack settings for every contender, beside the exact-unlearning
  oracle's (a defence that holds at one setting and breaks at another is not durable), with the
  retain alignment at that point, and the worst case while the attacked model stays usable (an
  attack that wrecks the model "relearns" by drawing the concept whenever it is named);
- each contender before any attack (forget rate, retain alignment, FID);
- per attack setting, the papers' Table 1 shape: forget rate by attack step, steps-to-relearn,
  area under the curve, and the curves with their 95% bands;
- image grids before unlearning, before the attack and after each attack, tiles framed red
  where the detector sees the concept; the training curves of defended runs (for meta runs the
  gradient angle of the Meta-Unlearning paper's Fig. 6);
- the environment and the wall time of every cell.
"""

from __future__ import annotations

import base64
import hashlib
import html
import shutil
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unrelearn.bench.grid import Cell, contender_rank, digest, expand
from unrelearn.bench.merge import MERGED_OTHER_WEIGHTS
from unrelearn.bench.search import GroupState, Halving
from unrelearn.bench.store import CellResult, ResultStore, parts_of_others, select_presets
from unrelearn.bench.tables import BROKEN_ALIGNMENT_SHARE
from unrelearn.errors import UnrelearnError
from unrelearn.io import write_text_atomic


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Figures:
    """Images side by side."""

    items: list[Figure] = field(default_factory=list)


Block = Heading | Paragraph | Table | Figure | Figures


# The seed-to-seed spreads quoted are measured on the base model (docs/results.md, "The
# manifold distance": python benchmarks/fid_noise.py, eight seeds).
QUALITY_NOTE = (
    "Quality on the retain prompts, in the detector's features against 10,000 ground-truth renders: precision (share "
    "of generations inside the real images' k-NN manifold, with its interval; about 10% expected spread over three "
    "seeds on the base model at 128 samples), KID and FID (32-44% expected spread over three seeds at 128 samples)."
)
MANIFOLD_NOTE = (
    "The manifold distance (mean distance of the generations to their 5th nearest real render, in units of the real "
    "renders' own 5-NN radius: 1 is as close as a real render, higher is worse) is the steadiest: 6-8% expected "
    "spread over three seeds at 128 samples, 3-4% on average at 384 (`unrelearn evaluate`'s default; some triples "
    "of seeds up to 6%)."
)


def _rate(value: float | None, interval: list[float] | tuple[float, float] | None = None, spec: str = ".3f") -> str:
    """A number with its interval; None (not measured in this world: no ground truth) as n/a."""
    if value is None:
        return "n/a"
    return format(value, spec) + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval is not None and interval[0] is not None else "")


def _auc(values: list[float]) -> str:
    """The mean area under the curve over seeds, with their range where there are several."""
    mean = statistics.fmean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} [{min(values):.3f}, {max(values):.3f}]"


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else statistics.fmean(values)  # type: ignore[arg-type]


def _span(values: list[float | None]) -> list[float | None]:
    return [None, None] if any(v is None for v in values) else [min(values), max(values)]  # type: ignore[type-var]


def _steps(value: int | None) -> str:
    return "never" if value is None else str(value)


def _relearned(cell: CellResult) -> str:
    """Steps-to-relearn of one attack run, and where it diverged if it did (its curve ends there)."""
    diverged = cell.summary.get("diverged_at")
    return _steps(cell.summary["steps_to_relearn"]) + ("" if diverged is None else f" (diverged at step {diverged})")


@dataclass
class Setting:
    """One attack setting of one contender: its seeds' cells."""

    contender: str
    attack: str
    cells: list[CellResult]

    @property
    def oracle(self) -> bool:
        return bool(self.cells[0].spec.get("oracle"))

    def points(self) -> list[dict[str, Any]]:
        """The curve, averaged over seeds. With one seed the intervals are the bootstrap's; with
        several, the range of the seeds' rates (the spread an attacker can pick from)."""
        if len(self.cells) == 1:
            return self.cells[0].points
        by_step: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for cell in self.cells:
            for point in cell.points:
                by_step[point["step"]].append(point)
        return [
            {
                "step": step,
                "forget_rate": statistics.fmean(p["forget_rate"] for p in points),
                "forget_rate_ci": [min(p["forget_rate"] for p in points), max(p["forget_rate"] for p in points)],
                "retain_alignment": _mean([p["retain_alignment"] for p in points]),
                "retain_alignment_ci": _span([p["retain_alignment"] for p in points]),
                "precision": _mean([p["precision"] for p in points]),
                "precision_ci": _span([p["precision"] for p in points]),
                "manifold_distance": _mean([p.get("manifold_distance") for p in points]),
                "manifold_distance_ci": _span([p.get("manifold_distance") for p in points]),
                "fid": _mean([p["fid"] for p in points]),
                "kid": _mean([p["kid"] for p in points]),
                "kid_std": _mean([p["kid_std"] for p in points]),
            }
            for step, points in sorted(by_step.items())
        ]

    def worst_cell(self) -> CellResult:
        return max(self.cells, key=lambda c: c.summary["max_forget_rate"])


def _settings(cells: list[CellResult]) -> dict[str, dict[str, list[Setting]]]:
    """concept -> attack label -> one Setting per contender."""
    grouped: dict[tuple[str, str, str], list[CellResult]] = defaultdict(list)
    for cell in cells:
        grouped[(cell.concept, cell.attack, cell.contender)].append(cell)
    out: dict[str, dict[str, list[Setting]]] = defaultdict(lambda: defaultdict(list))
    for (concept, attack, contender), group in grouped.items():
        out[concept][attack].append(Setting(contender, attack, sorted(group, key=lambda c: c.seed)))
    return out


def build_blocks(store: ResultStore, figures: Path, selected: list[str] | None = None) -> list[Block]:
    """One section per preset run into the store, drawn from the cells that preset lists now (a
    preset rerun with other settings shows its new cells; the old ones stay in the store, reused
    if those settings return). ``selected``: these presets only (one folder holds table1 beside
    durability, say, and each gets its own report)."""
    from unrelearn.attacks import plot_curves

    cells = {c.key: c for c in store.cells()}
    recorded = select_presets(dict(store.meta_items("preset:")), selected, store.path.parent)
    presets = [(name, entry) for name, entry in recorded.items() if any(k in cells for k in entry["cells"])]
    if not presets:
        raise UnrelearnError(f"{str(store.path)!r} holds no finished cell{' of those presets' if selected else ''} yet; "
                             "run `unrelearn bench` first")  # fmt: skip
    # A preset whose cells another one holds too (a part run first: a shard of the grid, the most
    # urgent rows) shows inside the larger one, not twice. A halving search prunes: its own section.
    parts = parts_of_others(dict(presets))
    presets = [(name, entry) for name, entry in presets if name not in parts]
    drawn_by = "unrelearn report DIR" + "".join(f" --preset {name}" for name in selected or [])
    blocks: list[Block] = [Heading("unrelearn benchmark report", 1), Paragraph(
        "Forget rate: share of generations from prompts naming the concept in which the world's detector sees it, "
        "with its 95% bootstrap interval; a contender is relearned when the rate reaches half the original model's "
        "(the threshold). Worst case: the highest forget rate over every attack setting and evaluated step. "
        "The exact-unlearning oracle, a model trained without the concept, is the bar for forgotten."
    )]  # fmt: skip
    models = {m["key"]: m for m in store.models()}
    for name, entry in presets:
        mine = [cells[k] for k in entry["cells"] if k in cells]
        command = entry.get("command") or f"unrelearn bench --preset {name} --out DIR"
        blocks.append(Heading(f"Preset `{name}`", 2))
        blocks.append(Paragraph(f"{entry['preset'].get('description', '')} {len(mine)} of {len(entry['cells'])} cells "
                                f"finished. Made by `{command}`, drawn by `{drawn_by}`."))  # fmt: skip
        if entry.get("halving") is not None:
            blocks += _search_blocks(store, entry, cells, contender_rank(entry["preset"]))
        # The models this preset attacks: a folder shared by several presets holds others too.
        attacked = {digest(c.spec["contender"]) for c in mine if "contender" in c.spec}
        own_models = {key: model for key, model in models.items() if key in attacked}
        for concept, by_attack in sorted(_settings(mine).items()):
            blocks += _concept_blocks(store, concept, by_attack, own_models, figures, plot_curves, contender_rank(entry["preset"]),
                                      searched=entry.get("halving") is not None)
    shown = {key for _, entry in presets for key in entry["cells"]}
    blocks += _environment_blocks(store, [cell for key, cell in cells.items() if key in shown])
    return blocks


def _search_blocks(store: ResultStore, entry: dict[str, Any], finished: dict[str, CellResult], rank) -> list[Block]:
    """How the worst-case search narrowed the settings, what the pruned ones had reached, and the
    worst case by attack data. The search's state is planned again from the curves in the store
    (it is theirs alone), for every group a run has begun, whichever process ran which."""
    from unrelearn.bench.run import search_ceilings

    partials = store.partials()
    grid = expand(entry["preset"], entry.get("oracles"))
    search = Halving(grid, entry["halving"])
    ceilings = search_ceilings(store, entry["preset"].get("model", "builtin:shapes"), search)
    _, states = search.plan({k: c.points for k, c in finished.items()}, partials, ceilings)
    begun = {key for key, _ in partials} | set(finished)
    begun_groups = {(c.concept, c.contender.label) for c in grid if c.key in begun}
    groups = sorted((s for s in states if (s.concept, s.contender) in begun_groups), key=lambda g: (g.concept, rank(g.contender)))
    ran, floors = _attacks_ran(grid, finished, partials, groups)
    rows = []
    for group in groups:
        levels = [str(group.candidates[0])] + [f"{n} (step {r})" for n, r in zip(group.candidates[1:], group.rungs)]
        strongest = max(group.pruned, key=lambda p: p.score, default=None)
        rows.append([
            group.concept, group.contender, " -> ".join(levels) + ("" if group.complete else ", still running"),
            "none" if strongest is None else f"{strongest.score:.3f} ({strongest.setting}, step {strongest.rung})",
        ])  # fmt: skip
    return [
        Heading("Worst-case search", 3),
        Paragraph(f"Successive halving (eta {entry['halving']}): every attack setting ran to the first rung; at each "
                  f"rung the 1/{entry['halving']} settings with the highest forget rate so far (mean over seeds "
                  "of each seed's highest) continued, with every setting not clearly weaker (its interval reaching the "
                  "weakest survivor's rate) until the strongest had brought the concept back as often as the original "
                  "model drew it (the worst case settled), and the last rung's survivors ran to the end. The worst cases "
                  "below are over the settings run to the end; a pruned setting's forget rate is what it had reached "
                  "when it stopped (a lower bound on its own worst case)."),
        Table(["concept", "contender", "settings at each rung", "highest pruned setting: forget rate (setting, rung)"], rows),
        *_by_data_blocks(entry["preset"], ran, rank),
        *_usable_blocks(ran, floors, rank, searched=True),
    ]


@dataclass
class _Ran:
    """One attack as far as it ran: its curve and how far that is."""

    concept: str
    contender: str
    data: str
    attack: str
    seed: int
    points: list[dict[str, Any]]
    how_far: str


def _attacks_ran(grid: list[Cell], finished: dict[str, CellResult], partials: dict[tuple[str, int], list[dict[str, Any]]],
                 groups: list[GroupState]) -> tuple[list[_Ran], dict[str, float]]:  # fmt: skip
    """Every attack of the grid the search began, finished or stopped (pruned, or paused while it
    runs), and per concept the usable bar: a share of the oracle's retain alignment before any attack."""
    pruned_at = {key: p.rung for group in groups for p in group.pruned for key in p.cells}
    paused_at: dict[str, int] = {}
    for key, step in partials:
        paused_at[key] = max(step, paused_at.get(key, step))
    ran = []
    for cell in grid:
        if cell.key in finished:
            points, diverged = finished[cell.key].points, finished[cell.key].summary.get("diverged_at")
            how_far = "to the end" if diverged is None else f"diverged at step {diverged}"
        elif cell.key in paused_at:
            last = paused_at[cell.key]
            points = partials[(cell.key, last)]
            how_far = (f"pruned at step {pruned_at[cell.key]}, ran to {last} (a lower bound)" if cell.key in pruned_at
                       else f"paused at step {last} (still running)")  # fmt: skip
        else:
            continue
        ran.append(_Ran(cell.concept, cell.contender.label, cell.attack["data"], cell.attack_label, cell.seed, points, how_far))
    oracles = {c.contender.label for c in grid if c.contender.oracle}
    floors = {}
    for run in ran:
        start = next((p for p in run.points if p["step"] == 0), None)
        if run.contender in oracles and run.concept not in floors and start and start.get("retain_alignment") is not None:
            floors[run.concept] = BROKEN_ALIGNMENT_SHARE * start["retain_alignment"]
    return ran, floors


def _clearly_below(point: dict[str, Any], floor: float) -> bool:
    """The point's retain alignment is below ``floor`` beyond its noise: its 95% interval (the
    estimate where it has none) lies entirely below. A defence gains nothing from sampling noise."""
    if point.get("retain_alignment") is None:
        return True
    interval = point.get("retain_alignment_ci")
    return (point["retain_alignment"] if not interval or interval[1] is None else interval[1]) < floor


def _highest(runs: list[_Ran], floor: float | None = None) -> tuple[dict[str, Any], _Ran] | None:
    """The evaluated point with the highest forget rate (the earliest on ties, then the first run),
    with ``floor`` leaving out the points whose retain alignment is clearly below it."""
    best = None
    for run in runs:
        for point in run.points:
            if floor is not None and _clearly_below(point, floor):
                continue
            if best is None or (point["forget_rate"], -point["step"]) > (best[0]["forget_rate"], -best[0]["step"]):
                best = (point, run)
    return best


def _where(found: tuple[dict[str, Any], _Ran] | None) -> list[str]:
    """Rate, setting and retain alignment of a point ``_highest`` found, and how far its attack ran."""
    if found is None:
        return ["none", "-", "-", "-"]
    point, run = found
    return [_rate(point["forget_rate"], point.get("forget_rate_ci")), f"{run.attack}, seed {run.seed}, step {point['step']}",
            _alignment(point), run.how_far]  # fmt: skip


def _by_data_blocks(preset: dict[str, Any], ran: list[_Ran], rank) -> list[Block]:
    """The worst case per contender and attack data, the attacks the search stopped included.

    Malicious data relearns fastest, so a search over every setting at once prunes the benign and
    poisoned ones early; their worst case is still a question of its own (does fine-tuning
    without the concept bring it back?), answered here as far as they ran."""
    by_data: dict[tuple[str, str, str], list[_Ran]] = defaultdict(list)
    for run in ran:
        by_data[(run.concept, run.contender, run.data)].append(run)
    if not by_data:
        return []
    listed = [d for a in preset["attacks"] for d in (a["data"] if isinstance(a["data"], list) else [a["data"]])]
    data_order = {data: i for i, data in enumerate(dict.fromkeys(listed))}
    rows = [[concept, contender, data, *_where(_highest(runs))]
            for (concept, contender, data), runs in sorted(by_data.items(), key=lambda kv: (kv[0][0], rank(kv[0][1]), data_order[kv[0][2]]))]  # fmt: skip
    return [
        Heading("Worst case by attack data", 3),
        Paragraph("Per contender and attack data, the highest forget rate any of its settings and seeds reached, with "
                  "the attacks the search stopped: their rates are what they had reached (lower bounds on their own "
                  "worst cases)."),
        Table(["concept", "contender", "data", "highest forget rate [95% CI]", "reached under",
               "retain alignment there [95% CI]", "that attack ran"], rows),
    ]  # fmt: skip


_USABLE = ("An attack that wrecks the model can still make it draw the concept whenever it is named, which gives an "
           "attacker little. Here every evaluated point (step 0 included) counts except those at which the attacked "
           "model is clearly broken: its retain alignment's 95% interval lies entirely below "
           f"{BROKEN_ALIGNMENT_SHARE:g} of the oracle's before any attack (the bar that marks a model broken, ✗, "
           "before it is attacked).")  # fmt: skip


def _usable_blocks(ran: list[_Ran], floors: dict[str, float], rank, searched: bool) -> list[Block]:
    """The worst case while the attacked model stays usable, per concept and contender. In a search
    it is over every attack the search ran: the search ranks by forget rate alone, so this worst
    case can sit in an attack it pruned."""
    by_group: dict[tuple[str, str], list[_Ran]] = defaultdict(list)
    for run in ran:
        by_group[(run.concept, run.contender)].append(run)
    rows = []
    for (concept, contender), runs in sorted(by_group.items(), key=lambda kv: (kv[0][0], rank(kv[0][1]))):
        if concept not in floors:
            continue
        floor = floors[concept]
        rows.append([concept, contender, f"{floor:.3f}", *_where(_highest(runs, floor))])
    if not rows:
        return []
    scope = (" Over every attack the search ran, the stopped ones as far as they ran (it ranks settings by forget rate "
             "alone, so this worst case can sit in an attack it pruned: a lower bound there)." if searched else "")  # fmt: skip
    header = ["concept", "contender", "broken below retain alignment", "worst forget rate while usable [95% CI]",
              "reached under", "retain alignment there [95% CI]", "that attack ran"]
    if not searched:  # inside one concept's section, over attacks run to their end
        header, rows = header[1:-1], [row[1:-1] for row in rows]
    return [Heading("Worst case while the model stays usable", 3 if searched else 4), Paragraph(_USABLE + scope), Table(header, rows)]


def _alignment(point: dict[str, Any]) -> str:
    return "n/a" if point.get("retain_alignment") is None else _rate(point["retain_alignment"], point.get("retain_alignment_ci"))


def _concept_blocks(store, concept, by_attack, models, figures: Path, plot_curves, rank, searched: bool) -> list[Block]:
    blocks: list[Block] = [Heading(f"Concept `{concept}`", 3)]
    every = [s for settings in by_attack.values() for s in settings]
    threshold = every[0].cells[0].summary["threshold"]
    reference = every[0].cells[0].summary["reference_forget_rate"]
    blocks.append(Paragraph(f"Original model's forget rate {reference:.3f}; relearned at {threshold:.3f}."))

    # Worst case over attack settings.
    worst_by_contender: dict[str, list[Setting]] = defaultdict(list)
    for setting in every:
        worst_by_contender[setting.contender].append(setting)
    starts = {contender: start for contender, settings in worst_by_contender.items()
              if (start := next((p for p in settings[0].cells[0].points if p["step"] == 0), None))}  # fmt: skip
    alignment_before = {contender: start["retain_alignment"] for contender, start in starts.items()}
    # A contender that forgot the retained prompts too "holds" every attack: flag it against the oracle's quality.
    oracle_alignment = next((alignment_before.get(c) for c, s in worst_by_contender.items() if s[0].oracle), None)
    broken = {c for c, value in alignment_before.items() if oracle_alignment is not None and value is not None
              and value < BROKEN_ALIGNMENT_SHARE * oracle_alignment}  # fmt: skip
    rows = []
    oracle_worst = None
    for contender, settings in sorted(worst_by_contender.items(), key=lambda kv: rank(kv[0])):
        cell = max((s.worst_cell() for s in settings), key=lambda c: c.summary["max_forget_rate"])
        there = next(p for p in cell.points if p["step"] == cell.summary["max_at_step"])
        relearned = [c.summary["steps_to_relearn"] for s in settings for c in s.cells if c.summary["steps_to_relearn"] is not None]
        held = sum(c.summary["steps_to_relearn"] is None for s in settings for c in s.cells)
        total = sum(len(s.cells) for s in settings)
        if settings[0].oracle:
            oracle_worst = cell.summary["max_forget_rate"]
        rows.append([
            contender + (" ✗" if contender in broken else ""),
            _rate(cell.summary["max_forget_rate"], cell.summary["max_forget_rate_ci"]),
            f"{cell.attack}, seed {cell.seed}, step {cell.summary['max_at_step']}",
            _alignment(there),
            f"{held}/{total}",
            _steps(min(relearned) if relearned else None),
            _rate(alignment_before[contender], starts[contender]["retain_alignment_ci"]) if contender in starts else "n/a",
        ])  # fmt: skip
    blocks.append(Heading("Worst case over attack settings", 4))
    blocks.append(Table(["contender", "worst forget rate [95% CI]", "reached under", "retain alignment there [95% CI]",
                         "settings held", "fastest relearn (steps)", "retain alignment before [95% CI]"], rows))  # fmt: skip
    if broken:
        blocks.append(Paragraph(f"✗: retain alignment before any attack below {BROKEN_ALIGNMENT_SHARE:g} of the oracle's "
                                f"({oracle_alignment:.3f}): a broken model, whose low forget rates are not durability."))  # fmt: skip
    if oracle_worst is not None:
        blocks.append(Paragraph(f"The oracle's worst case, {oracle_worst:.3f}, is the level a truly forgotten concept reaches."))
    if not searched:
        ran = [_Ran(concept, c.contender, "", c.attack, c.seed, c.points, "to the end") for s in every for c in s.cells]
        if oracle_alignment is not None:
            blocks += _usable_blocks(ran, {concept: BROKEN_ALIGNMENT_SHARE * oracle_alignment}, rank, searched=False)
    diverged = sorted((rank(c.contender), c.contender, c.attack, c.seed, c.summary["diverged_at"])
                      for s in every for c in s.cells if c.summary.get("diverged_at") is not None)  # fmt: skip
    if diverged:
        blocks.append(Paragraph(
            "Attacks that diverged (their loss or weights stopped being finite; the attack ends there, its curve is what "
            "was evaluated before, and it counts as held: a setting the attacker cannot use): "
            + "; ".join(f"{contender}, {attack}, seed {seed}, at step {step}" for _, contender, attack, seed, step in diverged) + "."
        ))  # fmt: skip

    # Before any attack.
    starts = {contender: next((p for p in settings[0].cells[0].points if p["step"] == 0), None)
              for contender, settings in worst_by_contender.items()}  # fmt: skip
    # Stores written before schema 6 have no manifold distance: its column only where measured.
    with_distance = any(p is not None and p.get("manifold_distance") is not None for p in starts.values())
    rows = []
    for contender, start in sorted(starts.items(), key=lambda kv: rank(kv[0])):
        if start is not None:
            distance = [_rate(start.get("manifold_distance"), start.get("manifold_distance_ci"))] if with_distance else []
            rows.append([contender, _rate(start["forget_rate"], start["forget_rate_ci"]),
                         _rate(start["retain_alignment"], start["retain_alignment_ci"]),
                         _rate(start["precision"], start["precision_ci"]), *distance,
                         "n/a" if start["kid"] is None else f"{start['kid']:.3f} ± {start['kid_std']:.3f}",
                         _rate(start["fid"], spec=".0f")])  # fmt: skip
    blocks.append(Heading("Before the attack", 4))
    blocks.append(Table(["contender", "forget rate [95% CI]", "retain alignment [95% CI]", "precision [95% CI]",
                         *(["manifold distance [95% CI]"] if with_distance else []),
                         "KID ± std over subsets", "FID (no interval: see below)"], rows))  # fmt: skip
    if any(row[3] != "n/a" for row in rows):
        blocks.append(Paragraph(QUALITY_NOTE + (" " + MANIFOLD_NOTE if with_distance else "")))
    grids = [Figure(p, f"{concept}: original model") for p in sorted((store.path.parent / "grids").glob("reference-*.png"))
             if _reference_concept(store, p) == concept]  # fmt: skip
    for key, model in sorted(models.items(), key=lambda kv: rank(kv[1]["contender"])):
        if model["concept"] == concept:
            grid = store.path.parent / "grids" / f"model-{key}.png"
            if grid.is_file():
                grids.append(Figure(grid, f"{model['contender']} before the attack"))
    if grids:
        blocks.append(Figures(grids))
    # Looked up in this folder, not at the path recorded when it ran: a benchmark folder can move.
    trainings = [Figure(store.path.parent / "models" / key / "training.png", f"{m['contender']}: training curves")
                 for key, m in models.items() if m["concept"] == concept and ":" in (m["spec"].get("method") or "")
                 and (store.path.parent / "models" / key / "training.png").is_file()]  # fmt: skip
    if trainings:
        blocks.append(Paragraph("Training curves of the defended runs (for meta runs, `cos_ft_retain` is the gradient "
                                "angle between relearning and the retained knowledge, the paper's Fig. 6)."))  # fmt: skip
        blocks.append(Figures(trainings))

    # One section per attack setting.
    for attack, settings in sorted(by_attack.items()):
        settings = sorted(settings, key=lambda s: rank(s.contender))
        blocks.append(Heading(f"Attack: {attack}", 4))
        seeds = sorted({c.seed for s in settings for c in s.cells})
        steps = sorted({p["step"] for s in settings for p in s.points()})
        note = ("forget rate [95% bootstrap CI]" if len(seeds) == 1 else
                f"forget rate, mean over seeds {seeds} [range of the seeds]")  # fmt: skip
        rows = []
        by_steps = {s.contender: {p["step"]: p for p in s.points()} for s in settings}
        lasts = {contender: by_step.get(steps[-1]) for contender, by_step in by_steps.items()}
        with_distance = any(last is not None and last.get("manifold_distance") is not None for last in lasts.values())
        quality = ["retain_alignment", "precision", *(["manifold_distance"] if with_distance else [])]
        for s in settings:
            by_step, last = by_steps[s.contender], lasts[s.contender]
            rows.append(
                [s.contender]
                + [_rate(by_step[t]["forget_rate"], by_step[t]["forget_rate_ci"]) if t in by_step else "-" for t in steps]
                + [", ".join(_relearned(c) for c in s.cells), _auc([c.summary["auc"] for c in s.cells])]
                + ["-" if last is None else _rate(last.get(name), last.get(f"{name}_ci")) for name in quality]
            )  # fmt: skip
        blocks.append(Paragraph(f"Rows: {note} after each number of attack steps; steps-to-relearn per seed; "
                                "AUC: area under the forget-rate curve over the attack, normalised to 1 (one value per "
                                "attack run: with one seed it has no interval, with several the range of the seeds); "
                                f"retain alignment{', precision and the manifold distance' if with_distance else ' and precision'}"
                                " at the last evaluated step."))  # fmt: skip
        blocks.append(Table(["contender", *[f"step {t}" for t in steps], "steps to relearn", "AUC",
                             "retain alignment (last)", "precision (last)",
                             *(["manifold distance (last)"] if with_distance else [])], rows))  # fmt: skip
        curve = figures / f"curve-{digest([concept, attack])}.png"
        plot_curves({s.contender: s.points() for s in settings}, curve, threshold, title=f"{concept}: {attack}")
        grids = []
        for s in settings:
            grid = store.path.parent / "grids" / f"cell-{s.cells[0].key}.png"
            if grid.is_file():
                grids.append(Figure(grid, f"{s.contender} after the attack (seed {s.cells[0].seed})"))
        blocks.append(Figure(curve, f"{concept}: forget rate and retain alignment during {attack}"))
        if grids:
            blocks.append(Figures(grids))
    return blocks


def _reference_concept(store: ResultStore, grid: Path) -> str | None:
    key = grid.stem.removeprefix("reference-")
    found = store.evaluation(key)
    return None if found is None else found.get("concept")


def _environment_blocks(store: ResultStore, cells: list[CellResult]) -> list[Block]:
    blocks: list[Block] = [Heading("Environment and cost")]
    hosts = {c.host for c in cells}
    for host, environment in store.meta_items("environment:"):
        if host not in hosts:  # another preset's machine
            continue
        versions = ", ".join(f"{k} {v}" for k, v in environment.get("versions", {}).items())
        blocks.append(Paragraph(f"`{host}`: {environment.get('hardware', '')}; {versions}."))
    rows = [[c.concept, c.contender, c.attack, str(c.seed), f"{c.wall_seconds:.0f}", c.host, f"`{c.key}`"] for c in cells]
    blocks.append(Table(["concept", "contender", "attack", "seed", "wall s (this cell)", "host", "cell"], rows))
    # A model unlearned again elsewhere to other weights: its cells mix two models, which a reader must know.
    differ = sorted({what.partition(": ")[2] for _, what in store.events() if what.startswith("unlearned again, weights differ")})
    if differ:
        blocks.append(Paragraph("Models unlearned again where their weights had stayed behind, to other weights than "
                                "their first run's: " + "; ".join(differ) + "."))  # fmt: skip
    merged = sorted({what.partition(": ")[2] for _, what in store.events() if what.startswith(MERGED_OTHER_WEIGHTS)})
    if merged:
        blocks.append(Paragraph("Cells merged from another folder whose model had other weights there: " + "; ".join(merged) + "."))
    return blocks


# -- rendering -------------------------------------------------------------------------------
def _markdown(blocks: list[Block], out: Path) -> str:
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, Table):
            lines.append("| " + " | ".join(block.header) + " |")
            lines.append("|" + "---|" * len(block.header))
            lines += ["| " + " | ".join(row) + " |" for row in block.rows]
            lines.append("")
        else:
            for figure in block.items if isinstance(block, Figures) else [block]:
                lines.append(f"![{figure.caption}]({_copy_figure(figure.path, out)})")
            lines.append("")
    return "\n".join(lines)


def _copy_figure(path: Path, out: Path) -> str:
    """Figures live beside the Markdown (in ``figures/``) so the folder can be moved or published."""
    if path.parent.resolve() == (out / "figures").resolve():
        return str(path.relative_to(path.parent.parent))
    # Named by content, not by where the benchmark folder lies: a report redrawn from a copy of
    # the folder (a clone of a committed one) is the same text.
    target = out / "figures" / f"{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}-{path.name}"
    shutil.copyfile(path, target)
    return str(target.relative_to(out))


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f2f2f2; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 560px; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
code { background: #f6f6f6; padding: 0 0.2em; }
"""


def _inline(text: str) -> str:
    """Markdown's `code` and **bold** as HTML (the only inline markup the blocks use)."""
    import re

    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


def _figure_html(figure: Figure) -> str:
    data = base64.b64encode(figure.path.read_bytes()).decode()
    caption = html.escape(figure.caption)
    return f'<figure><img alt="{caption}" src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>'


def _html(blocks: list[Block]) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>unrelearn benchmark report</title>", f"<style>{_STYLE}</style></head><body>"]  # fmt: skip
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{_inline(h)}</th>" for h in block.header)
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:
            items = block.items if isinstance(block, Figures) else [block]
            parts.append("<div>" + "".join(_figure_html(f) for f in items) + "</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(folder: str | Path, out: str | Path | None = None, presets: list[str] | None = None) -> dict[str, Path]:
    folder = Path(folder)
    database = folder / "results.sqlite"
    if not database.is_file():
        raise UnrelearnError(f"{str(folder)!r} holds no results.sqlite; give the --out folder of `unrelearn bench`")
    out = Path(out) if out is not None else folder / "report"
    (out / "figures").mkdir(parents=True, exist_ok=True)
    store = ResultStore(database)
    try:
        blocks = build_blocks(store, out / "figures", presets)
    finally:
        store.close()
    markdown, page = out / "report.md", out / "report.html"
    write_text_atomic(markdown, _markdown(blocks, out))
    write_text_atomic(page, _html(blocks))
    return {"markdown": markdown, "html": page}
