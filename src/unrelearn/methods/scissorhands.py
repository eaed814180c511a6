"""Scissorhands (Wu & Harandi, ECCV 2024): trim the weights most sensitive to the forget set,
then repair, as the UnlearnCanvas benchmark (and the DiMRA/DiMUM paper) run it on diffusion."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch

from unrelearn.errors import UnrelearnError
from unrelearn.methods.base import OptimizationConfig, OptimizationMethod, register_method
from unrelearn.options import NonNegativeFloat, PositiveInt, Range
from unrelearn.training import Trainer
from unrelearn.worlds.base import Caption


def connection_sensitivity(params: dict[str, torch.Tensor], gradients: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SNIP's connection sensitivity ``|theta * dL/dtheta|`` (Lee et al. 2019)."""
    return {name: (params[name].detach() * gradients[name]).abs() for name in gradients}


def trim_mask(sensitivity: dict[str, torch.Tensor], keep: float) -> dict[str, torch.Tensor]:
    """True where a weight is among the ``1 - keep`` most sensitive, thresholded globally."""
    flat = torch.cat([s.flatten() for s in sensitivity.values()])
    kth = max(1, min(len(flat), math.ceil(keep * len(flat))))
    threshold = flat.kthvalue(kth).values
    return {name: s > threshold for name, s in sensitivity.items()}


def official_reinit_pattern(unet: torch.nn.Module) -> re.Pattern[str]:
    """The weights the official SD code re-initialises: the threshold is global, but only trimmed
    weights in the self-attention (``attn1``) of SD v1's ``output_blocks.4`` and ``.7`` are
    replaced, i.e. the second attention of the first two cross-attention up blocks
    (``up_blocks.1.attentions.1`` and ``up_blocks.2.attentions.1`` in diffusers' SD v1 UNet).
    The same rule names the matching layers of any diffusers UNet."""
    blocks = [i for i, block in enumerate(unet.up_blocks) if len(getattr(block, "attentions", [])) > 1][:2]
    if not blocks:
        raise UnrelearnError("this UNet has no up block with two attentions: Scissorhands' official "
                             "re-initialisation scope is empty; pass -o reinit=all")  # fmt: skip
    return re.compile(rf"^up_blocks\.({'|'.join(map(str, blocks))})\.attentions\.1\..*\.attn1\.")


@dataclass
class ScissorhandsConfig(OptimizationConfig):
    """Official SD defaults: threshold at the 1% most forget-sensitive weights (``sparsity``
    0.99, over the whole UNet), re-initialise those of them inside the official code's layers
    (``reinit`` "official", see :func:`official_reinit_pattern`; "all" replaces every trimmed
    weight, which on the embedded UNets hits ``conv_in``, ``conv_out`` and normalisation scales and
    destroys the model: ``benchmarks/shs_trim_damage.py``), Kaiming for weight tensors, zero
    otherwise, then repair with
    ``L_DM(retain) + lambda L_forget`` (lambda 0.1), Adam lr 5e-5, batch 16. The repair's forget
    term denoises the alternative concept's images under the forget prompts (the DiMRA paper's
    UnlearnCanvas setting)."""

    steps: PositiveInt = 1000
    lr: NonNegativeFloat = 5e-5
    batch_size: PositiveInt = 16
    sparsity: Annotated[float, Range(low=0, high=1)] = 0.99
    prune_batches: PositiveInt = 1
    forget_weight: NonNegativeFloat = 0.1
    reinit: Literal["official", "all"] = "official"


@register_method
class Scissorhands(OptimizationMethod):
    name = "shs"
    summary = "Scissorhands: re-initialise the weights most sensitive to the forget set, then repair on retain data"
    Config = ScissorhandsConfig
    embedded_defaults: ClassVar[dict] = {"steps": 200, "lr": 1e-4}

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.model.unet.named_parameters())

    def trim(self) -> dict[str, int]:
        """Re-initialise the most sensitive weights; returns how many per tensor."""
        params = self.parameters()
        gradients = {name: torch.zeros_like(p) for name, p in params.items()}
        for batch in range(self.config.prune_batches):
            generator = torch.Generator().manual_seed(self.config.seed * 7919 + batch)
            x0, context = self.pairs(self.sets.forget + self.sets.hrm_m, generator)
            self.model.unet.zero_grad(set_to_none=True)
            self.model.diffusion_loss(x0, context, generator).backward()
            for name, p in params.items():
                if p.grad is not None:
                    gradients[name] += p.grad.detach().abs()
        self.model.unet.zero_grad(set_to_none=True)
        mask = trim_mask(connection_sensitivity(params, gradients), self.config.sparsity)
        if self.config.reinit == "official":
            scope = official_reinit_pattern(self.model.unet)
            mask = {name: m if scope.search(name) else torch.zeros_like(m) for name, m in mask.items()}
        generator = torch.Generator().manual_seed(self.config.seed * 7919 + 104729)
        counts = {}
        with torch.no_grad():
            for name, p in params.items():
                if not mask[name].any():
                    continue
                fresh = torch.zeros_like(p)
                if p.dim() >= 2:
                    fan_in = p[0].numel()
                    bound = math.sqrt(6.0 / fan_in)  # Kaiming uniform for ReLU (gain sqrt 2)
                    fresh = (torch.rand(p.shape, generator=generator) * 2 - 1).mul(bound).to(p)
                p.copy_(torch.where(mask[name], fresh, p))
                counts[name] = int(mask[name].sum())
        return counts

    def bind(self, trainer: Trainer) -> None:
        # Trimming is part of the method's starting point: a resumed run loads its checkpoint
        # over the trimmed weights, so it is done once, before step 0, in either case.
        self.trimmed = self.trim()

    def loss(self, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        captions = self.pick(self.sets.forget + self.sets.hrm_m, generator)
        swapped = [Caption(c.text, {**c.attributes, self.sets.attribute: self.sets.alternative}) for c in captions]
        forget = self.model.diffusion_loss(self.images(swapped, generator), self.model.encode_prompts([c.text for c in captions]), generator)
        retain = self.retain_loss(generator)
        return {"loss": retain + self.config.forget_weight * forget, "forget": forget, "retain": retain}

    def record(self) -> dict:
        return {"trimmed_weights": sum(getattr(self, "trimmed", {}).values())}
