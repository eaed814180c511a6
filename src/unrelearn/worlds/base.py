"""What every world provides, and the world registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from unrelearn.errors import UnrelearnError


@dataclass(frozen=True)
class Caption:
    """A prompt together with the attributes it states (unstated attributes are absent)."""

    text: str
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ConceptSets:
    """The prompt sets the papers use for one forget concept.

    ``evaluation``: many phrasings that mention the concept (the I2P-nudity analogue).
    ``hrm_s`` / ``hrm_m``: the attacker's fine-tuning prompts, one and several (Meta-Unlearning
    App. E.1). ``clean``: benign prompts unrelated to the concept (CLEAN). ``related``: prompts
    of concepts that look like the forget concept but must be kept (the "skin" of "nudity").
    ``retain``: fully specified prompts without the concept, used for retain alignment and FID.
    ``forget``: the short prompts an unlearning method erases (the concept's names, as ESD
    erases "nudity"). ``preserve``: the same kind of prompt for the attribute's other values,
    which closed-form editors keep fixed.
    """

    concept: str
    attribute: str
    evaluation: list[Caption]
    hrm_s: list[Caption]
    hrm_m: list[Caption]
    clean: list[Caption]
    related: list[Caption]
    retain: list[Caption]
    forget: list[Caption]
    preserve: list[Caption]
    related_concepts: list[str]
    alternative: str


class World(Protocol):
    name: str
    resolution: int | None
    attributes: dict[str, list[str]]
    # True: ``render`` draws exact images of any caption (methods train on them, the evaluation
    # has a reference); False: images come from a model (see ``worlds.prompts``).
    ground_truth: bool
    # The attributes whose values are concepts (what a detector judges, what alignment checks).
    concept_attributes: tuple[str, ...]

    def concepts(self) -> list[str]: ...

    def attribute_of(self, concept: str) -> str: ...

    def concept_sets(self, concept: str) -> ConceptSets: ...

    def training_batch(
        self, n: int, generator: torch.Generator, exclude: str | None = None
    ) -> tuple[torch.Tensor, list[str]]: ...

    def render(
        self, captions: list[Caption], generator: torch.Generator, heldout: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Images of ``captions`` in [0, 1] and the index of every attribute's value; ``heldout``
        draws from data no model of the world was trained on."""
        ...

    def auxiliary_captions(self, sets: ConceptSets, size: int, generator: torch.Generator) -> list[Caption]:
        """The prompts of DiMRA's auxiliary set: the retain distribution, no leaked retain prompt."""
        ...

    def parse(self, text: str) -> Caption: ...

    def describe(self, attributes: dict[str, str]) -> str: ...


class LabelledWorld(ABC):
    """A world whose images are drawn from attribute labels (a renderer or a labelled data set):
    a caption's stated attributes are kept, the ones it leaves open drawn at random."""

    @abstractmethod
    def sample_labels(self, n: int, generator: torch.Generator, exclude: str | None = None) -> list[dict[str, str]]: ...

    @abstractmethod
    def render_labels(
        self, labels: list[dict[str, str]], generator: torch.Generator, heldout: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def render(
        self, captions: list[Caption], generator: torch.Generator, heldout: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Images of ``captions`` and their label indices (see ``World.render``)."""
        labels = self.sample_labels(len(captions), generator)
        for row, caption in zip(labels, captions):
            row.update(caption.attributes)
        return self.render_labels(labels, generator, heldout)


_WORLDS: dict[str, Callable[[], World]] = {}


def register_world(name: str) -> Callable[[Callable[[], World]], Callable[[], World]]:
    def decorator(factory: Callable[[], World]) -> Callable[[], World]:
        _WORLDS[name] = factory
        return factory

    return decorator


def world_names() -> list[str]:
    return sorted(_WORLDS)


def get_world(name: str) -> World:
    if name not in _WORLDS:
        raise UnrelearnError(f"unknown world {name!r}; known worlds: {', '.join(world_names())}")
    return _WORLDS[name]()
