"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch

from unrelearn.methods.base import (
    OptimizationConfig,
    OptimizationMethod,
    ScopeName,
    register_method,
    select_parameters,
)
from unrelearn.options import NonNegativeFloat, Range


def esd_target(eps_uncond: torch.Tensor, eps_concept: torch.Tensor, eta: float) -> torch.Tensor:
    """``eps~ = eps*(x_t, ∅) - eta [eps*(x_t, c) - eps*(x_t, ∅)]`` (ESD Eq. 2, negative guidance)."""
    return eps_uncond - eta * (eps_concept - eps_uncond)


@dataclass
class ESDConfig(OptimizationConfig):
    """ESD's options; defaults are the paper's for Stable Diffusion v1.4.

    ``scope``: x (cross-attention), u (no cross-attention) or f (all); ``eta``: negative
    guidance; ``ddim_steps`` / ``sample_guidance``: the frozen model's sampler that produces
    ``x_t`` (stopped at a random step). Paper: 1000 steps, Adam, lr 1e-5, batch 1, DDIM 50,
    guidance 3.

    ``x_t_from``: which network samples ``x_t``. ``"frozen"`` (default) is theta*, as the
    paper and METHODS.md describe; ``"trained"`` is the network being fine-tuned, as the
    original code does (``quick_sample_till_t`` calls the ESD model, not ``model_orig``).
    The targets always come from the frozen model.
    """

    scope: ScopeName = "u"
    eta: NonNegativeFloat = 1.0
    # x_t is taken after a random number of sampler steps in [1, ddim_steps): at least 2.
    ddim_steps: Annotated[int, Range(low=2)] = 50
    sample_guidance: NonNegativeFloat = 3.0
    x_t_from: Literal["frozen", "trained"] = "frozen"


@register_method
class ESD(OptimizationMethod):
    """Loss ``||eps_theta(x_t, c) - eps~||^2`` with ``x_t`` sampled by the frozen model from ``c``.

    Variants are named as in the papers: ``esd-{x,u,f}-{eta}`` (esd-u-1, esd-u-3, esd-f-3,
    esd-x-1, ...).
    """

    name = "esd"
    summary = "ESD: steer eps(x_t, c) to negatively guided frozen predictions (variants esd-{x,u,f}-{eta})"
    Config = ESDConfig
    uses_teacher = True
    # Steps, not lr, are what erase here (esd-u-1 on circle, 64 samples: 200 steps 0.33,
    # lr 2e-4 0.31, 400 steps 0.08; sampling x_t at guidance 1.5 instead of 3: 0.36).
    embedded_defaults: ClassVar[dict] = {"steps": 400, "lr": 1e-4, "batch_size": 8, "ddim_steps": 10}

    @staticmethod
    def parse_variant(name: str) -> dict | None:
        match = re.fullmatch(r"esd-([xuf])-(\d+(?:\.\d+)?)", name)
        return {"scope": match[1], "eta": float(match[2])} if match else None

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        return select_parameters(self.model.unet, self.config.scope)

    def loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        config, model = self.config, self.model
        prompts = [c.text for c in self.pick(self.sets.forget, generator)]
        sampler_unet = self.teacher if config.x_t_from == "frozen" else model.unet
        x_t, t = self.sampled_x_t(prompts, generator, sampler_unet)
        context = model.encode_prompts(prompts)
        uncond = model.encode_prompts([""] * len(prompts))
        with torch.no_grad():
            eps_concept = model.predict_noise(x_t, t, context, self.teacher)
            eps_uncond = model.predict_noise(x_t, t, uncond, self.teacher)
        target = esd_target(eps_uncond, eps_concept, config.eta)
        return torch.nn.functional.mse_loss(model.predict_noise(x_t, t, context), target)
