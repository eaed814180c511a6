"""``unrelearn bench``: run a preset's cells into one folder, resumably and in shards.

Layout of the benchmark folder ``DIR``::

    results.sqlite          every finished cell, its curve, models and reference evaluations
    models/KEY/             unlearned models (diffusers folders with run.json), shared by cells
    cells/KEY/              each attack's curve.json, run.json, curve.png (its model is deleted
                            once its image grid is drawn, unless --keep-models)
    grids/                  image grids: the base model, each model before attack, after each attack

A cell is done when its row is in the store; a rerun skips it. An interrupted cell resumes from
its attack checkpoint, an interrupted unlearning from its own, so a killed benchmark run again
recomputes nothing that finished and ends with the uninterrupted results. Shards (``--shard
i/n``) take disjoint cells; cells and models they share are guarded by file locks, so shards
and plain concurrent runs into one ``DIR`` never do the same work twice at once.

``--halving ETA`` replaces "every cell to its end" by a worst-case search over the attack
settings (:mod:`unrelearn.bench.search`): attacks pause at rungs (``partials`` in the store,
their checkpoints kept) and only the strongest continue.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from collections import Counter
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from unrelearn.bench.grid import Cell, Contender, contender_rank, digest, expand, load_preset, parse_shard, shard
from unrelearn.bench.search import Halving
from unrelearn.bench.store import CellResult, ResultStore
from unrelearn.errors import UnrelearnError
from unrelearn.io import OutputBusy, ensure_writable_parent, library_versions, output_lock, write_text_atomic
from unrelearn.progress import stage, warn
from unrelearn.training import parameter_digest

GRID_SAMPLES = 16
# What a benchmark folder keeps out of version control. The weights (unlearned models, attack
# checkpoints) are caches a rerun in the folder remakes where a cell still needs them; the rest
# is the result, small enough to commit or copy, and resumable on another machine.
BENCH_GITIGNORE = """# Written by `unrelearn bench`: model weights and attack checkpoints are caches that a rerun
# of the benchmark in this folder remakes where an unfinished cell needs them. The rest
# (results.sqlite, run records, plots, image grids) is the result.
*.safetensors
*.checkpoint/
results.sqlite-wal
results.sqlite-shm
.*
!.gitignore
"""
# How often a search shard looks for the cells of other shards that its next rung depends on.
SEARCH_POLL_SECONDS = 5.0


def cell_claim(folder: Path, key: str) -> Path:
    """What a process locks while it computes cell ``key`` in benchmark folder ``folder``."""
    return folder / "cells" / f"{key}.claim"


def model_entry(folder: Path, key: str) -> Path:
    """What a process locks while it records (or unlearns) model ``key`` in ``folder``."""
    return folder / "models" / f"{key}.entry"


@dataclass
class BenchSummary:
    cells: int
    already_done: int
    computed: int
    busy: list[str]
    folder: Path
    # Attacks a worst-case search ran to a rung and paused (not cells: a cell is a whole attack).
    paused: int = 0


def durability_summary(points: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """Steps-to-relearn (first evaluated step at or above ``threshold``), the worst forget rate,
    and the area under the forget-rate curve normalised by the attack length (0: never there,
    1: there from step 0)."""
    points = sorted(points, key=lambda p: p["step"])
    worst = max(points, key=lambda p: p["forget_rate"])
    steps = [p["step"] for p in points]
    rates = [p["forget_rate"] for p in points]
    span = steps[-1] - steps[0]
    area = sum((b - a) * (x + y) / 2 for a, b, x, y in zip(steps, steps[1:], rates, rates[1:])) / span if span else rates[0]
    return {
        "threshold": threshold,
        "steps_to_relearn": next((p["step"] for p in points if p["forget_rate"] >= threshold), None),
        "max_forget_rate": worst["forget_rate"],
        "max_forget_rate_ci": worst["forget_rate_ci"],
        "max_at_step": worst["step"],
        "auc": area,
        "final": points[-1],
    }


def run_bench(
    preset_name: str | dict[str, Any],
    out: str | Path,
    shard_text: str | None = None,
    oracles: dict[str, str] | None = None,
    device: str | torch.device = "cpu",
    keep_models: bool = False,
    progress: bool = True,
    command: str | None = None,
    model: str | None = None,
    halving: int | None = None,
    only: list[str] | None = None,
    concepts: list[str] | None = None,
) -> BenchSummary:
    """Run the cells of ``preset_name`` (a preset's name or a preset dict) into ``out``; ``model``
    replaces the preset's model (a preset for Stable Diffusion names none: the user's folder).
    ``halving`` (eta): search the worst case by successive halving instead of running every
    cell to its end (:mod:`unrelearn.bench.search`). ``only``: this run computes the cells of
    these contender labels; ``concepts``: of these concepts; the preset is recorded whole."""
    out = Path(out)
    ensure_writable_parent(out)
    index, count = parse_shard(shard_text)
    preset = load_preset(preset_name) if isinstance(preset_name, str) else {"name": "custom"} | preset_name
    if model is not None:
        preset = preset | {"model": model}
    cells = expand(preset, oracles)
    selected = cells
    if only is not None:
        labels = {c.contender.label for c in cells}
        if unknown := sorted(set(only) - labels):
            raise UnrelearnError(f"--only names contender(s) {', '.join(unknown)} the preset does not have; "
                                 f"its labels: {', '.join(sorted(labels))}")  # fmt: skip
        selected = [c for c in cells if c.contender.label in only]
    if concepts is not None:
        if unknown := sorted(set(concepts) - {c.concept for c in cells}):
            raise UnrelearnError(f"--concept names concept(s) {', '.join(unknown)} the preset does not have; "
                                 f"its concepts: {', '.join(preset['concepts'])}")  # fmt: skip
        selected = [c for c in selected if c.concept in concepts]
    # A search over the selected contenders only: it would otherwise wait for the others' rungs.
    search = Halving(selected, halving) if halving is not None else None
    mine = shard(selected, index, count)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / ".gitignore").exists():
        write_text_atomic(out / ".gitignore", BENCH_GITIGNORE)
    store = ResultStore(out / "results.sqlite")
    try:
        store.set_meta(f"preset:{preset['name']}", {"preset": preset, "cells": [c.key for c in cells], "command": command,
                                                    "oracles": oracles or {}, "halving": halving})  # fmt: skip
        # Named by what it is, not by host name alone: two machines can share one (a lent GPU machine
        # and the CPU one were both "vm"), and a folder continued elsewhere must not relabel the cells
        # that ran here.
        environment = {"hardware": _hardware(device), "versions": library_versions()}
        machine = f"{socket.gethostname()}-{digest(environment)[:6]}"
        store.set_meta(f"environment:{machine}", environment)
        done = store.finished_keys()
        todo = [c for c in mine if c.key not in done]
        stage(f"bench {preset['name']}: {len(cells)} cells, {sum(c.key in done for c in cells)} finished before; "
              f"this shard ({index + 1}/{count}) runs {len(todo)}", progress)  # fmt: skip
        runner = _Runner(store, out, preset.get("model", "builtin:shapes"), device, keep_models, progress, machine)
        if search is not None:
            computed, paused = _search(search, store, runner, {c.key for c in mine}, preset["name"], progress)
            return BenchSummary(len(cells), len(mine) - len(todo), computed, [], out, paused)
        computed, busy = 0, []
        for number, cell in enumerate(todo, 1):
            stage(f"cell {number}/{len(todo)}: {cell.concept} | {cell.contender.label} | {cell.attack_label} | "
                  f"seed {cell.seed}", progress)  # fmt: skip
            try:
                # Not the attack's own folder: attack() takes that lock itself.
                with output_lock(cell_claim(out, cell.key)):
                    if cell.key in store.finished_keys():
                        continue
                    runner.run(cell)
                    computed += 1
            except OutputBusy:
                stage(f"cell {cell.key} is being run by another process; left to it", progress)
                busy.append(cell.key)
        return BenchSummary(len(cells), len(mine) - len(todo), computed, busy, out)
    finally:
        store.close()


def _search(
    search: Halving, store: ResultStore, runner: _Runner, mine: set[str], name: str, progress: bool
) -> tuple[int, int]:
    """Successive halving: run what the search asks for now, rung by rung, until every group is
    complete. Another shard's cells are waited for: the next rung depends on them. Returns the
    cells finished and the attacks paused by this process."""
    computed, paused, waited, last = 0, 0, False, None
    while True:
        finished = {c.key: c.points for c in store.cells()}
        work, states = search.plan(finished, store.partials(), search_ceilings(store, runner.base_model, search))
        store.update_meta(f"search:{name}", partial(_merge_search, eta=search.eta, states=[asdict(s) for s in states]))
        # A pruned setting never continues: its checkpoints (a model and optimizer state per
        # seed, gigabytes on Stable Diffusion) go.
        for pruned in (p for state in states for p in state.pruned):
            for key in pruned.cells:
                shutil.rmtree(runner.out / "cells" / f"{key}.checkpoint", ignore_errors=True)
        if not work:
            stage(f"worst-case search (halving, eta {search.eta}) complete: " + "; ".join(
                f"{s.concept} | {s.contender}: {' -> '.join(map(str, s.candidates))} settings" for s in states), progress)  # fmt: skip
            return computed, paused
        # With nothing of its own left, a shard helps with the others' cells that no process holds
        # (their locks say which): shards that finish their part early, or whose partner died,
        # do not wait idle for the next rung.
        runnable = [w for w in work if w.cell.key in mine] or work
        if runnable and runnable == last:
            raise UnrelearnError(f"the worst-case search made no progress on {len(runnable)} cell(s); "
                                 f"see the events table of {str(store.path)!r}")  # fmt: skip
        busy = 0
        for number, item in enumerate(runnable, 1):
            cell = item.cell
            until = "the end" if item.stop_at is None else f"step {item.stop_at}"
            stage(f"search {number}/{len(runnable)}: {cell.concept} | {cell.contender.label} | {cell.attack_label} | "
                  f"seed {cell.seed} | to {until}", progress)  # fmt: skip
            try:
                with output_lock(cell_claim(runner.out, cell.key)):
                    if cell.key in store.finished_keys() or (cell.key, item.stop_at) in store.partials():
                        continue
                    if runner.run(cell, stop_at=item.stop_at):
                        computed += 1
                    else:
                        paused += 1
            except OutputBusy:
                busy += 1  # another process runs it; a later plan sees its result
        last = None if busy else runnable
        if busy:
            if not waited:
                stage(f"waiting for {busy} cell(s) of other processes before the next rung", progress)
            waited = True
            time.sleep(SEARCH_POLL_SECONDS)


def reference_key(base_model: str, concept: str, eval_config: Any) -> str:
    """Where the store keeps the original model's evaluation on ``concept`` (its forget rate is the
    reference: the relearn threshold is half of it, and a search's worst case is settled at it)."""
    return digest({"model": base_model, "concept": concept, "eval": eval_config.__dict__})


def search_ceilings(store: ResultStore, base_model: str, search: Halving) -> dict[str, float]:
    """Per concept of the search, the original model's forget rate, where the store has it."""
    from unrelearn.evaluate import EvalConfig

    ceilings = {}
    for (concept, _), settings in search.groups.items():
        cell = next(iter(settings.values()))[0]
        found = store.evaluation(reference_key(base_model, concept, EvalConfig(**cell.evaluation)))
        if found is not None:
            ceilings[concept] = float(found["forget_rate"])
    return ceilings


def _merge_search(recorded: dict[str, Any] | None, eta: int, states: list[dict[str, Any]]) -> dict[str, Any]:
    """The search's record with these groups' states: a run of some groups (``--only``,
    ``--concept``) keeps the others' states that earlier runs recorded at the same ``eta``."""
    ours = {(s["concept"], s["contender"]) for s in states}
    kept = [] if recorded is None or recorded.get("eta") != eta else [
        g for g in recorded["groups"] if (g["concept"], g["contender"]) not in ours]  # fmt: skip
    groups = sorted(kept + states, key=lambda g: (g["concept"], g["contender"]))
    return {"method": "halving", "eta": eta, "groups": groups}


class _Runner:
    def __init__(
        self, store: ResultStore, out: Path, base_model: str, device: Any, keep_models: bool, progress: bool, machine: str
    ) -> None:
        self.store, self.out, self.base_model = store, out, base_model
        self.device, self.keep_models, self.progress, self.machine = device, keep_models, progress, machine
        self._original: Any = None

    def run(self, cell: Cell, stop_at: int | None = None) -> bool:
        """The cell's attack to its end (its row in the store), or paused at ``stop_at`` (a partial
        row). True when the cell finished: ran to its end, or diverged before the pause."""
        from unrelearn.attacks import AttackConfig, attack
        from unrelearn.evaluate import EvalConfig
        from unrelearn.model import DiffusionModel

        began = time.perf_counter()
        self.store.log(cell.key, "started" if stop_at is None else f"started to {stop_at}")
        eval_config = EvalConfig(**cell.evaluation)
        reference = self.reference(cell.concept, eval_config)
        model_dir = self.model(cell.contender, cell.concept, eval_config)
        folder = self.out / "cells" / cell.key
        if (folder / "curve.json").is_file():
            curve = json.loads((folder / "curve.json").read_text())
        else:
            start = self.start(cell.contender, cell.concept, model_dir, eval_config) if 0 in cell.eval_at else None
            model = DiffusionModel.load(model_dir, device=self.device)
            curve = attack(model, cell.concept, AttackConfig(**cell.attack), folder, list(cell.eval_at), eval_config,
                           reference_rate=reference, progress=self.progress, initial_point=start,
                           original_model=self.original(model, cell.attack["data"]), stop_at=stop_at,
                           record_divergence=True)  # fmt: skip
        diverged = curve.get("diverged_at")
        if stop_at is not None and diverged is None:
            self.store.add_partial(cell.key, stop_at, [p for p in curve["points"] if p["step"] <= stop_at])
            return False
        grid = self.out / "grids" / f"cell-{cell.key}.png"
        if diverged is None and not grid.is_file():
            attacked = DiffusionModel.load(folder / "model", device=self.device)
            title = f"{cell.contender.label} after {cell.attack_label} (seed {cell.seed})"
            _flagged_grid(attacked, cell.concept, eval_config, grid, title)
        summary = durability_summary(curve["points"], curve["threshold"]) | {"reference_forget_rate": reference}
        if diverged is not None:
            summary["diverged_at"] = diverged
        self.store.add_cell(CellResult(
            cell.key, cell.concept, cell.contender.label, cell.attack_label, cell.seed, cell.spec(), summary,
            curve["points"], time.perf_counter() - began, self.machine,
        ))  # fmt: skip
        if not self.keep_models:
            shutil.rmtree(folder / "model", ignore_errors=True)
        return True

    def original(self, model: Any, data: str) -> Any:
        """The base model, loaded once, where the attack data are its generations (a world without
        images, or ``dimra-aux-model``); None otherwise."""
        from unrelearn.assets import load_model
        from unrelearn.attacks.data import needs_original_model
        from unrelearn.worlds import get_world

        if not needs_original_model(data, get_world(model.world)):
            return None
        if self._original is None:
            self._original = load_model(self.base_model, device=self.device)
        return self._original

    def _evaluated_once(self, key: str, label: str, concept: str, compute) -> dict[str, Any]:
        """An evaluation stored under ``key``: computed by the first process that needs it (the
        others wait for it under a lock) and read from the store ever after."""
        with output_lock(self.out / "references" / key, wait=True):
            found = self.store.evaluation(key)
            if found is None:
                found = compute()
                self.store.add_evaluation(key, label, concept, found)
        return found

    def reference(self, concept: str, eval_config: Any) -> float:
        """The forget rate of the world's model before unlearning (the relearn threshold is half of it)."""
        from unrelearn.assets import load_model
        from unrelearn.evaluate import evaluate

        key = reference_key(self.base_model, concept, eval_config)

        def compute() -> dict[str, Any]:
            stage(f"evaluating {self.base_model} on {concept!r} (the reference forget rate)", self.progress)
            model = load_model(self.base_model, device=self.device)
            metrics = evaluate(model, concept, eval_config, progress=False).metrics
            _flagged_grid(model, concept, eval_config, self.out / "grids" / f"reference-{key}.png",
                          f"{self.base_model} before unlearning")  # fmt: skip
            return metrics | {"model": self.base_model}

        return float(self._evaluated_once(key, self.base_model, concept, compute)["forget_rate"])

    def start(self, contender: Contender, concept: str, model_dir: Path, eval_config: Any) -> dict[str, Any]:
        """The model's evaluation before any attack, computed once and shared by all its cells."""
        from unrelearn.attacks.finetune import CURVE_METRICS
        from unrelearn.evaluate import evaluate
        from unrelearn.model import DiffusionModel

        def compute() -> dict[str, Any]:
            stage(f"evaluating {contender.label} before any attack", self.progress)
            model = DiffusionModel.load(model_dir, device=self.device)
            metrics = evaluate(model, concept, eval_config, progress=False).metrics
            return {k: metrics[k] for k in CURVE_METRICS} | {"model": contender.label, "concept": concept}

        key = digest({"model": contender.key(concept), "concept": concept, "eval": eval_config.__dict__})
        return self._evaluated_once(key, contender.label, concept, compute)

    def _unlearn(self, contender: Contender, concept: str, folder: Path, why: str = "") -> tuple[Any, dict[str, Any]]:
        """The base model unlearned into ``folder`` (resuming its checkpoint), and the run's record."""
        from unrelearn.assets import load_model
        from unrelearn.methods import unlearn

        stage(f"unlearning {concept!r} with {contender.method} ({contender.label}){why}", self.progress)
        model = load_model(contender.model, device=self.device)
        record = unlearn(model, contender.method, concept, out=folder, overrides=contender.options, progress=self.progress)
        return model, record

    def _unlearn_again(self, contender: Contender, concept: str, folder: Path, first: dict[str, Any]) -> None:
        """A recorded model whose weights are not in the folder (they stay behind when a benchmark's
        results are copied or committed): unlearned again, and a result that differs from the
        first run's weights is said, since the finished cells attacked those."""
        model, _ = self._unlearn(contender, concept, folder, f" again: its weights are not in {str(folder)!r}")
        digest_now, digest_then = parameter_digest(model.unet), first.get("weights_sha256")
        if digest_then is not None and digest_now != digest_then:
            message = (f"{contender.label} on {concept!r} unlearned again gave other weights than its first run "
                       f"(sha256 {digest_now[:12]} against {digest_then[:12]}: another machine or library version); "
                       "its finished cells attacked the first run's model")  # fmt: skip
            self.store.log(contender.key(concept), f"unlearned again, weights differ: {message}")
            warn(message)
        else:
            self.store.log(contender.key(concept), "unlearned again, same weights" if digest_then else "unlearned again")

    def model(self, contender: Contender, concept: str, eval_config: Any) -> Path:
        """The model this contender attacks: unlearned once into ``models/KEY``, reused by every cell."""
        from unrelearn.assets import load_model, model_path
        from unrelearn.model import DiffusionModel

        key = contender.key(concept)
        # Always this folder's models/KEY, not the path recorded when it ran: a benchmark folder
        # can move (a copy on another machine, a committed folder without its weights).
        folder = self.out / "models" / key if contender.method else model_path(contender.model)
        with output_lock(model_entry(self.out, key), wait=True):
            found = self.store.model(key)
            if found is not None:
                _check_settings(contender, concept, found["record"], found["path"])
                if contender.method is None or _has_weights(folder):
                    return folder
                self._unlearn_again(contender, concept, folder, found["record"])
                return folder
            record: dict[str, Any] = {"versions": library_versions()}
            if contender.method and (folder / "run.json").is_file() and _has_weights(folder):  # unlearned before a kill, not yet recorded
                record = json.loads((folder / "run.json").read_text())
                _check_settings(contender, concept, record, str(folder))
                model = DiffusionModel.load(folder, device=self.device)
            elif contender.method:
                model, record = self._unlearn(contender, concept, folder)
            else:
                model = load_model(contender.model, device=self.device)
            if contender.method:
                record["weights_sha256"] = parameter_digest(model.unet)
                record["machine"] = self.machine
            _flagged_grid(model, concept, eval_config, self.out / "grids" / f"model-{key}.png",
                          f"{contender.label} before attack")  # fmt: skip
            self.store.add_model(key, concept, contender.label, contender.identity(concept) | {"oracle": contender.oracle},
                                 str(folder), record)  # fmt: skip
            return folder


def _has_weights(folder: Path) -> bool:
    """Whether a model folder holds its weights, not only the run record and plots that travel
    with a benchmark's results."""
    return (folder / "model_index.json").is_file() and any(folder.glob("unet/*.safetensors"))


def _check_settings(contender: Contender, concept: str, record: dict[str, Any], path: str) -> None:
    """A model belongs to its settings. Its key names only the options a preset gives, so a change
    of a method's defaults since it was unlearned would otherwise reuse it silently."""
    from unrelearn.assets import model_path
    from unrelearn.methods.base import resolve_config
    from unrelearn.model import read_model_index

    stored = record.get("config")
    if contender.method is None or stored is None:
        return
    _, info = read_model_index(model_path(contender.model))
    now = json.loads(json.dumps(asdict(resolve_config(contender.method, info.get("world") or "prompts", contender.options)),
                                default=str))  # fmt: skip
    # Options added since it ran are absent from its record: their defaults keep its result.
    changed = sorted(name for name in stored.keys() & now.keys() if stored[name] != now[name])
    if changed:
        differences = ", ".join(f"{name} {stored[name]!r} then, {now[name]!r} now" for name in changed)
        raise UnrelearnError(f"the model of {contender.label!r} on {concept!r} in {path!r} was unlearned with other "
                             f"settings than this code's defaults give ({differences}); give the old values in the "
                             f"contender's options, or remove the folder and its row (a new DIR) to unlearn again")  # fmt: skip


def _hardware(device: Any) -> str:
    import os
    import platform

    text = f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"
    if torch.device(device).type == "cuda":
        text += f", {torch.cuda.get_device_name(torch.device(device))}"
    return text + f", device {device}"


def _flagged_grid(model: Any, concept: str, eval_config: Any, path: Path, title: str) -> None:
    """Samples from the concept's evaluation prompts, framed red where the detector sees the concept."""
    from unrelearn.evaluate import cycle_captions, shows_concept
    from unrelearn.report import save_grid
    from unrelearn.worlds import get_world

    world = get_world(model.world)
    captions = cycle_captions(world.concept_sets(concept).evaluation, GRID_SAMPLES)
    texts = [c.text for c in captions]
    images = model.sample(texts, seed=eval_config.seed, steps=eval_config.steps, guidance=eval_config.guidance or model.guidance)
    flags = shows_concept(world, concept, images)
    save_grid(images, texts, path, title=f"{title}: {sum(flags)}/{len(flags)} show {concept!r}", marked=flags)


def describe(summary: BenchSummary) -> str:
    busy = f", {len(summary.busy)} left to other processes" if summary.busy else ""
    busy += f", {summary.paused} attacks paused at a rung of the search" if summary.paused else ""
    return (
        f"{summary.cells} cells: {summary.already_done} finished before, {summary.computed} computed now{busy}; "
        f"results in {summary.folder / 'results.sqlite'}, `unrelearn report {summary.folder}` draws them"
    )


def list_bench(
    preset_name: str, out: str | Path, oracles: dict[str, str] | None = None, model: str | None = None,
    halving: int | None = None,
) -> list[str]:
    """One line per cell of the preset (key, finished or pending, what it runs), grouped by concept
    and contender in the preset's order, then how many cells of each contender are finished; with
    ``halving``, what the search costs at most against the full grid."""
    preset = load_preset(preset_name)
    cells = expand(preset | {"model": model} if model is not None else preset, oracles)
    done: set[str] = set()
    recorded: set[str] = set()
    if (Path(out) / "results.sqlite").is_file():
        store = ResultStore(Path(out) / "results.sqlite")
        done, recorded = store.finished_keys(), {m["key"] for m in store.models()}
        store.close()
    concepts = {concept: i for i, concept in enumerate(preset["concepts"])}
    rank = contender_rank(preset)
    cells = sorted(cells, key=lambda c: (concepts[c.concept], rank(c.contender.label), c.attack_label, c.seed))
    lines = [f"{c.key}  {'done   ' if c.key in done else 'pending'}  {c.concept} | {c.contender.label} | "
             f"{c.attack_label} | seed {c.seed}" for c in cells]  # fmt: skip
    total = Counter(c.contender.label for c in cells)
    finished = Counter(c.contender.label for c in cells if c.key in done)
    lines.append("finished by contender: " + ", ".join(f"{label} {finished[label]}/{total[label]}" for label in sorted(total, key=rank)))
    lines.append(f"{len(cells)} cells, {sum(c.key in done for c in cells)} finished")
    # What resuming costs before any attack: a folder copied or committed without its weights
    # unlearns again the models its pending cells attack.
    needed = {c.contender.key(c.concept) for c in cells if c.key not in done and c.contender.method}
    present = {key for key in needed if _has_weights(Path(out) / "models" / key)}
    if needed:
        again = len((needed - present) & recorded)
        lines.append(f"models the pending cells attack: {len(present)} in this folder, {len(needed) - len(present)} to unlearn"
                     + (f" ({again} again: recorded here, their weights are not)" if again else ""))  # fmt: skip
    if halving is not None:
        (steps, evaluations), (all_steps, all_evaluations) = Halving(cells, halving).cost()
        lines.append(f"search (halving, eta {halving}): from {steps:,} attack steps and {evaluations:,} evaluations "
                     f"(every rung prunes to 1/{halving}: {all_steps / steps:.1f}x and {all_evaluations / evaluations:.1f}x "
                     f"fewer) up to the full grid's {all_steps:,} and {all_evaluations:,} (no setting clearly weaker)")  # fmt: skip
    return lines
