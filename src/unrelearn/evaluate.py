"""Evaluate a model on one forget concept: forget rate, retain alignment, FID, image grids."""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from unrelearn.assets import detector_path, load_detector
from unrelearn.detector import ConceptDetector
from unrelearn.errors import UnrelearnError
from unrelearn.io import library_versions
from unrelearn.metrics import alignment_flags, bootstrap_interval, concept_flags, detector_fid
from unrelearn.model import DiffusionModel
from unrelearn.progress import progress_bar
from unrelearn.worlds import get_world
from unrelearn.worlds.base import Caption, World


@dataclass
class EvalConfig:
    samples: int = 128
    seed: int = 0
    steps: int = 25
    # None: the model's own scale (DiffusionModel.guidance: 1.5 for shapes, 7.5 for SD).
    guidance: float | None = None
    batch_size: int = 128

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise UnrelearnError(f"--samples must be at least 2 (FID needs two images per side), got {self.samples}")
        if self.steps < 1:
            raise UnrelearnError(f"--steps must be at least 1, got {self.steps}")


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    forget_images: torch.Tensor
    forget_prompts: list[str]
    retain_images: torch.Tensor
    retain_prompts: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


def cycle_captions(captions: list[Caption], n: int) -> list[Caption]:
    return list(itertools.islice(itertools.cycle(captions), n))


def retain_and_real_images(
    model: DiffusionModel, world: World, retain: list[Caption], config: EvalConfig, on_batch=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two sides of FID: generations from the retain prompts (seed + 1) and ground-truth
    renders of the same prompts (seed + 2). ``config.guidance`` must be resolved."""
    images = model.sample(
        [c.text for c in retain], seed=config.seed + 1, steps=config.steps, guidance=config.guidance,
        batch_size=config.batch_size, on_batch=on_batch,
    )  # fmt: skip
    real, _ = world.render(retain, torch.Generator().manual_seed(config.seed + 2))
    return images, real


def _digest(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def evaluate(
    model: DiffusionModel,
    concept: str,
    config: EvalConfig,
    world_name: str | None = None,
    detector: ConceptDetector | None = None,
    progress: bool = True,
) -> Evaluation:
    """Sample ``config.samples`` images from the concept's evaluation and retain prompts and score them.

    Seeds: forget generations use ``seed``, retain generations ``seed + 1``, ground-truth
    retain images ``seed + 2``, the bootstrap ``seed``; the same seed gives the same numbers.
    """
    world_name = world_name or model.world
    if world_name is None:
        raise UnrelearnError("this model names no world; pass --world (for example --world shapes)")
    world = get_world(world_name)
    sets = world.concept_sets(concept)
    detector = detector or load_detector(world_name)
    forget = cycle_captions(sets.evaluation, config.samples)
    retain = cycle_captions(sets.retain, config.samples)

    config = replace(config, guidance=model.guidance if config.guidance is None else config.guidance)
    began = time.perf_counter()
    bar = progress_bar(2 * config.samples, f"sampling ({concept})", enabled=progress, lines=4)
    sample = {"steps": config.steps, "guidance": config.guidance, "batch_size": config.batch_size, "on_batch": bar.update}
    forget_images = model.sample([c.text for c in forget], seed=config.seed, **sample)
    retain_images, real_images = retain_and_real_images(model, world, retain, config, on_batch=bar.update)
    bar.close()

    flags = concept_flags(detector, forget_images, sets.attribute, concept)
    aligned, per_attribute = alignment_flags(detector, retain_images, retain)
    detector_file = detector_path(world_name) / "detector.safetensors"
    metrics = {
        "concept": concept,
        "world": world_name,
        "forget_rate": sum(flags) / len(flags),
        "forget_rate_ci": list(bootstrap_interval(flags, seed=config.seed)),
        "retain_alignment": sum(aligned) / len(aligned),
        "retain_alignment_ci": list(bootstrap_interval(aligned, seed=config.seed)),
        "retain_attribute_accuracy": per_attribute,
        "fid": detector_fid(detector, real_images, retain_images),
        "samples": config.samples,
        "seed": config.seed,
        "wall_seconds": time.perf_counter() - began,
        "protocol": {
            **asdict(config),
            "sampler": "DDIM eta=0, classifier-free guidance",
            "detector": f"unrelearn ConceptDetector ({world_name})",
            "detector_sha256": hashlib.sha256(detector_file.read_bytes()).hexdigest() if detector_file.is_file() else None,
            "forget_prompts": f"{len(sets.evaluation)} evaluation prompts, sha256 {_digest([c.text for c in sets.evaluation])}",
            "retain_prompts": f"{len(sets.retain)} retain prompts, sha256 {_digest([c.text for c in sets.retain])}",
            "forget_rule": f"detector's {sets.attribute} prediction == {concept!r}",
            "alignment_rule": "detector's shape, colour and texture all equal the prompt's",
            "fid": "torchmetrics FrechetInceptionDistance on the detector's 64-d penultimate features; "
            "real = ground-truth renders of the retain prompts",
            "bootstrap": "percentile, 2000 resamples, 95%",
            "versions": library_versions(),
        },
    }
    return Evaluation(metrics, forget_images, [c.text for c in forget], retain_images, [c.text for c in retain])
