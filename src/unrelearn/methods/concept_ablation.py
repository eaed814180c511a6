"""Concept Ablation (Kumari et al., ICCV 2023), model-based variant."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from unrelearn.methods.base import (
    OptimizationConfig,
    OptimizationMethod,
    ScopeName,
    register_method,
    select_parameters,
)
from unrelearn.options import NonNegativeFloat, PositiveInt
from unrelearn.worlds.base import Caption


@dataclass
class ConceptAblationConfig(OptimizationConfig):
    """Paper defaults: cross-attention k/v fine-tuning (here the whole cross-attention scope),
    lr 2e-6 x batch 8 (~1.6e-5 effective), 400 steps; anchor = a neighbouring concept."""

    steps: PositiveInt = 400
    lr: NonNegativeFloat = 2e-6
    batch_size: PositiveInt = 8
    scope: ScopeName = "x"
    anchor_weight: NonNegativeFloat = 1.0


@register_method
class ConceptAblation(OptimizationMethod):
    """Loss ``||eps_theta(x_t, c*) - sg(eps_theta(x_t, c_anchor))||^2`` with ``x_t`` noised images
    of the anchor concept, plus ``L_DM`` on the anchor pairs to keep the anchor intact."""

    name = "ca"
    summary = "Concept Ablation: match the forget prompt's prediction to the anchor concept's on anchor images"
    Config = ConceptAblationConfig
    embedded_defaults: ClassVar[dict] = {"steps": 200, "lr": 3e-4}

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        return select_parameters(self.model.unet, self.config.scope)

    def loss(self, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        model, config = self.model, self.config
        forget = self.pick(self.sets.forget + self.sets.hrm_m, generator)
        anchors = [Caption(c.text, {**c.attributes, self.sets.attribute: self.sets.alternative}) for c in forget]
        anchor_texts = [self.world.describe(c.attributes) for c in anchors]
        x0 = self.images(anchors, generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        t = torch.randint(0, model.num_train_timesteps, (len(x0),), generator=generator).to(x0.device)
        x_t = model.scheduler.add_noise(x0, noise, t)
        anchor_context = model.encode_prompts(anchor_texts)
        with torch.no_grad():
            target = model.predict_noise(x_t, t, anchor_context)
        ablation = torch.nn.functional.mse_loss(model.predict_noise(x_t, t, model.encode_prompts([c.text for c in forget])), target)
        anchor = model.diffusion_loss(x0, anchor_context, generator)
        return {"loss": ablation + config.anchor_weight * anchor, "ablation": ablation, "anchor": anchor}

