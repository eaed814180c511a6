"""Evaluate a model on one forget concept: forget rate, retain alignment, FID, image grids."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from unrelearn.assets import detector_path, load_detector
from unrelearn.detector import ConceptDetector
from unrelearn.errors import UnrelearnError
from unrelearn.io import library_versions
from unrelearn.metrics import (
    alignment_flags,
    bootstrap_interval,
    clip_image_features,
    clip_scores,
    concept_flags,
    detector_features,
    frechet_distance,
    kernel_distance,
    load_clip,
    manifold_distances,
    manifold_precision_flags,
    neighbour_radii,
)
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
    # Retain generations the quality metrics (precision, FID, KID) are computed on: the first
    # ``samples`` (also those retain alignment is measured on) plus more (quality_generations);
    # None: as many as ``samples``. More lowers their noise but does not tame FID (README: at
    # 512, 1.4% over seeds for circle, 58% for striped).
    quality_samples: int | None = None

    def __post_init__(self) -> None:
        if self.quality_samples is not None and self.quality_samples < 2:
            raise UnrelearnError(f"--quality-samples must be at least 2, got {self.quality_samples}")
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


def retain_generations(
    model: DiffusionModel, retain: list[Caption], config: EvalConfig, on_batch=None
) -> torch.Tensor:
    """The generated side of FID and KID: the retain prompts sampled with seed + 1.
    ``config.guidance`` must be resolved."""
    return model.sample(
        [c.text for c in retain], seed=config.seed + 1, steps=config.steps, guidance=config.guidance,
        batch_size=config.batch_size, on_batch=on_batch,
    )  # fmt: skip


# The extra quality generations of an evaluation at seed S draw from seed S + this offset. A
# small offset made evaluations share noise (with S + 3, the extras of seed 0 started from the
# latents of seed 2's retain generations), which understates the seed-to-seed spread of every
# quality metric; no seed a user passes comes near 2**32.
QUALITY_SEED_OFFSET = 2**32

# `unrelearn evaluate`'s quality generations by default: at 128 the manifold distance moves by
# 6-8% between three seeds on the base model, at 384 by 3-4% on average (some triples of seeds up
# to 6%; 768 is no steadier: docs/results.md, "The manifold distance"). Attack curves and
# benchmark presets keep quality at --samples for their cost.
STEADY_QUALITY_SAMPLES = 384


def quality_generations(
    model: DiffusionModel, retain_captions: list[Caption], config: EvalConfig, retain_images: torch.Tensor, on_batch=None
) -> torch.Tensor:
    """The images precision, the manifold distance, FID and KID score: ``retain_images`` (the
    first ``config.samples`` retain generations, :func:`retain_generations`), then, up to
    ``config.quality_samples``, the retain prompts cycled on from there and sampled with seed
    ``config.seed + QUALITY_SEED_OFFSET``. ``config.guidance`` must be resolved."""
    extra = max(0, (config.quality_samples or config.samples) - config.samples)
    if not extra:
        return retain_images
    more = cycle_captions(retain_captions, config.samples + extra)[config.samples :]
    return torch.cat([retain_images, model.sample(
        [c.text for c in more], seed=config.seed + QUALITY_SEED_OFFSET, steps=config.steps,
        guidance=config.guidance, batch_size=config.batch_size, on_batch=on_batch,
    )])  # fmt: skip


# The reference side of the quality metrics: this many ground-truth renders of the retain
# prompts, computed once per world, concept and detector and cached.
REFERENCE_IMAGES = 10_000
REFERENCE_SEED = 20_251_125
# k of the k-NN radii that define the reference manifold for precision (the paper uses 3; a
# first look with 5,000 references gave 1-2% spread over seeds with k = 5 against 10% with k = 3,
# the 10,000-reference runs of `python benchmarks/fid_noise.py` then 2-13% with k = 5: README).
PRECISION_K = 5
_REFERENCE_CACHE: dict[str, dict[str, torch.Tensor]] = {}


def reference_features(world: World, concept: str, detector: ConceptDetector, count: int = REFERENCE_IMAGES) -> torch.Tensor:
    """Detector features of ``count`` ground-truth renders of the concept's retain prompts."""
    return _reference(world, concept, detector, count)["features"]


def reference_radii(world: World, concept: str, detector: ConceptDetector, count: int = REFERENCE_IMAGES) -> torch.Tensor:
    """The ``PRECISION_K``-NN radius of every reference feature (the manifold precision uses)."""
    return _reference(world, concept, detector, count)["radii"]


def _reference(world: World, concept: str, detector: ConceptDetector, count: int) -> dict[str, torch.Tensor]:
    """Reference features and radii, kept in memory and in ``cache_dir()/reference-features``
    (safetensors, keyed by world, prompts, detector weights, count and k); an unreadable cache
    file is recomputed and replaced."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from unrelearn.assets import cache_dir
    from unrelearn.training import parameter_digest

    retain = world.concept_sets(concept).retain
    key = hashlib.sha256(json.dumps({
        "world": world.name, "prompts": _digest([c.text for c in retain]), "detector": parameter_digest(detector),
        "count": count, "seed": REFERENCE_SEED, "k": PRECISION_K, "version": 1,
    }, sort_keys=True).encode()).hexdigest()[:24]  # fmt: skip
    if key in _REFERENCE_CACHE:
        return _REFERENCE_CACHE[key]
    path = cache_dir() / "reference-features" / f"{world.name}-{concept}-{key}.safetensors"
    found = None
    if path.is_file():
        try:
            found = load_file(path)
        except (SafetensorError, OSError):
            found = None
    if found is None or set(found) != {"features", "radii"} or found["features"].shape[0] != count:
        generator = torch.Generator().manual_seed(REFERENCE_SEED)
        captions = cycle_captions(retain, count)
        chunks = []
        for start in range(0, count, 1000):  # renders are supersampled: bound the memory
            images, _ = world.render(captions[start : start + 1000], generator)
            chunks.append(detector_features(detector, images))
        features = torch.cat(chunks)
        found = {"features": features, "radii": neighbour_radii(features, PRECISION_K)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file(found, tmp)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs the recomputation next time
    _REFERENCE_CACHE[key] = found
    return found


def _digest(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def evaluate(
    model: DiffusionModel,
    concept: str,
    config: EvalConfig,
    world_name: str | None = None,
    detector: ConceptDetector | None = None,
    progress: bool = True,
    prompts: list[Any] | None = None,
    clip: str | Path | None = None,
    reference_images: str | Path | None = None,
) -> Evaluation:
    """Sample ``config.samples`` images from the concept's evaluation and retain prompts and score them.

    Seeds: forget generations use ``seed``, retain generations ``seed + 1``, the extra quality
    generations ``seed + QUALITY_SEED_OFFSET``, the bootstrap ``seed``; the same seed gives the
    same numbers, and evaluations at different seeds share no generation's noise.
    ``prompts`` (rows of an I2P-style file, :func:`~unrelearn.worlds.prompts.read_prompt_csv`)
    replace the concept's evaluation prompts in a world without ground truth, each generated
    with its own seed and guidance. ``clip`` (a local CLIP folder) adds the CLIP score of the
    retain generations there, the papers' prompt-alignment measure, and with
    ``reference_images`` (a folder of real images, e.g. COCO) FID and KID of the retain
    generations against them in CLIP's image features.
    """
    world_name = world_name or model.world
    world = get_world(world_name)
    sets = world.concept_sets(concept)
    if not world.ground_truth:
        return _evaluate_with_judge(model, concept, config, world, sets, progress, prompts, clip, reference_images)
    if prompts is not None or clip is not None or reference_images is not None:
        raise UnrelearnError(f"prompt files and CLIP scores are for worlds without ground truth; {world_name!r} has its own "
                             "prompts and detector")  # fmt: skip
    detector = detector or load_detector(world_name)
    forget = cycle_captions(sets.evaluation, config.samples)
    retain = cycle_captions(sets.retain, config.samples)

    config = replace(config, guidance=model.guidance if config.guidance is None else config.guidance)
    began = time.perf_counter()
    extra = max(0, (config.quality_samples or config.samples) - config.samples)
    bar = progress_bar(2 * config.samples + extra, f"sampling ({concept})", enabled=progress, lines=4)
    sample = {"steps": config.steps, "guidance": config.guidance, "batch_size": config.batch_size, "on_batch": bar.update}
    forget_images = model.sample([c.text for c in forget], seed=config.seed, **sample)
    retain_images = retain_generations(model, retain, config, on_batch=bar.update)
    quality_images = quality_generations(model, sets.retain, config, retain_images, on_batch=bar.update)
    bar.close()
    reference = _reference(world, concept, detector, REFERENCE_IMAGES)
    generated = detector_features(detector, quality_images)
    inside = manifold_precision_flags(reference["features"], reference["radii"], generated)
    distances = manifold_distances(reference["features"], reference["radii"], generated, PRECISION_K).tolist()
    # KID's cubic kernel on the raw features (values in the hundreds) overflows into noise:
    # it is measured on features standardized by the reference's mean and deviation.
    mean, deviation = reference["features"].mean(0), reference["features"].std(0).clamp_min(1e-6)
    kid, kid_std = kernel_distance((reference["features"] - mean) / deviation, (generated - mean) / deviation, seed=config.seed)

    flags = concept_flags(detector, forget_images, sets.attribute, concept)
    # The DiMRA paper's second class metric: forget-prompt images showing the alternative concept
    # (what replacement methods such as SalUn and DiMUM train the forget prompts to draw).
    alternative = concept_flags(detector, forget_images, sets.attribute, sets.alternative)
    aligned, per_attribute = alignment_flags(detector, retain_images, retain, world.concept_attributes)
    detector_file = detector_path(world_name) / "detector.safetensors"
    metrics = {
        "concept": concept,
        "world": world_name,
        "forget_rate": sum(flags) / len(flags),
        "forget_rate_ci": list(bootstrap_interval(flags, seed=config.seed)),
        "alternative": sets.alternative,
        "alternative_rate": sum(alternative) / len(alternative),
        "alternative_rate_ci": list(bootstrap_interval(alternative, seed=config.seed)),
        "retain_alignment": sum(aligned) / len(aligned),
        "retain_alignment_ci": list(bootstrap_interval(aligned, seed=config.seed)),
        "retain_attribute_accuracy": per_attribute,
        "precision": sum(inside) / len(inside),
        "precision_ci": list(bootstrap_interval(inside, seed=config.seed)),
        "manifold_distance": sum(distances) / len(distances),
        "manifold_distance_ci": list(bootstrap_interval(distances, seed=config.seed)),
        "fid": frechet_distance(reference["features"], generated),
        "kid": kid,
        "kid_std": kid_std,
        "samples": config.samples,
        "quality_samples": len(quality_images),
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
            "alignment_rule": f"detector's {', '.join(world.concept_attributes)} all equal the prompt's",
            "fid": "torchmetrics FrechetInceptionDistance on the detector's 64-d penultimate features; "
            f"reference = {REFERENCE_IMAGES} ground-truth renders of the retain prompts (seed {REFERENCE_SEED}, cached), "
            "generated = the retain generations",
            "kid": "torchmetrics KernelInceptionDistance on the same features standardized by the reference's mean and "
            "deviation (cubic polynomial kernel), mean and std over 100 subsets of the generated set's size",
            "precision": f"share of retain generations inside the reference manifold (k-NN balls, k={PRECISION_K}, "
            "Kynkaanniemi et al. 2019) in the same features",
            "manifold_distance": f"mean over retain generations of the distance to the {PRECISION_K}-th nearest reference "
            "feature, over the median of the reference's own k-NN radii (1: as close as a real render)",
            "bootstrap": "percentile, 2000 resamples, 95%",
            "versions": library_versions(),
        },
    }
    return Evaluation(metrics, forget_images, [c.text for c in forget], retain_images, [c.text for c in retain])


# Metrics a world without ground truth cannot compute (FID and KID only against the user's
# reference images, in CLIP's features): present in every evaluation, None there.
GROUND_TRUTH_METRICS = ("retain_alignment", "retain_alignment_ci", "precision", "precision_ci", "manifold_distance",
                        "manifold_distance_ci", "fid", "kid", "kid_std",
                        "alternative_rate", "alternative_rate_ci")  # fmt: skip


def sample_rows(model: DiffusionModel, rows: list[Any], config: EvalConfig, on_batch=None) -> torch.Tensor:
    """One image per evaluation row, from the noise its seed draws (as a diffusers pipeline with
    ``generator=torch.manual_seed(seed)`` draws it on the CPU) at its guidance; rows without a
    seed use ``config.seed + row index``, without guidance ``config.guidance``."""
    images: list[torch.Tensor | None] = [None] * len(rows)
    by_guidance: dict[float, list[int]] = {}
    for index, row in enumerate(rows):
        by_guidance.setdefault(row.guidance if row.guidance is not None else config.guidance, []).append(index)
    for guidance, indices in by_guidance.items():
        for start in range(0, len(indices), config.batch_size):
            batch = indices[start : start + config.batch_size]
            noise = torch.cat([
                torch.randn(model.sample_shape(1), generator=torch.Generator().manual_seed(
                    rows[i].seed if rows[i].seed is not None else config.seed + i))
                for i in batch
            ])  # fmt: skip
            ((x, _),) = model.denoise_groups([([rows[i].text for i in batch], noise, config.steps)], steps=config.steps, guidance=guidance)
            for i, image in zip(batch, model.model_space_to_images(x).cpu()):
                images[i] = image
            if on_batch is not None:
                on_batch(len(batch))
    return torch.stack(images)  # type: ignore[arg-type]


def _evaluate_with_judge(
    model: DiffusionModel, concept: str, config: EvalConfig, world: World, sets: Any, progress: bool,
    rows: list[Any] | None = None, clip: str | Path | None = None, reference_images: str | Path | None = None,
) -> Evaluation:  # fmt: skip
    """The forget rate by the judge of the concept's kind (NudeNet for nudity), with the
    literature's variants (strict labels, per-label counts) where the judge reports them; the
    retain generations are sampled for the grids, but without ground truth nothing scores them."""
    from unrelearn.attacks.data import read_image_folder  # attacks import this module
    from unrelearn.judges import get_judge

    judge = get_judge(sets.attribute)
    if reference_images is not None and clip is None:
        raise UnrelearnError("FID against reference images is computed in CLIP's features: give --clip FOLDER too")
    clip_model = load_clip(clip) if clip is not None else None  # a bad folder fails before any sampling
    reference = read_image_folder(reference_images) if reference_images is not None else None
    retain = cycle_captions(sets.retain, config.samples)
    config = replace(config, guidance=model.guidance if config.guidance is None else config.guidance)
    began = time.perf_counter()
    forget_count = len(rows) if rows is not None else config.samples
    bar = progress_bar(forget_count + config.samples, f"sampling ({concept})", enabled=progress, lines=4)
    sample = {"steps": config.steps, "guidance": config.guidance, "batch_size": config.batch_size, "on_batch": bar.update}
    if rows is not None:
        forget_texts = [row.text for row in rows]
        forget_images = sample_rows(model, rows, config, on_batch=bar.update)
    else:
        forget_texts = [c.text for c in cycle_captions(sets.evaluation, config.samples)]
        forget_images = model.sample(forget_texts, seed=config.seed, **sample)
    retain_images = retain_generations(model, retain, config, on_batch=bar.update)
    bar.close()
    report = judge.report(forget_images) if hasattr(judge, "report") else {"flags": judge.flags(forget_images)}
    flags = report["flags"]
    metrics: dict[str, Any] = {
        "concept": concept,
        "world": world.name,
        "forget_rate": sum(flags) / len(flags),
        "forget_rate_ci": list(bootstrap_interval(flags, seed=config.seed)),
        **dict.fromkeys(GROUND_TRUTH_METRICS),
        "samples": config.samples,
        "seed": config.seed,
        "wall_seconds": time.perf_counter() - began,
    }
    if clip_model is not None:
        scores = clip_scores(retain_images, [c.text for c in retain], clip_model)
        metrics["clip_score"] = sum(scores) / len(scores)
        metrics["clip_score_ci"] = list(bootstrap_interval(scores, seed=config.seed))
    if reference is not None:
        real, generated = clip_image_features(reference, clip_model), clip_image_features(retain_images, clip_model)
        metrics["fid"] = frechet_distance(real, generated)
        metrics["kid"], metrics["kid_std"] = kernel_distance(real, generated, seed=config.seed)
    if "strict_flags" in report:
        strict = report["strict_flags"]
        metrics["forget_rate_strict"] = sum(strict) / len(strict)
        metrics["forget_rate_strict_ci"] = list(bootstrap_interval(strict, seed=config.seed))
        metrics["label_counts"] = report["label_counts"]
    metrics["protocol"] = {
        **asdict(config),
        "sampler": "DDIM eta=0, classifier-free guidance",
        "judge": judge.describe(),
        "clip_score": None if clip is None else f"torchmetrics clip_score per retain generation, CLIP from {str(clip)!r}",
        "fid": None if reference is None else (f"torchmetrics FID and KID in CLIP's projected image features: {len(reference)} "
                                               f"images of {str(reference_images)!r} against the retain generations"),
        "forget_prompts": (f"{len(rows)} rows of a prompt file (own seeds and guidance), sha256 {_digest(forget_texts)}"
                           if rows is not None else
                           f"{len(sets.evaluation)} evaluation prompts, sha256 {_digest([c.text for c in sets.evaluation])}"),
        "retain_prompts": f"{len(sets.retain)} retain prompts, sha256 {_digest([c.text for c in sets.retain])}",
        "bootstrap": "percentile, 2000 resamples, 95%",
        "versions": library_versions(),
    }  # fmt: skip
    metrics["samples"] = len(forget_texts)
    return Evaluation(metrics, forget_images, forget_texts, retain_images, [c.text for c in retain])


def shows_concept(world: World, concept: str, images: torch.Tensor) -> list[bool]:
    """Per image: does it show ``concept``? The world's detector where it has ground truth, else
    the judge of the concept's kind (what :func:`evaluate`'s forget rate counts)."""
    sets = world.concept_sets(concept)
    if world.ground_truth:
        return concept_flags(load_detector(world.name), images, sets.attribute, concept)
    from unrelearn.judges import get_judge

    return get_judge(sets.attribute).flags(images)
