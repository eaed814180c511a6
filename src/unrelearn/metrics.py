"""Metrics: forget-concept rate with a bootstrap interval, retain alignment, detector-space FID."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import bootstrap
from torchmetrics.image.fid import FrechetInceptionDistance

from unrelearn.detector import ConceptDetector, DetectorFeatures
from unrelearn.errors import UnrelearnError
from unrelearn.worlds.base import Caption

ALIGNMENT_ATTRIBUTES = ("shape", "colour", "texture")


def bootstrap_interval(flags: Sequence[bool], seed: int = 0, resamples: int = 2000, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``flags`` (scipy.stats.bootstrap)."""
    values = np.asarray(flags, dtype=np.float64)
    if values.size == 0:
        raise UnrelearnError("cannot compute an interval over zero samples")
    interval = bootstrap(
        (values,), np.mean, n_resamples=resamples, confidence_level=level, method="percentile",
        rng=np.random.default_rng(seed), vectorized=True,
    ).confidence_interval  # fmt: skip
    return float(interval.low), float(interval.high)


def concept_flags(detector: ConceptDetector, images: torch.Tensor, attribute: str, concept: str) -> list[bool]:
    """Whether the detector sees ``concept`` (a value of ``attribute``) in each image."""
    return [value == concept for value in detector.predict(images)[attribute]]


def alignment_flags(
    detector: ConceptDetector, images: torch.Tensor, captions: Sequence[Caption]
) -> tuple[list[bool], dict[str, float]]:
    """Per image: do shape, colour and texture all match what the caption states?

    Returns the flags and the per-attribute match rates. Attributes a caption leaves open count
    as matching.
    """
    predicted = detector.predict(images)
    per_attribute = {a: [] for a in ALIGNMENT_ATTRIBUTES}
    flags = []
    for i, caption in enumerate(captions):
        matches = [
            caption.attributes.get(a) in (None, predicted[a][i]) for a in ALIGNMENT_ATTRIBUTES
        ]
        for a, ok in zip(ALIGNMENT_ATTRIBUTES, matches):
            per_attribute[a].append(ok)
        flags.append(all(matches))
    return flags, {a: float(np.mean(v)) for a, v in per_attribute.items()}


def stated_attribute_accuracy(
    detector: ConceptDetector, images: torch.Tensor, captions: Sequence[Caption]
) -> dict[str, dict[str, float]]:
    """Per attribute, over the captions that state it: share of images showing the stated value."""
    predicted = detector.predict(images)
    out: dict[str, dict[str, float]] = {}
    for attribute in detector.attributes:
        hits = [predicted[attribute][i] == c.attributes[attribute] for i, c in enumerate(captions) if attribute in c.attributes]
        if hits:
            out[attribute] = {"accuracy": float(np.mean(hits)), "stated": len(hits)}
    return out


def detector_fid(detector: ConceptDetector, real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between detector penultimate features (torchmetrics' FID)."""
    if len(real) < 2 or len(fake) < 2:
        raise UnrelearnError("FID needs at least 2 real and 2 generated images; raise --samples")
    metric = FrechetInceptionDistance(feature=DetectorFeatures(detector), normalize=True)
    metric.update(real.float(), real=True)
    metric.update(fake.float(), real=False)
    return float(metric.compute())
