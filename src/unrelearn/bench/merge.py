"""``unrelearn merge SRC DIR``: the finished results of one benchmark folder copied into another.

Shards share one ``DIR`` only on a file system with working POSIX locks. Where there is none
(cloud nodes with local disks, a lent GPU machine, a laptop and a server), each machine runs
the same preset into its own folder and ``merge`` brings the results together: every cell
finished in ``SRC`` and not in ``DIR`` (its row, curve, run record and image grid), the models
those cells attacked (record, weights if ``SRC`` kept them), the reference evaluations and the
presets' and machines' records. Nothing in ``DIR`` is overwritten:

- a cell finished in both with the same curve is already there; with another curve (the two
  machines computed it apart and disagree), ``DIR``'s is kept and the merge says which;
- a model recorded in both with other weights (its sha256) is kept as ``DIR`` has it, and the
  store logs it, so the report says that the merged cells attacked other weights;
- a cell ``DIR`` is computing right now (its claim is locked), or whose model ``DIR`` is
  unlearning right now, is left out: merge again later.

Paused attacks of a worst-case search (``partials``) are not merged: they belong to their
checkpoints, which stay with the machine that paused them; the search runs them again.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from unrelearn.bench.grid import digest
from unrelearn.bench.run import BENCH_GITIGNORE, cell_claim, model_entry
from unrelearn.bench.store import ResultStore
from unrelearn.errors import UnrelearnError
from unrelearn.io import OutputBusy, atomic_directory, output_lock, write_text_atomic

# Attack checkpoints and lock files belong to the machine that wrote them.
_LEFT_BEHIND = shutil.ignore_patterns("*.checkpoint", ".*")
MERGED_OTHER_WEIGHTS = "merged cells attacked other weights"


@dataclass
class MergeSummary:
    cells: int = 0
    already: int = 0
    models: int = 0
    differing: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    other_weights: list[str] = field(default_factory=list)


def merge_folders(source: str | Path, target: str | Path) -> MergeSummary:
    """Copy the finished cells of benchmark folder ``source`` that ``target`` lacks into it."""
    source, target = Path(source), Path(target)
    if not (source / "results.sqlite").is_file():
        raise UnrelearnError(f"{str(source)!r} is not a benchmark folder (no results.sqlite); give the --out of an `unrelearn bench` run")
    if target.exists() and target.resolve() == source.resolve():
        raise UnrelearnError(f"{str(source)!r} is the folder to merge into; give two different benchmark folders")
    target.mkdir(parents=True, exist_ok=True)
    if not (target / ".gitignore").exists():
        write_text_atomic(target / ".gitignore", BENCH_GITIGNORE)
    theirs, ours = ResultStore(source / "results.sqlite"), ResultStore(target / "results.sqlite")
    summary = MergeSummary()
    try:
        for prefix in ("preset:", "environment:"):
            known = {name for name, _ in ours.meta_items(prefix)}
            for name, value in theirs.meta_items(prefix):
                if name not in known:
                    ours.set_meta(prefix + name, value)
        for key, evaluation in theirs.evaluations().items():
            if ours.evaluation(key) is None:
                ours.add_evaluation(key, evaluation["model"], evaluation["concept"], evaluation["metrics"])
        _copy_file(source / "grids", target / "grids", "reference-*.png")
        recorded = {m["key"]: m for m in ours.models()}
        busy_models: set[str] = set()
        for model in theirs.models():
            here = recorded.get(model["key"])
            if here is None:
                try:
                    # Held while DIR unlearns this model: its cells wait for the next merge.
                    with output_lock(model_entry(target, model["key"])):
                        if ours.model(model["key"]) is None:
                            _copy_model(source, target, model)
                            ours.add_model(model["key"], model["concept"], model["contender"], model["spec"],
                                           str(target / "models" / model["key"]), model["record"])  # fmt: skip
                            summary.models += 1
                except OutputBusy:
                    busy_models.add(model["key"])
                continue
            first, other = here["record"].get("weights_sha256"), model["record"].get("weights_sha256")
            if first and other and first != other:
                message = (f"{model['contender']} on {model['concept']!r}: the cells merged from {str(source)!r} attacked "
                           f"weights with sha256 {other[:12]}, this folder's cells {first[:12]}")  # fmt: skip
                ours.log(model["key"], f"{MERGED_OTHER_WEIGHTS}: {message}")
                summary.other_weights.append(message)
        finished = {cell.key: cell for cell in ours.cells()}
        for cell in theirs.cells():
            if "contender" in cell.spec and digest(cell.spec["contender"]) in busy_models:
                summary.busy.append(cell.key)
                continue
            if cell.key in finished:
                if (finished[cell.key].points, finished[cell.key].summary) == (cell.points, cell.summary):
                    summary.already += 1
                else:
                    summary.differing.append(cell.key)
                continue
            try:
                with output_lock(cell_claim(target, cell.key)):
                    if cell.key in ours.finished_keys():
                        summary.already += 1
                        continue
                    if (source / "cells" / cell.key).is_dir():
                        # Whole or not at all (a run here would resume from a half-copied curve), and
                        # replacing what an interrupted run here left.
                        _copy_folder(source / "cells" / cell.key, target / "cells" / cell.key)
                    _copy_file(source / "grids", target / "grids", f"cell-{cell.key}.png")
                    ours.add_cell(cell, event=f"merged from {source}")
                    summary.cells += 1
            except OutputBusy:
                summary.busy.append(cell.key)
    finally:
        theirs.close()
        ours.close()
    return summary


def _copy_model(source: Path, target: Path, model: dict) -> None:
    """A model's folder (its weights where SRC kept them) and image grid. What DIR holds of it
    unrecorded (an unlearning interrupted here) is obsolete once SRC's finished model is, and a
    half-copied folder would look like a model unlearned before a kill."""
    if (source / "models" / model["key"]).is_dir():
        _copy_folder(source / "models" / model["key"], target / "models" / model["key"])
    _copy_file(source / "grids", target / "grids", f"model-{model['key']}.png")


def _copy_folder(source: Path, target: Path) -> None:
    """``source`` (less checkpoints and lock files) in place of ``target``, whole or not at all."""
    with atomic_directory(target) as tmp:
        shutil.copytree(source, tmp, ignore=_LEFT_BEHIND, dirs_exist_ok=True)


def _copy_file(source: Path, target: Path, pattern: str) -> None:
    for path in source.glob(pattern):
        if not (target / path.name).exists():
            target.mkdir(parents=True, exist_ok=True)
            tmp = target / f".{path.name}.merging"
            shutil.copyfile(path, tmp)
            tmp.replace(target / path.name)


def describe_merge(summary: MergeSummary, source: str | Path, target: str | Path) -> list[str]:
    lines = [f"merged {summary.cells} cells and {summary.models} models from {str(source)!r} into {str(target)!r}; "
             + f"{summary.already} cells were there already"]  # fmt: skip
    if summary.differing:
        lines.append(f"{len(summary.differing)} cells finished in both with other results, this folder's kept: "
                     + ", ".join(summary.differing))  # fmt: skip
    if summary.busy:
        lines.append(f"{len(summary.busy)} cells are being run in the target now, left out (merge again later): " + ", ".join(summary.busy))
    lines += [f"other weights: {message}" for message in summary.other_weights]
    return lines
