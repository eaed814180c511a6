"""Meta-Unlearning (Gao et al., ICCV 2025, Algorithm 1) as a wrapper of any optimization method.

Each outer step adds to the method's own gradient ``gamma1 grad L_unlearn(theta)`` the meta
term ``gamma2 grad_theta L_meta(theta_FT)``, where ``theta_FT`` is ``inner_steps`` (M) steps of a
simulated attacker (SGD as in the paper's formula, or Adam as in the official code) at lr
``inner_lr`` (tau) on a batch of the forget set, and (Eq. 3)

    L_meta(theta_FT) = -L_DM(theta_FT; D_FT) - zeta [L_DM(theta_FT; D_retain) - L_DM(theta; D_retain)].

``meta_grad="exact"`` backpropagates through the M inner steps (second order, math attention);
``"first-order"`` takes the gradient of the first two terms at ``theta_FT`` and applies it to
``theta``, as the official code does. After a closed-form method (``meta:uce``, ``meta:rece``)
the meta objective is optimized alone, as a second stage from the closed-form result. ``retain_set`` picks D_retain: the retain prompts, the
concept's ``related`` look-alikes (the paper's "skin" for "nudity": the knowledge that should
self-destruct when the concept is relearned) or both.

Every step logs the self-destruction signal (the paper's Fig. 6): the cosine between
``grad L_DM(theta; D_FT)`` and ``grad L_DM(theta; D_retain)`` on the ``signal_scope``
parameters, and the inner losses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch

from unrelearn.errors import UnrelearnError
from unrelearn.finetuning import SGD, Adam, fine_tune
from unrelearn.methods.base import (
    ClosedFormMethod,
    Method,
    OptimizationConfig,
    OptimizationMethod,
    ScopeName,
    register_wrapper,
    select_parameters,
)
from unrelearn.model import differentiable_attention
from unrelearn.options import NonNegativeFloat, PositiveInt, extend_config


@dataclass
class MetaOptions:
    """The meta objective's options, added to the wrapped method's own.

    Paper defaults: gamma2 0.05 for ESD-u-1 and 0.1 otherwise; M in {1, 3, 5}; the inner lr is
    the attackers' 1e-5 (the embedded world's attacks run at 1e-4).
    """

    gamma1: NonNegativeFloat = 1.0
    gamma2: NonNegativeFloat = 0.1
    zeta: NonNegativeFloat = 1.0
    inner_steps: PositiveInt = 1
    inner_lr: NonNegativeFloat = 1e-5
    inner_optimizer: Literal["sgd", "adam"] = "sgd"
    inner_batch_size: PositiveInt = 4
    meta_grad: Literal["exact", "first-order"] = "exact"
    retain_set: Literal["retain", "related", "both"] = "related"
    signal_scope: ScopeName = "x"


# The embedded world's attackers fine-tune at 1e-4 (attacks/finetune.py EMBEDDED_DEFAULTS).
EMBEDDED_META_DEFAULTS: dict[str, Any] = {"inner_lr": 1e-4}


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    dot = sum((x.double() * y.double()).sum() for x, y in zip(a, b))
    norm_a = torch.sqrt(sum((x.double() ** 2).sum() for x in a))
    norm_b = torch.sqrt(sum((y.double() ** 2).sum() for y in b))
    return float(dot / (norm_a * norm_b).clamp_min(1e-30))


@register_wrapper("meta", "Meta-Unlearning around any method (e.g. meta:esd-u-1, meta:uce)", (MetaOptions,))
def meta_variant(base: type[Method]) -> type[Method]:
    """``meta:NAME``: ``base`` with the meta objective added to its loss."""
    if issubclass(base, ClosedFormMethod):
        return _second_stage(base)
    if base.masks_gradients:
        raise UnrelearnError(
            f"meta:{base.name}: {base.name} masks gradients with hooks, which would also mask the simulated "
            "attacker's gradients; not supported yet"
        )
    config_class = extend_config("Meta", base, (MetaOptions,), (base.Config,))

    class Meta(base):  # type: ignore[misc, valid-type]
        name = f"meta:{base.name}"
        summary = f"Meta-Unlearning around {base.name}: + gamma2 grad L_meta(theta_FT) (Eq. 3), exact or first-order"
        Config = config_class
        embedded_defaults = base.embedded_defaults | EMBEDDED_META_DEFAULTS

        def differentiates_twice(self) -> bool:
            return self.config.meta_grad == "exact"

        def loss(self, step: int, generator: torch.Generator) -> dict[str, Any]:
            out = super().loss(step, generator)
            terms = dict(out) if isinstance(out, Mapping) else {"loss": out}
            unlearn_loss = terms.pop("loss")
            meta = weighted_meta_terms(self, generator)
            result = {f"unlearn_{k}": v for k, v in terms.items()} | {"unlearn": unlearn_loss}
            return result | meta | {"loss": self.config.gamma1 * unlearn_loss + meta["loss"]}

    Meta.__name__ = Meta.__qualname__ = f"Meta{base.__name__}"
    return Meta


@dataclass
class SecondStageOptions:
    """The meta stage after a closed-form edit (UCE, RECE): Algorithm 1 from theta^UN, without
    L_unlearn. The paper trains it at lr 1e-5; which parameters it trains is not stated, so the
    default is the cross-attention the closed-form edit changed."""

    scope: ScopeName = "x"


def _second_stage(base: type[ClosedFormMethod]) -> type[Method]:
    """``meta:uce`` / ``meta:rece``: the closed-form edit, then optimization of ``L_meta`` alone."""
    config_class = extend_config("Meta", base, (MetaOptions, SecondStageOptions), (base.Config, OptimizationConfig))
    base_fields = {f.name for f in fields(base.Config)}

    class MetaSecondStage(OptimizationMethod):
        name = f"meta:{base.name}"
        summary = f"Meta-Unlearning second stage after {base.name}: optimize L_meta (Eq. 3) from the closed-form result"
        Config = config_class
        embedded_defaults = (
            base.embedded_defaults | EMBEDDED_META_DEFAULTS | {"steps": 100, "lr": 1e-4, "batch_size": 1}
        )

        def __init__(self, model, sets, config, world=None) -> None:
            super().__init__(model, sets, config, world)
            base_config = base.Config(**{k: v for k, v in asdict(config).items() if k in base_fields})
            self.closed_form = base(model, sets, base_config, world)
            self.closed_form_stats: dict[str, Any] = {}

        def parameters(self) -> dict[str, torch.nn.Parameter]:
            return select_parameters(self.model.unet, self.config.scope)

        def differentiates_twice(self) -> bool:
            return self.config.meta_grad == "exact"

        def bind(self, trainer) -> None:
            # The edit runs before the trainer loads a checkpoint: deterministic, so a resumed
            # stage starts from the same theta^UN.
            self.closed_form_stats = self.closed_form.apply()

        def loss(self, step: int, generator: torch.Generator) -> dict[str, Any]:
            return weighted_meta_terms(self, generator)

        def record(self) -> dict[str, Any]:
            return {"stats": self.closed_form_stats}

    MetaSecondStage.__name__ = MetaSecondStage.__qualname__ = f"Meta{base.__name__}"
    return MetaSecondStage


def weighted_meta_terms(method: OptimizationMethod, generator: torch.Generator) -> dict[str, Any]:
    """:func:`meta_terms` as the trainer takes them: ``"loss"`` and ``"grads"`` scaled by gamma2."""
    meta = meta_terms(method, generator)
    gamma2 = method.config.gamma2
    result: dict[str, Any] = {"loss": gamma2 * meta.pop("differentiable")}
    grads = meta.pop("grads")
    if grads:
        result["grads"] = {n: gamma2 * g for n, g in grads.items()}
    return meta | result


def meta_terms(method: OptimizationMethod, generator: torch.Generator) -> dict[str, Any]:
    """``L_meta`` for one outer step: ``"differentiable"`` (a loss whose gradient at theta is the
    meta-gradient, or its theta-term in first-order mode), ``"grads"`` (first-order mode: the
    gradient taken at theta_FT) and the logged scalars."""
    config, model, sets = method.config, method.model, method.sets
    params = method.parameters()
    retain_pool = {"retain": sets.retain, "related": sets.related, "both": sets.retain + sets.related}[
        config.retain_set
    ]
    if not retain_pool:
        raise UnrelearnError(
            f"meta: the concept {sets.concept!r} has no {config.retain_set!r} prompts; choose another retain_set"
        )
    ft_x0, ft_context = method.pairs(sets.hrm_m or sets.forget, generator, config.inner_batch_size)
    retain_x0, retain_context = method.pairs(retain_pool, generator, config.inner_batch_size)
    # Common random numbers: the same noise and timesteps at theta and at theta_FT, so the
    # difference in Eq. 3 measures the fine-tuning, not the draw.
    seed = int(torch.randint(2**62, (1,), generator=generator))

    def ft_loss(p: Mapping[str, torch.Tensor], k: int) -> torch.Tensor:
        return model.diffusion_loss(ft_x0, ft_context, torch.Generator().manual_seed(seed + k), params=p)

    def retain_loss(p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return model.diffusion_loss(retain_x0, retain_context, torch.Generator().manual_seed(seed - 1), params=p)

    # The signal is measured on its own named subset, trained or not (ESD-u trains no
    # cross-attention, yet the angle there is what Fig. 6 reads).
    subset = [p for p in select_parameters(model.unet, config.signal_scope).values() if p.requires_grad]
    signal = float("nan")
    if subset:
        grad_ft = torch.autograd.grad(ft_loss(params, 0), subset)
        grad_retain = torch.autograd.grad(retain_loss(params), subset)
        signal = cosine(list(grad_ft), list(grad_retain))
    logged: dict[str, Any] = {"cos_ft_retain": signal}
    if config.gamma2 == 0:
        # Nothing to add: the wrapped method's own step, bit for bit.
        return {"differentiable": torch.zeros(()), "grads": None, **logged}

    optimizer = SGD(config.inner_lr) if config.inner_optimizer == "sgd" else Adam(config.inner_lr)
    exact = config.meta_grad == "exact"
    with differentiable_attention() if exact else contextlib.nullcontext():
        inner = fine_tune(ft_loss, params, optimizer, config.inner_steps, create_graph=exact)
        at_theta = retain_loss(params)
        relearned = ft_loss(inner.params, config.inner_steps)
        retain_after = retain_loss(inner.params)
        logged |= {"inner_first": inner.losses[0], "inner_last": inner.losses[-1], "ft_after": float(relearned.detach()),
                   "retain_shift": float((retain_after - at_theta).detach())}  # fmt: skip
        if exact:
            meta = -relearned - config.zeta * (retain_after - at_theta)
            return {"differentiable": meta, "grads": None, "meta": float(meta.detach()), **logged}
        at_ft = -relearned - config.zeta * retain_after
        grads = torch.autograd.grad(at_ft, list(inner.params.values()))
    meta_value = float(at_ft.detach() + config.zeta * at_theta.detach())
    return {
        "differentiable": config.zeta * at_theta,
        "grads": dict(zip(inner.params, grads)),
        "meta": meta_value,
        **logged,
    }
