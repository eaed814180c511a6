"""Metrics: forget-concept rate with a bootstrap interval, retain alignment, detector-space FID."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import bootstrap
from torchmetrics.image.fid import FrechetInceptionDistance

from unrelearn.detector import ConceptDetector, DetectorFeatures
from unrelearn.errors import UnrelearnError
from unrelearn.io import uint8_pixels
from unrelearn.worlds.base import Caption


def bootstrap_interval(flags: Sequence[float], seed: int = 0, resamples: int = 2000, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``flags`` (0/1 decisions, or per-image scores;
    scipy.stats.bootstrap)."""
    values = np.asarray(flags, dtype=np.float64)
    if values.size == 0:
        raise UnrelearnError("cannot compute an interval over zero samples")
    interval = bootstrap(
        (values,), np.mean, n_resamples=resamples, confidence_level=level, method="percentile",
        rng=np.random.default_rng(seed), vectorized=True,
    ).confidence_interval  # fmt: skip
    return float(interval.low), float(interval.high)


def curve_maximum(curve: Sequence[dict], metric: str = "forget_rate", after: int = 0) -> dict:
    """The highest ``metric`` a durability curve reaches at or after step ``after`` (the DiMRA
    paper's maximum AR during an attack), with its step and interval; the earliest step wins ties."""
    points = [p for p in curve if p["step"] >= after]
    if not points:
        raise ValueError(f"the curve has no point at or after step {after}")
    best = max(points, key=lambda p: (p[metric], -p["step"]))
    return {"step": best["step"], "value": best[metric], "ci": list(best[f"{metric}_ci"])}


def concept_flags(detector: ConceptDetector, images: torch.Tensor, attribute: str, concept: str) -> list[bool]:
    """Whether the detector sees ``concept`` (a value of ``attribute``) in each image."""
    return [value == concept for value in detector.predict(images)[attribute]]


def alignment_flags(
    detector: ConceptDetector, images: torch.Tensor, captions: Sequence[Caption], attributes: Sequence[str]
) -> tuple[list[bool], dict[str, float]]:
    """Per image: do all ``attributes`` (a world's concept attributes) match what the caption states?

    Returns the flags and the per-attribute match rates. Attributes a caption leaves open count
    as matching.
    """
    predicted = detector.predict(images)
    per_attribute: dict[str, list[bool]] = {a: [] for a in attributes}
    flags = []
    for i, caption in enumerate(captions):
        matches = [caption.attributes.get(a) in (None, predicted[a][i]) for a in attributes]
        for a, ok in zip(attributes, matches):
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


def manifold_distances(reference: torch.Tensor, radii: torch.Tensor, generated: torch.Tensor, k: int) -> torch.Tensor:
    """Per generated sample: its distance to its ``k``-th nearest reference sample, in units of the
    median of the reference's own k-NN radii (``radii``, leave-one-out). About 1 for a sample drawn
    like the reference, larger the farther off the real manifold it lies: the graded form of the
    manifold precision's in-or-out decision, on the same k-NN geometry. Averaged, an outlying
    generation weighs in by its distance, not its squared distance as in FID: on the embedded
    world it moves less between seeds than precision, FID or KID (docs/results.md)."""
    if len(reference) < k:
        raise UnrelearnError(f"the manifold distance needs at least k={k} reference samples, got {len(reference)}")
    scale = radii.median()
    return torch.cat([torch.cdist(generated[i : i + 256], reference).kthvalue(k, dim=1).values
                      for i in range(0, len(generated), 256)]) / scale  # fmt: skip


def load_clip(folder: str | Path) -> tuple[torch.nn.Module, Any]:
    """A local transformers CLIP folder (``CLIPModel`` + its processor, safetensors), never a
    download: a missing or incomplete folder is one error naming it."""
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(folder)
    missing = [name for name in ("config.json", "model.safetensors") if not (folder / name).is_file()]
    if missing:
        raise UnrelearnError(
            f"CLIP folder {str(folder)!r} lacks {', '.join(missing)}; give a local CLIPModel folder saved with "
            "save_pretrained (e.g. openai/clip-vit-large-patch14, downloaded once elsewhere)"
        )
    try:
        model = CLIPModel.from_pretrained(folder, use_safetensors=True, local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise UnrelearnError(f"cannot load CLIP from {str(folder)!r} ({' '.join(str(error).split())[:200]})") from None
    return _ProjectedFeatures(model), processor


class _ProjectedFeatures(torch.nn.Module):
    """A CLIPModel whose ``get_*_features`` return the projected embeddings as tensors: under
    transformers 5 they return an output object (its ``pooler_output``), which torchmetrics 1.9's
    CLIP score cannot normalise."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config  # torchmetrics reads the text encoder's maximum length here

    @staticmethod
    def _tensor(output: Any) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def clip_scores(images: torch.Tensor, prompts: Sequence[str], clip: tuple[torch.nn.Module, Any]) -> list[float]:
    """Per image, torchmetrics' CLIP score of the pair, ``max(100 cos(image, prompt), 0)``
    (Hessel et al. 2021); ``images`` in [0, 1]. Their mean is what the papers report; torchmetrics'
    ``CLIPScore`` module clamps the mean instead, which is the same whenever the cosines are
    positive, as a trained CLIP's are."""
    from torchmetrics.functional.multimodal import clip_score

    pixels = uint8_pixels(images)
    with torch.no_grad():
        return [float(clip_score(image, prompt, model_name_or_path=lambda: clip)) for image, prompt in zip(pixels, prompts)]


def clip_image_features(images: torch.Tensor, clip: tuple[torch.nn.Module, Any], batch_size: int = 64) -> torch.Tensor:
    """CLIP's projected image embeddings (N, d) of images in [0, 1]: the feature space of CLIP-FID
    (Kynkaanniemi et al. 2023 show ImageNet-trained Inception features leak class information
    that CLIP features do not)."""
    model, processor = clip
    pixels = uint8_pixels(images)
    device = next(model.parameters()).device
    chunks = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            inputs = processor(images=list(pixels[start : start + batch_size]), return_tensors="pt")
            chunks.append(model.get_image_features(pixel_values=inputs["pixel_values"].to(device)).float().cpu())
    return torch.cat(chunks)
