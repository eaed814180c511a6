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


# Steps whose x_t the frozen teacher samples in one batch: at batch 8 its DDIM sampling was 62%
# of an ESD step on a 2-core CPU, and sampling 160 at once is 2.4x cheaper per sample.
X_T_BLOCK = 20


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

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._x_t_block: dict[int, tuple[list[str], torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def parse_variant(name: str) -> dict | None:
        match = re.fullmatch(r"esd-([xuf])-(\d+(?:\.\d+)?)", name)
        return {"scope": match[1], "eta": float(match[2])} if match else None

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        return select_parameters(self.model.unet, self.config.scope)

    def frozen_x_t(self, step: int, generator: torch.Generator) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """This step's prompts and the frozen teacher's ``x_t`` and ``t``, drawn exactly as the
        step-by-step sampler draws them, but sampled for ``X_T_BLOCK`` steps in one batch.

        Blocks are aligned to multiples of ``X_T_BLOCK`` so that a resumed run batches every step
        as the uninterrupted run did (same batches, same rounding). ``generator`` is the
        trainer's for this step (seeded ``base + step``); the other steps' generators are derived
        from its seed, and it is advanced past the same draws, so wrappers that draw from it next
        see what they would without batching.
        """
        first = step - step % X_T_BLOCK
        if step not in self._x_t_block:
            groups, prompts_by_step = [], {}
            for s in range(first, min(first + X_T_BLOCK, self.config.steps)):
                draws = torch.Generator().manual_seed(generator.initial_seed() - step + s)
                prompts, stop, noise = self._x_t_draws(draws)
                groups.append((prompts, noise, stop))
                prompts_by_step[s] = prompts
            results = self.model.denoise_groups(groups, steps=self.config.ddim_steps, guidance=self.config.sample_guidance,
                                                unet=self.teacher)  # fmt: skip
            self._x_t_block = {s: (prompts_by_step[s], *result) for s, result in zip(prompts_by_step, results)}
        self._x_t_draws(generator)
        return self._x_t_block.pop(step)

    def _x_t_draws(self, generator: torch.Generator) -> tuple[list[str], int, torch.Tensor]:
        """The random draws of one step's x_t, in the order :meth:`sampled_x_t` makes them."""
        prompts = [c.text for c in self.pick(self.sets.forget, generator)]
        stop = int(torch.randint(1, self.config.ddim_steps, (1,), generator=generator))
        return prompts, stop, torch.randn(self.model.sample_shape(len(prompts)), generator=generator)

    def loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        config, model = self.config, self.model
        if config.x_t_from == "frozen":
            prompts, x_t, t = self.frozen_x_t(step, generator)
        else:
            prompts = [c.text for c in self.pick(self.sets.forget, generator)]
            x_t, t = self.sampled_x_t(prompts, generator, model.unet)
        return self._loss_on(prompts, x_t, t)(None)

    def loss_at(self, generator: torch.Generator):
        """ESD's loss on one draw of ``x_t``, sampled by the frozen model (the default ``x_t_from``)."""
        prompts = [c.text for c in self.pick(self.sets.forget, generator)]
        x_t, t = self.sampled_x_t(prompts, generator, self.teacher)
        return self._loss_on(prompts, x_t, t)

    def _loss_on(self, prompts: list[str], x_t: torch.Tensor, t: torch.Tensor):
        """``||eps_params(x_t, c) - target||^2`` as a function of substituted parameters, the
        negatively guided target computed once by the frozen teacher."""
        model = self.model
        context = model.encode_prompts(prompts)
        uncond = model.encode_prompts([""] * len(prompts))
        with torch.no_grad():
            eps_concept = model.predict_noise(x_t, t, context, self.teacher)
            eps_uncond = model.predict_noise(x_t, t, uncond, self.teacher)
        target = esd_target(eps_uncond, eps_concept, self.config.eta)
        return lambda params: torch.nn.functional.mse_loss(model.predict_noise(x_t, t, context, params=params), target)
