"""Paper-shaped tables drawn from a benchmark's results store: rows as JSON, Markdown, figures.

``unrelearn table NAME DIR --out STEM`` writes ``STEM.json`` (a list of rows), ``STEM.md`` and
the curves next to them. Tables register by name; each is built from the cells of the store,
so a table is never a separate computation.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unrelearn.bench.grid import digest
from unrelearn.bench.store import CellResult, ResultStore, parts_of_others, select_presets
from unrelearn.errors import UnrelearnError
from unrelearn.io import write_text_atomic
from unrelearn.metrics import curve_maximum


@dataclass
class TableOutput:
    rows: list[dict[str, Any]]
    markdown: str
    # Figures to draw: file name -> (title, {label: points}).
    curves: dict[str, tuple[str, dict[str, list[dict[str, Any]]]]]


# A builder gets the store's finished cells, the line saying what made them, and the store's
# models (their run.json records: training curves, the meta runs' gradient-angle signal).
Builder = Callable[[list[CellResult], str, list[dict[str, Any]]], TableOutput]
_TABLES: dict[str, Builder] = {}


def register_table(name: str):
    def decorator(builder: Builder):
        _TABLES[name] = builder
        return builder

    return decorator


def table_names() -> list[str]:
    return sorted(_TABLES)


def write_table(name: str, folder: str | Path, out: str | Path, presets: list[str] | None = None) -> dict[str, Any]:
    """Build table ``name`` from the store in ``folder``; write ``out``.json / .md and its figures.
    ``presets``: only the cells of these presets run into the folder (one folder often holds
    several, sharing their models: table1 beside durability), else every cell."""
    from unrelearn.attacks import plot_curves

    if name not in _TABLES:
        raise UnrelearnError(f"unknown table {name!r}; known tables: {', '.join(table_names())}")
    database = Path(folder) / "results.sqlite"
    if not database.is_file():
        raise UnrelearnError(f"{str(folder)!r} holds no results.sqlite; give the --out folder of `unrelearn bench`")
    store = ResultStore(database)
    try:
        cells = store.cells()
        models = store.models()
        recorded = dict(store.meta_items("preset:"))
    finally:
        store.close()
    if presets:
        recorded = select_presets(recorded, presets, folder)
        wanted = {key for entry in recorded.values() for key in entry["cells"]}
        cells = [c for c in cells if c.key in wanted]
    # A preset run as a part of a larger one (the same cells) is made by the larger one's command.
    parts = parts_of_others(recorded)
    commands = sorted({entry.get("command") or f"unrelearn bench --preset {p} --out DIR" for p, entry in recorded.items() if p not in parts})
    if not cells:
        raise UnrelearnError(f"{str(folder)!r} holds no finished cell{' of those presets' if presets else ''} yet; run `unrelearn bench` first")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    selection = "".join(f" --preset {p}" for p in presets or [])
    made = f"Made by {', '.join(f'`{c}`' for c in commands)}, then `unrelearn table {name} {folder} --out {out}{selection}`."
    table = _TABLES[name](cells, made, models)
    # Each row names what regenerates it (a table may be cut out of a larger file by others).
    regenerate = [*commands, f"unrelearn table {name} DIR --out {out}{selection}"]
    table.rows = [row | {"commands": regenerate} for row in table.rows]
    for file_name, (title, curves) in table.curves.items():
        plot_curves(curves, out.parent / file_name, None, title=title)
    write_text_atomic(out.with_suffix(".json"), json.dumps(table.rows, indent=1, sort_keys=True) + "\n")
    write_text_atomic(out.with_suffix(".md"), table.markdown)
    return {"rows": len(table.rows), "json": out.with_suffix(".json"), "markdown": out.with_suffix(".md"),
            "figures": [out.parent / f for f in table.curves]}  # fmt: skip


def _rate(value: float | None, interval: list | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval and interval[0] is not None else "")


def _rate_and_alignment(point: dict[str, Any]) -> str:
    return f"{_rate(point['forget_rate'], point['forget_rate_ci'])} ({_rate(point['retain_alignment'], point.get('retain_alignment_ci'))})"


def _method_and_steps(cell: CellResult) -> tuple[str, int | None, float | None]:
    """The method family, its unlearning steps (the contender's option, else the embedded
    default) and the decay of the weight average it saved (None: its last iterate)."""
    from unrelearn.methods import resolve_method
    from unrelearn.methods.base import build_config

    contender = cell.spec["contender"]
    if cell.spec.get("oracle"):
        return "oracle", None, None
    if contender["method"] is None:
        return "original", None, None
    cls, variant = resolve_method(contender["method"])
    world = "embedded" if contender["model"].startswith("builtin:") else None  # which defaults applied
    config = build_config(cls, world, variant | contender["options"])
    return contender["method"], getattr(config, "steps", None), getattr(config, "ema_decay", None)


# Which column each DiMRA attack fills: the leaked retain set (assumption (i)), the held-out
# split (assumption (ii)), or the original model's generations of retain prompts (Table IV).
_DIMRA_COLUMNS = {"dimra-retain": "dimra_retain", "dimra-aux": "dimra_heldout", "dimra-aux-model": "dimra_model"}


@register_table("dimra")
def dimra_table(cells: list[CellResult], made: str, models: list[dict[str, Any]] | None = None) -> TableOutput:
    """The DiMRA/DiMUM paper's Tables I-IV: per forget class and method (and unlearning length),
    FID, AR and the alternative rate after unlearning, and the maximum AR a DiMRA attack reaches
    (worst case over the attack settings run), with the alternative rate at the attack's end."""
    groups: dict[tuple[str, str], list[CellResult]] = defaultdict(list)
    for cell in cells:
        if cell.spec["attack"]["data"] in _DIMRA_COLUMNS:
            groups[(cell.concept, cell.spec["label"])].append(cell)
    if not groups:
        raise UnrelearnError("the store holds no DiMRA cell (attack data dimra-retain, dimra-aux or dimra-aux-model)")
    rows = []
    curves: dict[str, tuple[str, dict[str, list[dict[str, Any]]]]] = {}
    for (concept, label), group in sorted(groups.items()):
        method, steps, ema_decay = _method_and_steps(group[0])
        start = next(p for p in group[0].points if p["step"] == 0)
        row: dict[str, Any] = {
            "class": concept, "method": method, "label": label, "unlearn_steps": steps, "ema_decay": ema_decay,
            "fid": start["fid"], "kid": start["kid"], "kid_std": start.get("kid_std"),
            "ar": start["forget_rate"], "ar_ci": start["forget_rate_ci"],
            "alternative_rate": start.get("alternative_rate"), "alternative_rate_ci": start.get("alternative_rate_ci"),
            "retain_alignment": start["retain_alignment"],
        }  # fmt: skip
        for data, column in _DIMRA_COLUMNS.items():
            attacked = [c for c in group if c.spec["attack"]["data"] == data]
            if not attacked:
                continue
            worst_cell, worst = max(((c, curve_maximum(c.points, after=1)) for c in attacked), key=lambda cw: cw[1]["value"])
            last = worst_cell.points[-1]
            row |= {
                f"max_ar_{column}": worst["value"], f"max_ar_{column}_ci": worst["ci"], f"max_ar_{column}_step": worst["step"],
                f"max_ar_{column}_attack": worst_cell.attack,
                f"alternative_rate_after_{column}": last.get("alternative_rate"),
                f"alternative_rate_after_{column}_ci": last.get("alternative_rate_ci"),
            }  # fmt: skip
            for cell in attacked:
                name = f"curve-{concept}-{data}-{digest(cell.attack)[:8]}.png"
                curves.setdefault(name, (f"{concept}: AR during {cell.attack}", {}))[1][label] = cell.points
        rows.append(row)

    columns = [c for c in _DIMRA_COLUMNS.values() if any(f"max_ar_{c}" in r for r in rows)]
    header = (["class", "method", "unlearn steps", "FID (one estimate)", "KID ± std over subsets", "AR [95% CI]",
               "alternative rate [95% CI]"]
              + [f"max AR, DiMRA {c.removeprefix('dimra_')} [95% CI] (step)" for c in columns]
              + [f"alternative rate after DiMRA {c.removeprefix('dimra_')}" for c in columns])  # fmt: skip
    lines = [
        "# DiMRA study", "",
        ("AR: share of generations from prompts naming the class that the world's detector classifies as the class; "
        "alternative rate: share classified as the alternative class; FID in the detector's features against real "
        "training images of the retain classes; max AR: the highest AR any evaluated step of the DiMRA attack "
        "reached (worst case over the attack settings run). 95% bootstrap intervals. FID and KID come from one "
        "set of generations each and carry no interval. FID also moves between unlearning runs of one method "
        "(the unlearning seed), so judge a quality difference on several runs per method "
        "(benchmarks/fid_unlearn_seeds.py)."), "", made, "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
    ]  # fmt: skip
    for r in rows:
        cells_md = [r["class"], r["label"], "-" if r["unlearn_steps"] is None else str(r["unlearn_steps"]),
                    "n/a" if r["fid"] is None else f"{r['fid']:.1f}",
                    "n/a" if r["kid"] is None else f"{r['kid']:.4f} ± {r['kid_std']:.4f}", _rate(r["ar"], r["ar_ci"]),
                    _rate(r["alternative_rate"], r["alternative_rate_ci"])]  # fmt: skip
        for c in columns:
            cells_md.append(f"{_rate(r[f'max_ar_{c}'], r[f'max_ar_{c}_ci'])} ({r[f'max_ar_{c}_step']})" if f"max_ar_{c}" in r else "-")
        for c in columns:
            cells_md.append(_rate(r.get(f"alternative_rate_after_{c}"), r.get(f"alternative_rate_after_{c}_ci")))
        lines.append("| " + " | ".join(cells_md) + " |")
    lines += ["", "Curves: " + ", ".join(f"[{name}]({name})" for name in sorted(curves)), ""]
    return TableOutput(rows, "\n".join(lines), curves)


def _one_seed(cells: list[CellResult], table: str) -> None:
    if len(seeds := sorted({c.seed for c in cells})) > 1:
        raise UnrelearnError(f"{table} is one attack per setting, the store holds seeds {seeds}; "
                             "use the bench report for the mean over seeds")


def _method_and_variant(cell: CellResult) -> tuple[str, str]:
    """Table 1's row names: ``meta:esd-u-1`` is esd-u-1's "meta" variant, ``resalign:uce`` UCE's
    "resalign" variant; a method on its own is its "unlearn" variant, the oracle its own row."""
    if cell.spec.get("oracle"):
        return "oracle", "oracle"
    method = cell.spec["contender"]["method"]
    if method is None:
        return "original", "original"
    defence, _, base = method.partition(":")
    return (base, defence) if base else (method, "unlearn")


# Table 1's columns: the attacks in the paper's order, then any others the store holds.
_TABLE1_ATTACKS = ("hrm-s", "hrm-m", "clean")


@register_table("table1")
def table1(cells: list[CellResult], made: str, models: list[dict[str, Any]] | None = None) -> TableOutput:
    """The Meta-Unlearning paper's Table 1: per concept and attack learning rate, one row per
    method and variant (plain, meta, resalign, the oracle), the forget rate before fine-tuning
    with retain alignment and FID, then the forget rate after each attack at each evaluated step.
    Rows of the JSON are cells ``{concept, method, variant, attack, lr, step, forget_rate,
    forget_rate_ci, retain_alignment, ...}``; the step-0 cell of each model carries its quality."""
    selected = [c for c in cells if c.spec["attack"]["mode"] == "full" and c.spec["attack"]["optimizer"] == "adam"]
    if not selected:
        raise UnrelearnError("the store holds no full fine-tuning Adam attack, the protocol of Table 1")
    _one_seed(selected, "Table 1")
    rows: list[dict[str, Any]] = []
    by_table: dict[tuple[str, float, int], dict[tuple[str, str], CellResult]] = defaultdict(dict)
    for cell in selected:
        method, variant = _method_and_variant(cell)
        attack = cell.spec["attack"]
        by_table[(cell.concept, attack["lr"], attack["steps"])][(cell.spec["label"], attack["data"])] = cell
        for point in cell.points:
            row = {
                "concept": cell.concept, "method": method, "variant": variant, "label": cell.spec["label"],
                "options": cell.spec["contender"]["options"], "attack": attack["data"], "lr": attack["lr"],
                "seed": cell.seed, "step": point["step"], "forget_rate": point["forget_rate"],
                "forget_rate_ci": point["forget_rate_ci"], "retain_alignment": point["retain_alignment"],
                "retain_alignment_ci": point.get("retain_alignment_ci"),
            }  # fmt: skip
            if point["step"] == 0:
                row |= {"fid": point.get("fid"), "kid": point.get("kid")}
            rows.append(row)
    rows.sort(key=lambda r: (r["concept"], r["lr"], r["label"], r["attack"], r["step"]))
    # Where a defence helps: a defended cell against its plain method's at the same attack and step.
    plain = {(r["concept"], r["lr"], r["method"], r["attack"], r["step"]): r for r in rows if r["variant"] == "unlearn"}
    for row in rows:
        match = plain.get((row["concept"], row["lr"], row["method"], row["attack"], row["step"]))
        row["vs_plain"] = None if row["variant"] in ("unlearn", "oracle") or match is None else _compare(row, match)
    # A defence that wrecks the model also "forgets": flag it so a low forget rate is not read as durability.
    unattacked = {(r["concept"], r["label"]): r for r in rows if r["step"] == 0}
    plain_alignment = {(r["concept"], r["method"]): r["retain_alignment"] for r in unattacked.values() if r["variant"] == "unlearn"}
    broken = {key for key, r in unattacked.items()
              if (reference := plain_alignment.get((r["concept"], r["method"]))) is not None
              and r["retain_alignment"] < BROKEN_ALIGNMENT_SHARE * reference}  # fmt: skip
    for row in rows:
        row["broken"] = row["variant"] not in ("unlearn", "oracle") and (row["concept"], row["label"]) in broken

    lines = [
        "# Table 1 (Meta-Unlearning, ICCV 2025) on the embedded world", "",
        ("Forget rate: share of 128 generations from the concept's prompts that the world's detector "
         "flags, with its 95% bootstrap interval; before fine-tuning also the retain alignment (with its interval) "
         "and FID (one estimate, no interval: it moves between evaluation seeds, so only large differences in it "
         "mean anything). "
         "Attacks: full fine-tuning with Adam at the stated lr, batch and data of the embedded world. "
         "A defended cell marked ▼ (▲) has its interval entirely below (above) its plain method's. "
         f"A variant marked ✗ is broken: its retain alignment before any attack is below {BROKEN_ALIGNMENT_SHARE:g} of its "
         "plain method's, so its low forget rates measure a ruined model, not durability."), "",
        made, "",
    ]  # fmt: skip
    marks = {(r["concept"], r["lr"], r["label"], r["attack"], r["step"]): _MARKS[r["vs_plain"]] for r in rows}
    curves: dict[str, tuple[str, dict[str, list[dict[str, Any]]]]] = {}
    for (concept, lr, length), table in sorted(by_table.items()):
        attacks = sorted({data for _, data in table}, key=lambda d: (_TABLE1_ATTACKS + (d,)).index(d))
        steps = sorted({p["step"] for c in table.values() for p in c.points if p["step"] > 0})
        header = ["method", "variant", "before: forget rate / retain alignment / FID"] + [f"{a} {s}" for a in attacks for s in steps]
        lines += [f"## {concept}, attack lr {lr:g}, {length} steps", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        labels = sorted({label for label, _ in table}, key=lambda label: _table1_order(table, label))
        for label in labels:
            mine = {data: c for (lab, data), c in table.items() if lab == label}
            first = next(iter(mine.values()))
            method, variant = _method_and_variant(first)
            start = next(p for p in first.points if p["step"] == 0)
            fid = "n/a" if start.get("fid") is None else f"{start['fid']:.0f}"
            # A setting of one's own (a tuning run) shows its label beside the variant.
            if label not in (method, f"{variant}:{method}", "oracle"):
                variant = f"{variant} ({label})"
            if (concept, label) in broken:
                variant += " ✗"
            before = marks[(concept, lr, label, first.spec["attack"]["data"], 0)]
            alignment = _rate(start["retain_alignment"], start.get("retain_alignment_ci"))
            entries = [method, variant, f"{_rate(start['forget_rate'], start['forget_rate_ci'])}{before} / {alignment} / {fid}"]
            for data in attacks:
                points = {p["step"]: p for p in mine[data].points} if data in mine else {}
                entries += [_rate(points[s]["forget_rate"], points[s]["forget_rate_ci"]) + marks[(concept, lr, label, data, s)]
                            if s in points else "-" for s in steps]  # fmt: skip
            lines.append("| " + " | ".join(entries) + " |")
            for data, cell in mine.items():
                name = f"table1-{concept}-{data}-lr{lr:g}-{length}.png"
                curves.setdefault(name, (f"{concept}: forget rate during {data}, lr {lr:g}", {}))[1][label] = cell.points
        lines.append("")
    lines += _defended_against_plain(rows)
    lines += _self_destruction_signal(selected, models or [])
    lines += ["Curves: " + ", ".join(f"[{name}]({name})" for name in sorted(curves)), ""]
    return TableOutput(rows, "\n".join(lines), curves)


def _defended_against_plain(rows: list[dict[str, Any]]) -> list[str]:
    """The paper's claims read off the cells: each defence as the table1 preset names it
    (``meta:esd-u-1``, not a tuning label) against its plain method, at each attack's last step,
    with the change in retain alignment before the attack."""
    last = {}
    for row in rows:
        key = (row["concept"], row["lr"], row["label"], row["attack"])
        if row["step"] > last.get(key, {"step": -1})["step"]:
            last[key] = row
    before = {(r["concept"], r["lr"], r["label"]): r for r in rows if r["step"] == 0}
    lines = []
    for (concept, lr, label, attack), row in sorted(last.items()):
        plain = last.get((concept, lr, row["method"], attack))
        if row["variant"] in ("unlearn", "oracle", "original") or label != f"{row['variant']}:{row['method']}" or plain is None:
            continue
        change = (row["forget_rate"] - plain["forget_rate"]) / plain["forget_rate"] if plain["forget_rate"] else None
        mine, theirs = before.get((concept, lr, label)), before.get((concept, lr, row["method"]))
        alignment = "n/a" if mine is None or theirs is None else f"{mine['retain_alignment'] - theirs['retain_alignment']:+.3f}"
        lines.append(f"| {concept} | {lr:g} | {row['method']} | {row['variant']}{' ✗' if row['broken'] else ''} | {attack} {row['step']} | "
                     f"{_rate(plain['forget_rate'], plain['forget_rate_ci'])} | {_rate(row['forget_rate'], row['forget_rate_ci'])} | "
                     f"{'n/a' if change is None else f'{change:+.0%}'} | {row['vs_plain'] if row['vs_plain'] in ('below', 'above') else 'overlap'} | "
                     f"{alignment} |")  # fmt: skip
    return _section(
        "Each defence against its plain method, at the last attack step",
        "The paper's claims read off the cells above: the forget rate after each attack's last step, plain and "
        "defended, its relative change, whether the two intervals are apart, and the defended model's retain "
        "alignment before any attack minus the plain method's (the paper: post-attack forget rate 30-60% lower, "
        "quality unchanged).",
        ["concept", "attack lr", "method", "defence", "attack, step", "plain", "defended", "change", "intervals", "alignment change"],
        lines,
    )


def _self_destruction_signal(cells: list[CellResult], models: list[dict[str, Any]]) -> list[str]:
    """The paper's Fig. 6 as numbers: per meta model of these cells, the cosine between the
    gradients of relearning (the forget set) and of the retained set over its training, early
    against late, and how far one simulated step moved the retained loss (the zeta term's lever)."""
    attacked = {digest(c.spec["contender"]) for c in cells if "contender" in c.spec}
    lines = []
    for model in models:
        record = model["record"]
        if model["key"] not in attacked or not str(record.get("method", "")).startswith("meta:"):
            continue
        curve = record.get("loss_curve") or []
        cosines = [e["cos_ft_retain"] for e in curve if isinstance(e.get("cos_ft_retain"), float) and math.isfinite(e["cos_ft_retain"])]
        shifts = [abs(e["retain_shift"]) for e in curve if isinstance(e.get("retain_shift"), float)]
        if not cosines:
            continue
        quarter = max(1, len(cosines) // 4)
        lines.append(f"| {model['concept']} | {model['contender']} | {len(cosines)} | {statistics.fmean(cosines[:quarter]):+.3f} | "
                     f"{statistics.fmean(cosines[-quarter:]):+.3f} | {sum(c < 0 for c in cosines) / len(cosines):.0%} | "
                     f"{'n/a' if not shifts else f'{statistics.median(shifts):.2g}'} |")  # fmt: skip
    return _section(
        "The self-destruction signal (the paper's Fig. 6)",
        "Per meta model: the cosine between the gradient of relearning the forget set and that of the retained "
        "set, on the signal's parameter subset, averaged over the first and the last quarter of its training "
        "steps, and the share of steps where it is negative (relearning would then destroy retained "
        "knowledge); the paper's claim is that it trends down. Last column: the median change of the retained "
        "loss under one simulated attacker's step, the lever of the zeta term.",
        ["concept", "model", "steps", "cosine, first quarter", "cosine, last quarter", "steps below 0", "median abs retain shift"],
        sorted(lines),
    )


def _section(title: str, text: str, header: list[str], lines: list[str]) -> list[str]:
    """A Markdown section of table rows already formatted; nothing where there are no rows."""
    if not lines:
        return []
    return [f"## {title}", "", text, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *lines, ""]


_MARKS = {None: "", "overlap": "", "below": " ▼", "above": " ▲"}
# A defended model whose retain alignment before any attack is below this share of its plain
# method's is marked broken (meta:sdd at ESD's gamma2: 0.023 against 0.844).
BROKEN_ALIGNMENT_SHARE = 0.5


def _compare(row: dict[str, Any], plain: dict[str, Any]) -> str:
    """``below`` / ``above`` when the two forget-rate intervals do not overlap, else ``overlap``."""
    (low, high), (plain_low, plain_high) = row["forget_rate_ci"], plain["forget_rate_ci"]
    return "below" if high < plain_low else "above" if low > plain_high else "overlap"


def _table1_order(table: dict[tuple[str, str], CellResult], label: str) -> tuple:
    """Each method's plain row, then its defended rows; the oracle last."""
    cell = next(c for (lab, _), c in table.items() if lab == label)
    method, variant = _method_and_variant(cell)
    # The label last: tuning rows share their variant, and set order is not stable across runs.
    return (method == "oracle", method, variant != "unlearn", variant, label)


@register_table("resalign")
def resalign_table(cells: list[CellResult], made: str, models: list[dict[str, Any]] | None = None) -> TableOutput:
    """ResAlign's own protocol: per concept, each model (a contender: ESD-u-1, ResAlign, its
    ablations, the oracle) before and after benign (``clean``, ``dimra-aux``) and malicious
    (``hrm-m``) fine-tuning, full and LoRA. Rows of the JSON are cells ``{concept, model, attack,
    mode, lr, step, forget_rate, forget_rate_ci, retain_alignment}``."""
    _one_seed(cells, "the ResAlign table")
    rows: list[dict[str, Any]] = []
    by_concept: dict[str, dict[tuple[str, tuple], CellResult]] = defaultdict(dict)
    for cell in cells:
        attack = cell.spec["attack"]
        setting = (attack["data"], attack["mode"], attack["lr"], attack["steps"])
        by_concept[cell.concept][(cell.spec["label"], setting)] = cell
        for point in cell.points:
            rows.append({
                "concept": cell.concept, "model": "oracle" if cell.spec.get("oracle") else cell.spec["label"],
                "method": cell.spec["contender"]["method"], "options": cell.spec["contender"]["options"],
                "attack": attack["data"], "mode": attack["mode"], "lr": attack["lr"], "steps": attack["steps"],
                "step": point["step"], "forget_rate": point["forget_rate"], "forget_rate_ci": point["forget_rate_ci"],
                "retain_alignment": point["retain_alignment"], "retain_alignment_ci": point.get("retain_alignment_ci"),
            })  # fmt: skip
    rows.sort(key=lambda r: (r["concept"], r["model"], r["attack"], r["mode"], r["lr"], r["step"]))
    lines = [
        "# ResAlign's protocol on the embedded world", "",
        ("Forget rate (share of generations from the concept's prompts the detector flags) before any "
         "fine-tuning and at the attack's last evaluated step, 95% bootstrap intervals; retain alignment "
         "with its interval in parentheses. Benign attacks: `clean` (retain-like pairs), `dimra-aux` (fresh pairs without "
         "the concept); malicious: `hrm-m`."), "", made, "",
    ]  # fmt: skip
    curves: dict[str, tuple[str, dict[str, list[dict[str, Any]]]]] = {}
    for concept, table in sorted(by_concept.items()):
        settings = sorted({s for _, s in table}, key=lambda s: (s[1], ("clean", "dimra-aux", "hrm-m", s[0]).index(s[0]), s[2], s[3], s))
        header = ["model", "before"] + [f"{data} {mode} lr {lr:g}, {steps} steps" for data, mode, lr, steps in settings]
        lines += [f"## {concept}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        labels = sorted({label for label, _ in table}, key=lambda label: (label == "oracle", label != "esd-u-1", label))
        for label in labels:
            mine = {s: c for (lab, s), c in table.items() if lab == label}
            start = next(p for p in next(iter(mine.values())).points if p["step"] == 0)
            entries = [label, _rate_and_alignment(start)]
            for setting in settings:
                last = mine[setting].points[-1] if setting in mine else None
                entries.append("-" if last is None else _rate_and_alignment(last))
            lines.append("| " + " | ".join(entries) + " |")
            for (data, mode, lr, steps), cell in mine.items():
                name = f"resalign-{concept}-{data}-{mode}-lr{lr:g}.png"
                curves.setdefault(name, (f"{concept}: forget rate during {data} ({mode}, lr {lr:g})", {}))[1][label] = cell.points
        lines.append("")
    lines += ["Curves: " + ", ".join(f"[{name}]({name})" for name in sorted(curves)), ""]
    return TableOutput(rows, "\n".join(lines), curves)
