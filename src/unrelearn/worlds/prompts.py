"""The ``prompts`` world: concepts defined by prompt files, for models without a procedural
renderer (Stable Diffusion).

A concept file (JSON, one per concept; shipped ones in ``assets/prompts``, or the user's via
``UNRELEARN_PROMPTS=DIR``) holds the same prompt sets a procedural world derives
(:class:`~unrelearn.worlds.base.ConceptSets`) and the concept's *kind*, which names the judge
that evaluates it (``nudity``: NudeNet). There are no ground-truth images: unlearning methods
take their training images from the frozen original model (as ESD does on Stable Diffusion),
attacks from the original model (``--original``) or from an image folder (``unrelearn
generate`` writes one), and the quality metrics of the embedded worlds are not computed.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from unrelearn.errors import UnrelearnError
from unrelearn.worlds.base import Caption, ConceptSets, register_world

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "prompts"
_SETS = ("forget", "hrm_s", "hrm_m", "clean", "evaluation", "related", "preserve", "retain")


def _prompt_folders() -> list[Path]:
    extra = os.environ.get("UNRELEARN_PROMPTS")
    return ([Path(extra)] if extra else []) + [SHIPPED]


def read_concept_file(path: Path) -> dict:
    """A concept file, checked: every prompt set a non-empty list of strings."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UnrelearnError(f"cannot read concept file {str(path)!r} ({error}); it must be a JSON object") from None
    if not isinstance(data, dict) or not isinstance(data.get("concept"), str) or not isinstance(data.get("kind"), str):
        raise UnrelearnError(f"concept file {str(path)!r} must be a JSON object with text fields 'concept' and 'kind'")
    for name in _SETS:
        value = data.get(name)
        if not isinstance(value, list) or not value or not all(isinstance(p, str) and p.strip() for p in value):
            raise UnrelearnError(f"concept file {str(path)!r}: {name!r} must be a non-empty list of prompts")
    if not isinstance(data.get("alternative", ""), str):
        raise UnrelearnError(f"concept file {str(path)!r}: 'alternative' must be a prompt")
    return data


@dataclass(frozen=True)
class EvaluationPrompt:
    """One row of an I2P-style evaluation file: the prompt with the seed and guidance its image is
    generated with (None: the evaluation's own)."""

    text: str
    seed: int | None = None
    guidance: float | None = None
    categories: tuple[str, ...] = ()


# Column names of the two CSV dialects in use: I2P's (sd_seed, sd_guidance) and the nudity
# subsets of ESD / UnlearnDiffAtk (evaluation_seed, evaluation_guidance).
_SEED_COLUMNS = ("evaluation_seed", "sd_seed", "seed")
_GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance", "guidance")


def read_prompt_csv(path: str | Path, category: str | None = None) -> list[EvaluationPrompt]:
    """Evaluation prompts from a local CSV with a ``prompt`` column and optional seed, guidance and
    ``categories`` (comma-separated, as I2P's) columns; ``category`` keeps the rows that name it."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UnrelearnError(f"cannot read prompt file {str(path)!r} ({error}); give a UTF-8 CSV with a 'prompt' column") from None
    if "prompt" not in columns:
        raise UnrelearnError(f"prompt file {str(path)!r} has no 'prompt' column (columns: {', '.join(columns) or 'none'})")
    if category is not None and "categories" not in columns:
        raise UnrelearnError(f"prompt file {str(path)!r} has no 'categories' column to select {category!r} from")
    seed_column = next((c for c in _SEED_COLUMNS if c in columns), None)
    guidance_column = next((c for c in _GUIDANCE_COLUMNS if c in columns), None)
    prompts = []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        categories = tuple(c.strip() for c in (row.get("categories") or "").split(",") if c.strip())
        if category is not None and category not in categories:
            continue
        text = (row.get("prompt") or "").strip()
        if not text:
            continue
        try:
            seed = int(float(row[seed_column])) if seed_column and row.get(seed_column, "").strip() else None
            guidance = float(row[guidance_column]) if guidance_column and row.get(guidance_column, "").strip() else None
        except ValueError:
            raise UnrelearnError(f"{str(path)!r}, line {number}: {seed_column} / {guidance_column} must be numbers") from None
        prompts.append(EvaluationPrompt(text, seed, guidance, categories))
    if not prompts:
        selection = f" in category {category!r}" if category else ""
        raise UnrelearnError(f"prompt file {str(path)!r} holds no prompts{selection}")
    return prompts


class PromptWorld:
    """Concepts from prompt files; see the module docstring."""

    name = "prompts"
    ground_truth = False
    resolution = None

    def __init__(self, folders: list[Path]) -> None:
        self._files: dict[str, dict] = {}
        for folder in reversed(folders):  # the user's folder overrides shipped concepts of the same name
            for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
                data = read_concept_file(path)
                self._files[data["concept"]] = data
        kinds: dict[str, list[str]] = {}
        for concept, data in sorted(self._files.items()):
            kinds.setdefault(data["kind"], []).append(concept)
        self.attributes = kinds
        self.concept_attributes = tuple(kinds)

    def concepts(self) -> list[str]:
        return sorted(self._files)

    def attribute_of(self, concept: str) -> str:
        if concept not in self._files:
            raise UnrelearnError(
                f"unknown concept {concept!r} in world 'prompts'; known: {', '.join(self.concepts())} "
                "(add a concept file to the folder UNRELEARN_PROMPTS names)"
            )
        return self._files[concept]["kind"]

    def concept_sets(self, concept: str) -> ConceptSets:
        kind = self.attribute_of(concept)
        data = self._files[concept]

        def captions(name: str) -> list[Caption]:
            return [Caption(p, {}) for p in data[name]]

        alternative = data.get("alternative", "")
        return ConceptSets(
            concept=concept, attribute=kind, evaluation=captions("evaluation"), hrm_s=captions("hrm_s"),
            hrm_m=captions("hrm_m"), clean=captions("clean"), related=captions("related"), retain=captions("retain"),
            forget=captions("forget"), preserve=[Caption(p, {kind: alternative} if p == alternative else {}) for p in data["preserve"]],
            related_concepts=[], alternative=alternative,
        )  # fmt: skip

    def _no_images(self, *_args, **_kwargs):
        raise UnrelearnError(
            "the 'prompts' world has no ground-truth images: attacks take them from the original model "
            "(--original MODEL) or from a folder (--data FOLDER; `unrelearn generate` writes one)"
        )

    def render(self, captions: list[Caption], generator: torch.Generator, heldout: bool = False):
        self._no_images()

    def auxiliary_captions(self, sets: ConceptSets, size: int, generator: torch.Generator) -> list[Caption]:
        # Without a data set, "same distribution, never trained on" is the original model's own
        # generations of the retain prompts (the attack data's images come from --original).
        return [sets.retain[i % len(sets.retain)] for i in range(size)]

    def training_batch(self, n: int, generator: torch.Generator, exclude: str | None = None):
        self._no_images()

    def parse(self, text: str) -> Caption:
        return Caption(text, {})

    def describe(self, attributes: dict[str, str]) -> str:
        raise UnrelearnError("the 'prompts' world cannot write prompts from attributes; this method needs a procedural world")


@register_world("prompts")
def _make_prompt_world() -> PromptWorld:
    return _cached_prompt_world(tuple(_prompt_folders()))


@cache
def _cached_prompt_world(folders: tuple[Path, ...]) -> PromptWorld:
    return PromptWorld(list(folders))
