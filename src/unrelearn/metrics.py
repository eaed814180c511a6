"""Metrics: forget-concept rate with a bootstrap interval, retain alignment, detector-space FID."""

from __future__ import annotations

import warnings
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
    """Frechet distance between detector penultimate features of two image sets (torchmetrics' FID)."""
    if len(real) < 2 or len(fake) < 2:
        raise UnrelearnError("FID needs at least 2 real and 2 generated images; raise --samples")
    metric = FrechetInceptionDistance(feature=DetectorFeatures(detector), normalize=True)
    metric.update(real.float(), real=True)
    metric.update(fake.float(), real=False)
    return float(metric.compute())


class PrecomputedFeatures(torch.nn.Module):
    """The identity, as a torchmetrics feature extractor: FID and KID then take features computed
    once (the cached reference side) instead of images."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def detector_features(detector: ConceptDetector, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The detector's penultimate features (float64), the space FID and KID are measured in."""
    extractor = DetectorFeatures(detector)
    with torch.no_grad():
        return torch.cat([extractor(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def frechet_distance(reference: torch.Tensor, generated: torch.Tensor) -> float:
    """torchmetrics' FID between two feature sets (rows are samples)."""
    if len(reference) < 2 or len(generated) < 2:
        raise UnrelearnError("FID needs at least 2 reference and 2 generated images; raise --samples")
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(reference.shape[1]))
    metric.update(reference, real=True)
    metric.update(generated, real=False)
    return float(metric.compute())


def kernel_distance(reference: torch.Tensor, generated: torch.Tensor, seed: int = 0, subsets: int = 100) -> tuple[float, float]:
    """torchmetrics' KID (polynomial kernel, unbiased MMD^2) between two feature sets: the mean
    and standard deviation over ``subsets`` random subsets of ``len(generated)`` rows each (drawn
    from torch's generator under ``seed``, so the same seed gives the same value)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(len(reference), len(generated))
    if size < 2:
        raise UnrelearnError("KID needs at least 2 reference and 2 generated images; raise --samples")
    with warnings.catch_warnings():  # "will save all extracted features": that is what it is given
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=PrecomputedFeatures(reference.shape[1]), subsets=subsets, subset_size=size)
    metric.update(reference, real=True)
    metric.update(generated, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def neighbour_radii(reference: torch.Tensor, k: int, chunk: int = 1000) -> torch.Tensor:
    """Each reference sample's distance to its ``k``-th nearest other reference sample."""
    return torch.cat([torch.cdist(reference[i : i + chunk], reference).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(reference), chunk)])  # fmt: skip


def manifold_precision_flags(reference: torch.Tensor, radii: torch.Tensor, generated: torch.Tensor) -> list[bool]:
    """Per generated sample: does it fall inside the reference manifold, the union of balls around
    each reference sample with its k-NN radius (improved precision, Kynkaanniemi et al., NeurIPS
    2019)? The share of True is the precision; being a per-image proportion, it gets a bootstrap
    interval and, unlike FID, is not swayed by a few outlying generations."""
    inside = torch.zeros(len(generated), dtype=torch.bool)
    for i in range(0, len(generated), 256):
        inside[i : i + 256] = (torch.cdist(generated[i : i + 256], reference) <= radii[None]).any(dim=1)
    return inside.tolist()
