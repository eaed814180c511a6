"""SalUn: gradient-based weight saliency for machine unlearning (Fan et al., ICLR 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch

from unrelearn.methods.base import OptimizationConfig, OptimizationMethod, register_method
from unrelearn.options import NonNegativeFloat, PositiveInt, Range
from unrelearn.training import Trainer
from unrelearn.worlds.base import Caption


def saliency_mask(gradients: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Keep the ``fraction`` of weights with the largest |gradient|, thresholded globally."""
    flat = torch.cat([g.abs().flatten() for g in gradients.values()])
    keep = max(1, round(fraction * flat.numel()))
    threshold = torch.topk(flat, keep, sorted=True).values[-1]
    return {name: (g.abs() >= threshold).float() for name, g in gradients.items()}


def forget_saliency(method: OptimizationMethod, batches: int, fraction: float) -> dict[str, torch.Tensor]:
    """SalUn's weight saliency: the mask of the ``fraction`` of UNet weights with the largest
    |gradient| of the diffusion loss on the concept's own pairs (forget and HRM-m prompts with
    images of the concept), summed over ``batches`` batches."""
    model = method.model
    gradients = {name: torch.zeros_like(p) for name, p in model.unet.named_parameters()}
    for batch in range(batches):
        generator = torch.Generator().manual_seed(method.config.seed * 7919 + batch)
        captions = method.pick(method.sets.forget + method.sets.hrm_m, generator)
        x0, context = method.images(captions, generator), model.encode_prompts([c.text for c in captions])
        model.unet.zero_grad(set_to_none=True)
        model.diffusion_loss(x0, context, generator).backward()
        for name, p in model.unet.named_parameters():
            if p.grad is not None:
                gradients[name] += p.grad.detach()
    model.unet.zero_grad(set_to_none=True)
    return saliency_mask(gradients, fraction)


def mask_gradients(unet: torch.nn.Module, mask: dict[str, torch.Tensor]) -> list[torch.utils.hooks.RemovableHandle]:
    """Zero the gradients of the weights ``mask`` leaves out (hooks: remove them when done)."""
    params = dict(unet.named_parameters())
    return [params[name].register_hook(lambda g, m=m: g * m) for name, m in mask.items()]


@dataclass
class SalUnConfig(OptimizationConfig):
    """Defaults from the official class-conditional DDPM code: mask 50%, retain weight 1e-3,
    lr 1e-4, batch 128, 1000 iterations; forget prompts paired with images of the "next"
    concept (``alternative``)."""

    steps: PositiveInt = 1000
    lr: NonNegativeFloat = 1e-4
    batch_size: PositiveInt = 128
    mask_fraction: Annotated[float, Range(low=0, high=1, above_low=True)] = 0.5
    mask_batches: PositiveInt = 8
    retain_weight: NonNegativeFloat = 1e-3


@register_method
class SalUn(OptimizationMethod):
    """Loss ``L_DM(forget prompts, alternative images) + alpha L_DM(retain)`` on salient weights only."""

    name = "salun"
    summary = "SalUn: relabel forget prompts to another concept's images, training only gradient-salient weights"
    Config = SalUnConfig
    masks_gradients = True
    embedded_defaults: ClassVar[dict] = {"steps": 200, "batch_size": 16, "retain_weight": 1.0, "mask_batches": 4}

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.model.unet.named_parameters())

    def _alternative(self, caption: Caption) -> Caption:
        attributes = dict(caption.attributes)
        attributes[self.sets.attribute] = self.sets.alternative
        return Caption(caption.text, attributes)

    def _forget_batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        captions = self.pick(self.sets.forget + self.sets.hrm_m, generator)
        relabelled = [self._alternative(c) for c in captions]
        return self.images(relabelled, generator), self.model.encode_prompts([c.text for c in captions])

    def compute_mask(self) -> dict[str, torch.Tensor]:
        return forget_saliency(self, self.config.mask_batches, self.config.mask_fraction)

    def bind(self, trainer: Trainer) -> None:
        self.mask = self.compute_mask()
        self._hooks = mask_gradients(self.model.unet, self.mask)

    def loss(self, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        model = self.model
        x0, context = self._forget_batch(generator)
        forget = model.diffusion_loss(x0, context, generator)
        retain = self.retain_loss(generator)
        return {"loss": forget + self.config.retain_weight * retain, "forget": forget, "retain": retain}

    def finish(self) -> None:
        for hook in self._hooks:
            hook.remove()
