"""Benchmark grids: a preset (JSON) expands into cells, each one attack on one model.

A preset names the world's model, the concepts, the contenders (unlearning methods, defences,
the model as is, the exact-unlearning oracle), the attacks and the seeds::

    {"description": "...", "model": "builtin:shapes", "concepts": ["circle"],
     "oracle": "builtin:shapes-oracle-{concept}",
     "contenders": [{"label": "esd-u-1", "method": "esd-u-1"},
                    {"label": "meta:esd-u-1", "method": "meta:esd-u-1", "options": {"steps": 200}}],
     "attacks": [{"data": ["hrm-m", "clean"], "steps": 300, "lr": [1e-5, 1e-4], "eval_at": [0, 100, 300]}],
     "seeds": [0], "eval": {"samples": 64, "seed": 0}}

Every field of an attack entry is an :class:`~unrelearn.attacks.AttackConfig` field (or
``eval_at``, or ``contenders``: the labels it attacks, all by default; the oracle's label is
``oracle``); a list value (a list of lists for ``lora_targets``) spans that axis, and the
entry expands to the product of its axes, times the seeds. The built-in presets are the JSON
files in ``unrelearn/bench/presets``; ``--preset`` also takes a path to one's own.

A cell's key hashes everything that changes its result (model, concept, method and options,
attack, seed, evaluation), not its label: a cell computed under one preset is reused by another
that contains it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from unrelearn.errors import UnrelearnError

PRESETS = Path(__file__).parent / "presets"
_PRESET_KEYS = {"description", "model", "concepts", "oracle", "contenders", "attacks", "seeds", "eval"}
_CONTENDER_KEYS = {"label", "model", "method", "options"}
_EVAL_KEYS = {"samples", "seed", "steps", "quality_samples"}
# Attack fields that are lists by type: a list of them is an axis, a plain list is one value.
_LIST_FIELDS = {"lora_targets", "eval_at"}


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.json"))


def load_preset(name: str) -> dict[str, Any]:
    """A built-in preset by name, or a preset file by path."""
    path = Path(name)
    if path.suffix != ".json":
        path = PRESETS / f"{name}.json"
        if not path.is_file():
            raise UnrelearnError(f"unknown preset {name!r}; built-in presets: {', '.join(preset_names())}, or give a .json file")
    elif not path.is_file():
        raise UnrelearnError(f"preset file {str(path)!r} does not exist")
    try:
        preset = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UnrelearnError(f"preset {str(path)!r} is not valid JSON ({error})") from None
    if not isinstance(preset, dict):
        raise UnrelearnError(f"preset {str(path)!r} must be a JSON object")
    preset.setdefault("name", path.stem)
    return preset


@dataclass(frozen=True)
class Contender:
    """A model under attack: ``model`` as is (``method`` None: the base model or the oracle), or
    ``model`` unlearned with ``method``."""

    label: str
    model: str
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    oracle: bool = False

    def identity(self, concept: str) -> dict[str, Any]:
        return {"model": self.model, "method": self.method, "options": self.options, "concept": concept}

    def key(self, concept: str) -> str:
        return digest(self.identity(concept))


@dataclass(frozen=True)
class Cell:
    concept: str
    contender: Contender
    attack: dict[str, Any]
    eval_at: tuple[int, ...]
    evaluation: dict[str, Any]

    @property
    def seed(self) -> int:
        return int(self.attack["seed"])

    @property
    def key(self) -> str:
        return digest(self.identity())

    def identity(self) -> dict[str, Any]:
        return {
            "contender": self.contender.identity(self.concept), "attack": self.attack, "eval_at": list(self.eval_at),
            "evaluation": self.evaluation,
        }  # fmt: skip

    @property
    def attack_label(self) -> str:
        return attack_label(self.attack)

    def spec(self) -> dict[str, Any]:
        return self.identity() | {"label": self.contender.label, "oracle": self.contender.oracle}


def digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def attack_label(attack: dict[str, Any]) -> str:
    """``hrm-m full adam lr=1e-4 300 steps`` (seed not included: seeds are repeats of one setting)."""
    mode = attack["mode"] if attack["mode"] == "full" else f"lora-r{attack['lora_rank']}"
    parts = [attack["data"], mode, attack["optimizer"], f"lr={attack['lr']:g}", f"{attack['steps']} steps"]
    if attack.get("schedule", "constant") != "constant" or attack.get("warmup_steps"):
        parts.insert(4, f"{attack['schedule']} (warm-up {attack['warmup_steps']})")
    return " ".join(parts)


def _check_keys(what: str, given: dict[str, Any], allowed: set[str]) -> None:
    if unknown := sorted(set(given) - allowed):
        raise UnrelearnError(f"{what} has unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _axes(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The product of an attack entry's list-valued fields."""
    names, values = [], []
    for name, value in entry.items():
        is_axis = isinstance(value, list) and (name not in _LIST_FIELDS or (value and isinstance(value[0], list)))
        names.append(name)
        values.append(value if is_axis else [value])
    for name, value in zip(names, values):
        if not value:
            raise UnrelearnError(f"attack field {name!r} is an empty list; give at least one value")
    return [dict(zip(names, combination)) for combination in itertools.product(*values)]


def contender_label(entry: dict[str, Any], model: str) -> str:
    """What a preset's contender entry is called in the store, the tables and ``--only``."""
    return entry.get("label") or entry.get("method") or entry.get("model") or model


def contender_rank(preset: dict[str, Any]) -> Callable[[str], tuple[int, str]]:
    """A sort key for contender labels: the order the preset lists them, the oracle (the bar) last."""
    model = preset.get("model") or "builtin:shapes"
    order = [contender_label(entry, model) for entry in preset.get("contenders", [])] + ["oracle"]
    return lambda label: (order.index(label) if label in order else len(order), label)


def expand(preset: dict[str, Any], oracles: dict[str, str] | None = None) -> list[Cell]:
    """Every cell of ``preset``, checked before any work: methods, options, attack fields, eval."""
    from unrelearn.attacks import AttackConfig
    from unrelearn.attacks.finetune import EMBEDDED_DEFAULTS
    from unrelearn.evaluate import EvalConfig
    from unrelearn.methods import resolve_method
    from unrelearn.methods.base import check_method_options

    _check_keys(f"preset {preset.get('name')!r}", {k: v for k, v in preset.items() if k != "name"}, _PRESET_KEYS)
    for required in ("concepts", "contenders", "attacks"):
        if not preset.get(required):
            raise UnrelearnError(f"preset {preset.get('name')!r} names no {required}")
    model = preset.get("model", "builtin:shapes")
    if model is None:
        raise UnrelearnError(f"preset {preset.get('name')!r} names no model: pass --model FOLDER (your local Stable Diffusion folder)")
    # The embedded world's attack defaults where the model is embedded; the papers' otherwise.
    defaults = EMBEDDED_DEFAULTS if model.startswith("builtin:") else {}
    evaluation = dict(preset.get("eval", {}))
    _check_keys("the preset's eval", evaluation, _EVAL_KEYS)
    evaluation = {k: v for k, v in asdict(EvalConfig(**evaluation)).items() if k in _EVAL_KEYS}
    attack_fields = {f.name for f in fields(AttackConfig)} - {"checkpoint_every"}

    cells: list[Cell] = []
    for concept in preset["concepts"]:
        contenders = []
        for entry in preset["contenders"]:
            _check_keys(f"contender {entry.get('label')!r}", entry, _CONTENDER_KEYS)
            method, options = entry.get("method"), dict(entry.get("options", {}))
            if method is not None:
                cls, variant = resolve_method(method)
                check_method_options(cls, variant | options)
            label = contender_label(entry, model)
            contenders.append(Contender(label, entry.get("model", model).format(concept=concept), method, options))
        oracle = (oracles or {}).get(concept) or (preset["oracle"].format(concept=concept) if preset.get("oracle") else None)
        if oracle is not None and _model_exists(oracle):
            contenders.append(Contender("oracle", oracle, oracle=True))
        # "oracle" is always a valid name: a concept without a shipped oracle simply has no such cell.
        labels = [c.label for c in contenders if not c.oracle] + ["oracle"]
        for entry in preset["attacks"]:
            _check_keys("an attack entry", entry, attack_fields | {"eval_at", "contenders"})
            entry = dict(entry)
            targets = entry.pop("contenders", labels)
            if unknown := sorted(set(targets) - set(labels)):
                raise UnrelearnError(f"an attack entry names unknown contender(s) {', '.join(unknown)}; "
                                     f"the preset's labels: {', '.join(labels)}")  # fmt: skip
            for combination in _axes(entry):
                eval_at = tuple(sorted(set(combination.pop("eval_at", [0, combination.get("steps", 300)]))))
                for seed in preset.get("seeds", [0]):
                    values = defaults | combination | {"seed": seed}
                    attack = asdict(AttackConfig(**values))
                    attack.pop("checkpoint_every")
                    if eval_at[-1] > attack["steps"] or eval_at[0] < 0:
                        raise UnrelearnError(f"eval_at {list(eval_at)} must lie within 0..{attack['steps']} (the attack's steps)")
                    cells.extend(Cell(concept, c, attack, eval_at, evaluation) for c in contenders if c.label in targets)
    unique = {cell.key: cell for cell in cells}
    return sorted(unique.values(), key=lambda c: c.key)


def _model_exists(spec: str) -> bool:
    from unrelearn.assets import model_path

    try:
        return (model_path(spec) / "model_index.json").is_file()
    except UnrelearnError:
        return False


def shard(cells: list[Cell], index: int, count: int) -> list[Cell]:
    """Shard ``index`` of ``count`` (0-based): every ``count``-th cell in key order, so shards are
    disjoint, cover the grid, and agree without talking to each other."""
    return cells[index::count]


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` with 1 <= i <= n (SLURM_ARRAY_TASK_ID style, 1-based) -> (i - 1, n)."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UnrelearnError(f"--shard must look like i/n (for example 2/8), got {text!r}") from None
    if not 1 <= index <= count:
        raise UnrelearnError(f"--shard {text}: i must lie between 1 and n")
    return index - 1, count
