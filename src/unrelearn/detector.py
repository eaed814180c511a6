"""A concept detector for a procedural world: a small CNN with one head per attribute.

Trained on generator ground truth with noise and blur augmentation, so that it judges a
diffusion model's slightly soft, slightly noisy generations fairly. Its penultimate layer is
the feature space for FID (see :class:`DetectorFeatures`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from unrelearn.errors import UnrelearnError
from unrelearn.io import atomic_directory, library_versions
from unrelearn.options import NonNegativeFloat, Options, PositiveInt
from unrelearn.training import TrainConfig, Trainer
from unrelearn.worlds import World, get_world

FEATURE_DIM = 64


class ConceptDetector(nn.Module):
    def __init__(self, attributes: dict[str, list[str]], feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.attributes = {name: list(values) for name, values in attributes.items()}
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 16, feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(v)) for name, v in self.attributes.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 64) of images in [0, 1]."""
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(images)
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> dict[str, list[str]]:
        """The predicted value of every attribute for every image."""
        self.eval()
        out: dict[str, list[str]] = {name: [] for name in self.attributes}
        for start in range(0, len(images), batch_size):
            logits = self(images[start : start + batch_size].float())
            for name, values in self.attributes.items():
                out[name] += [values[i] for i in logits[name].argmax(1).tolist()]
        return out

    def save(self, folder: str | Path, report: dict | None = None) -> None:
        with atomic_directory(folder) as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp / "detector.safetensors"))
            config = {"attributes": self.attributes, "feature_dim": self.heads[next(iter(self.heads))].in_features}
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            if report is not None:
                (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))

    @classmethod
    def load(cls, folder: str | Path) -> ConceptDetector:
        folder = Path(folder)
        for name in ("config.json", "detector.safetensors"):
            if not (folder / name).is_file():
                raise UnrelearnError(f"detector folder {str(folder)!r} is missing {name}")
        config = json.loads((folder / "config.json").read_text())
        detector = cls(config["attributes"], config["feature_dim"])
        detector.load_state_dict(load_file(str(folder / "detector.safetensors")))
        return detector.eval().requires_grad_(False)


class DetectorFeatures(nn.Module):
    """The detector's penultimate layer as a torchmetrics FID feature extractor."""

    def __init__(self, detector: ConceptDetector) -> None:
        super().__init__()
        self.detector = detector
        self.num_features = detector.heads[next(iter(detector.heads))].in_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.detector.features(images.float()).double()


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur (random Gaussian sigma up to 0.8 px) and additive noise (sigma up to 0.08)."""
    n = images.shape[0]
    sigma = torch.rand(n, generator=generator) * 0.8
    blurred = _gaussian_blur(images, sigma)
    noise_level = torch.rand(n, 1, 1, 1, generator=generator) * 0.08
    noisy = blurred + noise_level * torch.randn(images.shape, generator=generator)
    shift = (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 0.08
    return (noisy + shift).clamp(0, 1)


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    offsets = torch.arange(-2, 3, dtype=torch.float32)
    kernels = torch.exp(-(offsets[None] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    kernels = kernels / kernels.sum(1, keepdim=True)
    n, c, h, w = images.shape
    x = F.pad(images.reshape(1, n * c, h, w), (2, 2, 2, 2), mode="replicate")
    weight = kernels.repeat_interleave(c, 0)
    x = F.conv2d(x, weight[:, None, None, :], groups=n * c)
    x = F.conv2d(x, weight[:, None, :, None], groups=n * c)
    return x.reshape(n, c, h, w)


@dataclass
class DetectorTrainingConfig(Options):
    option_owner: ClassVar[str] = "train-detector"

    world: str = "shapes"
    steps: PositiveInt = 3000
    batch_size: PositiveInt = 128
    lr: NonNegativeFloat = 2e-3
    seed: int = 0
    heldout: PositiveInt = 4000


def detector_accuracy(detector: ConceptDetector, world: World, n: int, seed: int, augmented: bool) -> dict[str, float]:
    generator = torch.Generator().manual_seed(seed)
    labels = world.sample_labels(n, generator)
    # Held-out data where the world has it (a real data set's held-out split).
    images, _index = world.render_labels(labels, generator, heldout=True)
    if augmented:
        images = augment(images, generator)
    predicted = detector.predict(images)
    return {
        name: sum(p == row[name] for p, row in zip(predicted[name], labels)) / n for name in detector.attributes
    }


def train_detector(
    out: str | Path, config: DetectorTrainingConfig, progress: bool = True, device: str | torch.device = "cpu"
) -> dict:
    """Train on fresh generator batches; report held-out accuracy per attribute."""
    world = get_world(config.world)
    torch.manual_seed(config.seed)
    detector = ConceptDetector(world.attributes).to(device)
    detector.train()

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        labels = world.sample_labels(config.batch_size, generator)
        images, index = world.render_labels(labels, generator)
        logits = detector(augment(images, generator).to(device))
        index = {name: value.to(device) for name, value in index.items()}
        return sum(F.cross_entropy(logits[name], index[name]) for name in detector.attributes)

    train_config = TrainConfig(steps=config.steps, lr=config.lr, warmup_steps=100, seed=config.seed, grad_clip=None)
    began = time.perf_counter()
    Trainer(dict(detector.named_parameters()), loss_fn, train_config, progress=progress, description="detector").run()
    detector.eval().cpu()
    # Held-out seed: far from every training step's seed.
    report = {
        "config": asdict(config),
        "heldout_accuracy_clean": detector_accuracy(detector, world, config.heldout, 10**9 + 7, augmented=False),
        "heldout_accuracy_augmented": detector_accuracy(detector, world, config.heldout, 10**9 + 9, augmented=True),
        "wall_seconds": time.perf_counter() - began,
        "versions": library_versions(),
    }
    detector.save(out, report)
    return report
