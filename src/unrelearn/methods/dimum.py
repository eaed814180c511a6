"""DiMUM: Diffusion Model Unlearning by Memorization (the DiMRA/DiMUM paper, Eq. 8-11)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch

from unrelearn.errors import UnrelearnError
from unrelearn.methods.base import OptimizationConfig, OptimizationMethod, register_method
from unrelearn.methods.salun import forget_saliency, mask_gradients
from unrelearn.options import NonNegativeFloat, PositiveInt, Range
from unrelearn.training import Trainer
from unrelearn.worlds.base import Caption

# Batches of the concept's pairs that a saliency mask's gradient sums (SalUn's embedded count).
MASK_BATCHES = 4


@dataclass
class DiMUMConfig(OptimizationConfig):
    """``L_DM(theta; D_retain) + lambda L_DM(theta; D_u')`` (Eq. 11), ``D_u'`` the forget prompts
    paired with a fixed set of images of the alternative concept (Eq. 9). The paper trains a
    CIFAR-10 DDPM for 10K-20K steps and names no lr or lambda: lr 1e-4 and lambda 1 here.
    ``alternative`` defaults to the world's (the next class, as in the paper)."""

    steps: PositiveInt = 10000
    lr: NonNegativeFloat = 1e-4
    batch_size: PositiveInt = 16
    unlearn_weight: NonNegativeFloat = 1.0
    alternative: str | None = None
    # How many alternative images each forget prompt is paired with, made once: DiMUM
    # *memorizes* a finite set, which is what makes its loss convergent.
    images_per_prompt: PositiveInt = 8
    # Not the paper's: train only the weights SalUn's saliency selects (this fraction of the
    # UNet, by |gradient| on the concept's own pairs) instead of all of them. SalUn and DiMUM
    # differ in two ways (a fixed set of alternative images, all weights trained); this option
    # separates them.
    mask_fraction: Annotated[float, Range(low=0, high=1, above_low=True)] | None = None


@register_method
class DiMUM(OptimizationMethod):
    """The forget prompts learn to generate images of another concept, in a convergent loss."""

    name = "dimum"
    summary = "DiMUM: memorize a fixed set of alternative images under the forget prompts, plus L_DM on retain data"
    Config = DiMUMConfig
    embedded_defaults: ClassVar[dict] = {"steps": 400}

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.model.unet.named_parameters())

    @property
    def alternative(self) -> str:
        alternative = self.config.alternative or self.sets.alternative
        if not alternative:
            raise UnrelearnError(f"DiMUM needs an alternative concept for {self.sets.concept!r}: pass -o alternative=NAME")
        if self.world is not None and alternative not in self.world.attributes.get(self.sets.attribute, []):
            known = ", ".join(v for v in self.world.attributes[self.sets.attribute] if v != self.sets.concept)
            raise UnrelearnError(f"alternative {alternative!r} is not a {self.sets.attribute} of this world; choose one of {known}")
        if alternative == self.sets.concept:
            raise UnrelearnError("the alternative concept must differ from the concept to unlearn")
        return alternative

    def bind(self, trainer: Trainer) -> None:
        self._hooks = []
        if self.config.mask_fraction is None:
            return
        if type(self).name != DiMUM.name:
            raise UnrelearnError(f"{type(self).name}: -o mask_fraction masks gradients with hooks, which would also mask "
                                 "the defence's simulated fine-tuning; not supported")  # fmt: skip
        self.mask = forget_saliency(self, MASK_BATCHES, self.config.mask_fraction)
        self._hooks = mask_gradients(self.model.unet, self.mask)

    def finish(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def memorized_pairs(self) -> tuple[list[Caption], torch.Tensor]:
        """``D_u'``: each forget prompt ``images_per_prompt`` times, with an image of the
        alternative concept stating the prompt's other attributes (a fixed seed: a resumed run
        memorizes the same set)."""
        if not hasattr(self, "_memorized"):
            prompts = list({c.text: c for c in self.sets.forget + self.sets.hrm_m}.values())
            captions = [c for c in prompts for _ in range(self.config.images_per_prompt)]
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + 17)
            if self.world is not None:
                swapped = [Caption(c.text, {**c.attributes, self.sets.attribute: self.alternative}) for c in captions]
                images = self.images(swapped, generator)
            else:  # no ground truth: theta*'s generations of the alternative concept
                pool = self._generated(self.alternative, self.config.images_per_prompt)
                images = pool.repeat(len(prompts), *([1] * (pool.dim() - 1)))
            self._memorized = (captions, images)
        return self._memorized

    def loss(self, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        captions, images = self.memorized_pairs()
        picks = torch.randint(len(captions), (self.config.batch_size,), generator=generator)
        context = self.model.encode_prompts([captions[i].text for i in picks.tolist()])
        unlearn = self.model.diffusion_loss(images[picks.to(images.device)], context, generator)
        retain = self.retain_loss(generator)
        return {"loss": retain + self.config.unlearn_weight * unlearn, "unlearn": unlearn, "retain": retain}
