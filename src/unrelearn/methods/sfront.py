"""Sfront / SFR-on: saliency forgetting in the remain-preserving manifold, online (Huang et al.,
NeurIPS 2024), the divergent baseline of the DiMRA/DiMUM paper."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from unrelearn.methods.base import OptimizationConfig, OptimizationMethod, register_method
from unrelearn.options import NonNegativeFloat, PositiveFloat, PositiveInt


def adaptive_ascent_weights(losses: torch.Tensor, power: float) -> torch.Tensor:
    """Per-example weights ``n l_i^-p / sum_j l_j^-p`` (no gradient): the ascent leans on the
    examples the model still fits best. ``power`` 0 gives plain gradient ascent (all ones)."""
    inverse = 1.0 / (losses.detach() ** power + 1e-8)
    return len(losses) * inverse / inverse.sum()


@dataclass
class SfrontConfig(OptimizationConfig):
    """Defaults from the official DDPM code: forget weight 10 with a cosine decay, remain weight
    1, adaptive gradient ascent with power 0.5, Adam lr 1e-4, batch 128, clip 1.0. Its "online"
    update alternates an ascent step on the forget set with a descent step on the remain set
    (the fast-slow approximation of the remain-geometry manifold); here each is one trainer
    step, so ``steps`` counts both (the official 1K iterations are 2K steps)."""

    steps: PositiveInt = 2000
    lr: NonNegativeFloat = 1e-4
    batch_size: PositiveInt = 128
    grad_clip: PositiveFloat | None = 1.0
    forget_weight: NonNegativeFloat = 10.0
    decay_forget_weight: bool = True
    remain_weight: NonNegativeFloat = 1.0
    ascent_power: NonNegativeFloat = 0.5


@register_method
class Sfront(OptimizationMethod):
    name = "sfront"
    summary = "Sfront (SFR-on): gradient ascent on the forget set alternating with descent on the remain set"
    Config = SfrontConfig
    embedded_defaults: ClassVar[dict] = {"steps": 200, "batch_size": 16}

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.model.unet.named_parameters())

    def forget_weight(self, step: int) -> float:
        config = self.config
        if not config.decay_forget_weight:
            return config.forget_weight
        return config.forget_weight * (1 + math.cos(math.pi * step / config.steps)) / 2

    def loss(self, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if step % 2 == 1:
            remain = self.retain_loss(generator)
            return {"loss": self.config.remain_weight * remain, "remain": remain}
        x0, context = self.pairs(self.sets.forget + self.sets.hrm_m, generator)
        losses = self.model.diffusion_loss(x0, context, generator, reduction="none")
        forget = (adaptive_ascent_weights(losses, self.config.ascent_power) * losses).mean()
        return {"loss": -self.forget_weight(step) * forget, "forget": forget}
