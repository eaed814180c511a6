"""ResAlign (NeurIPS 2025): unlearning whose harmfulness stays low after fine-tuning.

The objective is ``L_harm(theta) + alpha R(theta) + beta [L_harm(theta_FT*) - L_harm(theta)]``
with ``L_harm`` the negative diffusion loss on the concept's (prompt, image) pairs, ``R`` the
distillation of the original model's noise predictions on retained prompts, and ``theta_FT*``
the proximal model of fine-tuning of :mod:`unrelearn.defences.implicit`. Each outer step samples
``configs_per_step`` (J) fine-tuning configurations (lr, steps, SGD or Adam, full or LoRA, data)
from a distribution, runs each from ``theta`` through the shared
:func:`unrelearn.finetuning.simulate` (no graph, no trajectory kept), and averages their
hypergradients ``(I + gamma H)^-1 grad L_harm(theta_FT*)``.

``resalign`` is the paper's method; ``resalign:NAME`` adds the resilience term to any
optimization method's loss, and runs it (with ``R``) as a second stage after a closed-form one
(``resalign:uce``). Every solve's residual is logged; failed solves are counted in run.json,
left out of the average (the step says how many), and a run whose solves mostly fail stops.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal

import torch

from unrelearn.attacks.data import AttackData, build_attack_data
from unrelearn.attacks.finetune import add_lora, fuse_lora
from unrelearn.defences.implicit import HessianOperator, norm, richardson_solve
from unrelearn.errors import UnrelearnError
from unrelearn.finetuning import FineTuning, LoRA, Params, simulate
from unrelearn.methods.base import (
    ClosedFormMethod,
    Method,
    OptimizationConfig,
    OptimizationMethod,
    ScopeName,
    register_method,
    register_wrapper,
    select_parameters,
)
from unrelearn.model import differentiable_attention
from unrelearn.options import Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, extend_config

OUTER_ADAPTER = "resalign"
LIST_OPTIONS = ("ft_lrs", "ft_steps", "ft_optimizers", "ft_modes", "ft_data")
# Solves counted before the failure share can stop a run: one bad step is not "mostly".
MIN_SOLVES_BEFORE_STOPPING = 10


@dataclass
class ResilienceOptions:
    """The resilience term and the distribution of simulated fine-tunings (paper defaults).

    ``gamma`` is the proximal parameter; unset, each configuration uses ``steps * lr``, the
    proximal step that n gradient steps at lr eta match to first order. ``ft_data`` names
    attack data sets (``hrm-m`` harmful, ``clean`` benign, ``poison:F`` a mix) or folders.
    """

    beta: NonNegativeFloat = 0.8
    configs_per_step: PositiveInt = 3
    solve_iterations: NonNegativeInt = 5
    gamma: PositiveFloat | None = None
    solve_tolerance: PositiveFloat = 0.1
    max_failed_share: Fraction = 0.5
    ft_lrs: list[NonNegativeFloat] = field(default_factory=lambda: [1e-4, 1e-5, 1e-6])
    ft_steps: list[PositiveInt] = field(default_factory=lambda: [5, 10, 20, 30])
    ft_optimizers: list[Literal["sgd", "adam"]] = field(default_factory=lambda: ["sgd", "adam"])
    ft_modes: list[Literal["full", "lora"]] = field(default_factory=lambda: ["full", "lora"])
    ft_data: list[str] = field(default_factory=lambda: ["hrm-m", "clean", "poison:0.5"])
    ft_batch_size: PositiveInt = 1
    ft_data_size: PositiveInt = 64
    harm_batch_size: PositiveInt = 4
    # What L_harm is: "ga", the paper's negative diffusion loss on the concept's pairs (the
    # official code's loss_mode ga); "method", the wrapped method's own loss (its loss_mode esd,
    # for ESD): bounded, and minimized rather than fought by the resilience term's -L_harm(theta).
    harm: Literal["ga", "method"] = "ga"
    # "difference": the paper's beta [L_harm(theta_FT*) - L_harm(theta)]. Around a method whose
    # loss is not L_harm (resalign:esd-u-1 with harm ga), its -beta L_harm(theta) half relearns
    # the concept at theta (docs/defences/resalign_tuning.md); "after_ft" keeps only
    # beta L_harm(theta_FT*): unlearn at the fine-tuned point as well as at theta.
    resilience: Literal["difference", "after_ft"] = "difference"


# The embedded world's attacks run at 1e-4 where the paper's run at 1e-5: the lr grid moves with
# them. Batch 4 because one 16x16 image is a noisier gradient than one SD latent.
EMBEDDED_RESILIENCE_DEFAULTS: dict[str, Any] = {"ft_lrs": [1e-3, 1e-4, 1e-5], "ft_batch_size": 4}


def sample_tuning(options: ResilienceOptions, generator: torch.Generator) -> FineTuning:
    """One fine-tuning configuration drawn uniformly from each of the option lists."""

    def draw(values: list) -> Any:
        return values[int(torch.randint(len(values), (1,), generator=generator))]

    return FineTuning(
        data=draw(options.ft_data), steps=draw(options.ft_steps), lr=draw(options.ft_lrs),
        optimizer=draw(options.ft_optimizers), mode=draw(options.ft_modes), batch_size=options.ft_batch_size,
    )  # fmt: skip


class _TeacherSampler:
    """The original model ``theta*`` (the method's frozen teacher) as attack data needs it: ``sample``."""

    def __init__(self, method: OptimizationMethod, steps: int = 25) -> None:
        self.method, self.steps = method, steps

    def sample(self, prompts: list[str], seed: int = 0) -> torch.Tensor:
        model = self.method.model
        generator = torch.Generator().manual_seed(seed)
        x, _ = model.denoise(prompts, steps=self.steps, guidance=model.guidance, generator=generator, unet=self.method.teacher)
        return model.model_space_to_images(x).cpu()


class Resilience:
    """The resilience term of one method instance: its data sets, its solve counts, its terms."""

    def __init__(self, method: OptimizationMethod) -> None:
        self.method = method
        config = method.config
        for name in LIST_OPTIONS:
            if not getattr(config, name):
                raise UnrelearnError(f"{method.name}: option {name} is empty; give at least one value")
        world, sets = method.world, method.sets
        original = None
        if world is None:  # no ground truth (Stable Diffusion): the simulated attackers' data is theta*'s own
            from unrelearn.worlds import get_world

            world, original = get_world("prompts"), _TeacherSampler(method)
        self.data: dict[str, AttackData] = {
            name: build_attack_data(name, world, sets, size=config.ft_data_size, seed=config.seed, original_model=original)
            for name in config.ft_data
        }
        self.harmful = sets.hrm_m or sets.forget
        self.trainer = None
        # What the error of a run stopped for failing solves quotes (this process's solves).
        self.failed_residuals: list[float] = []
        self.dampings = 0
        if config.harm == "method" and type(method).loss_at is OptimizationMethod.loss_at:
            raise UnrelearnError(
                f"{method.name}: harm=method needs a wrapped method that offers its loss at other weights "
                "(esd variants do); use harm=ga"
            )

    def counts(self) -> dict[str, int]:
        # Kept in the trainer's checkpoint state, so a resumed run keeps counting.
        state = self.trainer.extra_state if self.trainer is not None else {}
        return state.setdefault("solves", {"attempted": 0, "failed": 0})

    def _data_batch(self, data: AttackData, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        images, prompts = data.batch(self.method.config.ft_batch_size, generator)
        model = self.method.model
        return model.images_to_model_space(images.to(model.device)), model.encode_prompts(prompts)

    def terms(self, generator: torch.Generator) -> dict[str, Any]:
        """``"loss"``: ``-beta L_harm(theta)`` (differentiable; zero for ``resilience`` after_ft);
        ``"grads"``: ``beta`` times the mean
        hypergradient of the solves that converged; the logged scalars."""
        method, config = self.method, self.method.config
        model = method.model
        params = method.parameters()
        harm = self._harm(generator)

        at_theta = harm(None)
        lora_bases = {n: p for n, p in model.unet.named_parameters() if n not in params}
        hypergrads: list[Params] = []
        residuals, dampings, harm_after = [], 0, []
        for _ in range(config.configs_per_step):
            solve, after = self._solve(sample_tuning(config, generator), params, lora_bases, harm, generator)
            counts = self.counts()
            counts["attempted"] += 1
            residuals.append(solve.residual)
            dampings += solve.dampings
            self.dampings += solve.dampings
            harm_after.append(after)
            if solve.converged:
                hypergrads.append(solve.x)
            else:
                counts["failed"] += 1
                self.failed_residuals.append(solve.residual)
        self._stop_if_mostly_failing()
        logged = {
            "harm": float(at_theta.detach()), "harm_after_ft": sum(harm_after) / len(harm_after),
            "solve_residual": max(residuals), "solve_dampings": float(dampings),
            "solves_failed": float(config.configs_per_step - len(hypergrads)),
        }  # fmt: skip
        if not hypergrads:
            # No converged solve this step: the whole term is left out (both halves), and counted.
            return logged | {"loss": torch.zeros((), device=model.device), "grads": {}, "hypergrad_norm": 0.0}
        mean = {n: sum(h[n] for h in hypergrads) / len(hypergrads) for n in params}
        logged["hypergrad_norm"] = norm(mean)
        difference = config.resilience == "difference"
        logged["resilience"] = config.beta * (logged["harm_after_ft"] - (logged["harm"] if difference else 0.0))
        return logged | {
            "loss": -config.beta * at_theta if difference else torch.zeros((), device=model.device),
            "grads": {n: config.beta * g.to(params[n].dtype) for n, g in mean.items()},
        }

    def _harm(self, generator: torch.Generator) -> Callable[[Mapping[str, torch.Tensor] | None], torch.Tensor]:
        """``L_harm`` on one draw, as a function of the weights: common random numbers, so theta
        and theta_FT* are compared on the same noise, timesteps and prompts."""
        method, config = self.method, self.method.config
        if config.harm == "method":
            return method.loss_at(generator)
        harm_x0, harm_context = method.pairs(self.harmful, generator, config.harm_batch_size)
        harm_seed = int(torch.randint(2**62, (1,), generator=generator))
        model = method.model
        return lambda p: -model.diffusion_loss(harm_x0, harm_context, torch.Generator().manual_seed(harm_seed), params=p)

    def _solve(self, tuning: FineTuning, params: Mapping[str, torch.Tensor], lora_bases: Mapping[str, torch.Tensor],
               harm, generator: torch.Generator):  # fmt: skip
        """One sampled fine-tuning from theta, then ``(I + gamma H)^-1 grad L_harm`` at its result."""
        config, model = self.method.config, self.method.model
        data = self.data[tuning.data]
        data_seed = int(torch.randint(2**62, (1,), generator=generator))

        def ft_loss(p: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
            batch_generator = torch.Generator().manual_seed(data_seed + step)
            x0, context = self._data_batch(data, batch_generator)
            return model.diffusion_loss(x0, context, batch_generator, params=p)

        lora = LoRA(tuning.lora_rank, tuning.lora_targets)
        bases = {n: p for n, p in lora_bases.items() if lora.applies(n)} if tuning.mode == "lora" else {}
        tuned = simulate(ft_loss, params, tuning, generator, lora_bases=bases)
        fixed = {n: p for n, p in tuned.items() if n not in params}
        at_ft = {n: tuned[n].detach().requires_grad_(True) for n in params}
        with differentiable_attention():
            after = harm(fixed | at_ft)
            b = dict(zip(at_ft, torch.autograd.grad(after, list(at_ft.values()))))
            # H of L_FT at theta_FT*, on a batch the simulation did not draw.
            hessian = HessianOperator(lambda p: ft_loss(fixed | p, tuning.steps), at_ft)
            gamma = config.gamma if config.gamma is not None else tuning.steps * tuning.lr
            solve = richardson_solve(hessian, b, gamma, config.solve_iterations, config.solve_tolerance)
        return solve, float(after.detach())

    def _stop_if_mostly_failing(self) -> None:
        counts = self.counts()
        if (
            counts["attempted"] >= MIN_SOLVES_BEFORE_STOPPING
            and counts["failed"] > self.method.config.max_failed_share * counts["attempted"]
        ):
            seen = sorted(self.failed_residuals)
            quoted = (f" (their relative residuals {seen[0]:.3g} to {seen[-1]:.3g}, median {seen[len(seen) // 2]:.3g}; "
                      f"step size halved {self.dampings} times)") if seen else ""  # fmt: skip
            raise UnrelearnError(
                f"{self.method.name}: {counts['failed']} of {counts['attempted']} hypergradient solves did not reach "
                f"residual {self.method.config.solve_tolerance:g}{quoted}; lower gamma, "
                "raise solve_iterations, or narrow ft_lrs / ft_steps"
            )

    def record(self) -> dict[str, Any]:
        return {"solves": dict(self.counts())}


def _with_resilience(method: OptimizationMethod, own: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
    """``own`` (a method's loss terms) plus the resilience term; with beta 0, ``own`` untouched."""
    if method.config.beta == 0:
        return own
    terms = method.resilience.terms(generator)
    grads = terms.pop("grads")
    extra = terms.pop("loss")
    return {**own, **terms, "loss": own["loss"] + extra, "grads": grads}


@dataclass
class ResAlignConfig(OptimizationConfig, ResilienceOptions):
    """ResAlign's own objective: official code's outer AdamW lr 2e-4, weight decay 1e-2, 160
    steps; retain weight alpha 1.6 ramping linearly to ``alpha_end`` 2.0."""

    steps: PositiveInt = 160
    lr: NonNegativeFloat = 2e-4
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    weight_decay: NonNegativeFloat = 1e-2
    batch_size: PositiveInt = 1
    alpha: NonNegativeFloat = 1.6
    alpha_end: NonNegativeFloat = 2.0
    # What the defender trains: the parameters of ``scope``, or (the official code's) a peft LoRA
    # of ``lora_rank`` on ``lora_targets`` (attn1 and attn2 q/k/v/out), merged when saved.
    parametrization: Literal["scope", "lora"] = "lora"
    scope: ScopeName = "f"
    lora_rank: PositiveInt = 4
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@register_method
class ResAlign(OptimizationMethod):
    name = "resalign"
    summary = "ResAlign: -L_DM on the concept + alpha distillation + beta resilience (Moreau hypergradient)"
    Config = ResAlignConfig
    uses_teacher = True
    embedded_defaults: ClassVar[dict] = EMBEDDED_RESILIENCE_DEFAULTS | {"lr": 1e-4, "batch_size": 4}

    def __init__(self, model, sets, config, world=None) -> None:
        super().__init__(model, sets, config, world)  # the teacher is copied before any adapter
        self.resilience = Resilience(self)
        self.lora: dict[str, torch.nn.Parameter] | None = None
        if config.parametrization == "lora":
            # Seeded, and added before a checkpoint loads: a resumed run gets the same adapter.
            self.lora = add_lora(model.unet, config, adapter_name=OUTER_ADAPTER)

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        return self.lora if self.lora is not None else select_parameters(self.model.unet, self.config.scope)

    def bind(self, trainer) -> None:
        self.resilience.trainer = trainer

    def differentiates_twice(self) -> bool:
        return True  # Hessian-vector products

    def finish(self) -> None:
        if self.lora is not None:
            fuse_lora(self.model.unet, adapter_name=OUTER_ADAPTER)
            self.model.unet.requires_grad_(True)

    def loss(self, step: int, generator: torch.Generator) -> dict[str, Any]:
        config = self.config
        alpha = config.alpha + (config.alpha_end - config.alpha) * step / max(1, config.steps - 1)
        harm = -self.model.diffusion_loss(*self.pairs(self.sets.hrm_m or self.sets.forget, generator), generator)
        retain = distillation_loss(self, generator)
        own = {"loss": harm + alpha * retain, "harm_loss": harm, "retain": retain}
        return _with_resilience(self, own, generator)

    def record(self) -> dict[str, Any]:
        return self.resilience.record()


def distillation_loss(method: Method, generator: torch.Generator) -> torch.Tensor:
    """``R``: the squared distance of the noise predictions to the original model's, on noised
    images of retained prompts."""
    model = method.model
    x0, context = method.pairs(method.sets.retain, generator)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    t = torch.randint(0, model.num_train_timesteps, (len(x0),), generator=generator).to(x0.device)
    x_t = model.scheduler.add_noise(x0, noise, t)
    with torch.no_grad():
        target = model.predict_noise(x_t, t, context, unet=method.teacher)
    return torch.nn.functional.mse_loss(model.predict_noise(x_t, t, context), target)


@register_wrapper(
    "resalign", "ResAlign's resilience term around any method (e.g. resalign:esd-u-1, resalign:uce)", (ResilienceOptions,)
)
def resalign_variant(base: type[Method]) -> type[Method]:
    """``resalign:NAME``: ``base`` plus the resilience term (a second stage after a closed form)."""
    if issubclass(base, ClosedFormMethod):
        return _second_stage(base)
    if base.masks_gradients:
        raise UnrelearnError(
            f"resalign:{base.name}: {base.name} masks gradients with hooks, which would also mask the simulated "
            "fine-tuning's gradients; not supported yet"
        )
    if base is ResAlign:
        raise UnrelearnError("resalign:resalign: resalign already has the resilience term; use resalign")
    config_class = extend_config("ResAlign", base, (ResilienceOptions,), (base.Config,))

    class Resilient(base):  # type: ignore[misc, valid-type]
        name = f"resalign:{base.name}"
        summary = f"{base.name} + beta [L_harm(theta_FT*) - L_harm(theta)] (ResAlign's resilience term)"
        Config = config_class
        uses_teacher = base.uses_teacher
        embedded_defaults = base.embedded_defaults | EMBEDDED_RESILIENCE_DEFAULTS

        def __init__(self, model, sets, config, world=None) -> None:
            super().__init__(model, sets, config, world)
            self.resilience = Resilience(self)

        def bind(self, trainer) -> None:
            super().bind(trainer)
            self.resilience.trainer = trainer

        def differentiates_twice(self) -> bool:
            return True  # Hessian-vector products

        def loss(self, step: int, generator: torch.Generator) -> dict[str, Any]:
            out = super().loss(step, generator)
            own = dict(out) if isinstance(out, Mapping) else {"loss": out}
            return _with_resilience(self, own, generator)

        def record(self) -> dict[str, Any]:
            return super().record() | self.resilience.record()

    Resilient.__name__ = Resilient.__qualname__ = f"ResAlign{base.__name__}"
    return Resilient


@dataclass
class ResilienceStageOptions:
    """The stage after a closed-form edit: the resilience term plus ``alpha`` R (distillation to the
    original model on retained prompts, which keeps the stage from undoing the model's quality),
    on the cross-attention the edit changed."""

    scope: ScopeName = "x"
    alpha: NonNegativeFloat = 1.0


def _second_stage(base: type[ClosedFormMethod]) -> type[Method]:
    config_class = extend_config(
        "ResAlign", base, (ResilienceOptions, ResilienceStageOptions), (base.Config, OptimizationConfig)
    )
    base_fields = {f.name for f in fields(base.Config)}

    class ResilienceStage(OptimizationMethod):
        name = f"resalign:{base.name}"
        summary = f"ResAlign's resilience term (+ alpha R) as a second stage after {base.name}"
        Config = config_class
        uses_teacher = True
        embedded_defaults = (
            base.embedded_defaults | EMBEDDED_RESILIENCE_DEFAULTS | {"steps": 100, "lr": 1e-4, "batch_size": 4}
        )

        def __init__(self, model, sets, config, world=None) -> None:
            super().__init__(model, sets, config, world)
            base_config = base.Config(**{k: v for k, v in asdict(config).items() if k in base_fields})
            self.closed_form = base(model, sets, base_config, world)
            self.closed_form_stats: dict[str, Any] = {}
            self.resilience = Resilience(self)

        def differentiates_twice(self) -> bool:
            return True  # Hessian-vector products

        def parameters(self) -> dict[str, torch.nn.Parameter]:
            return select_parameters(self.model.unet, self.config.scope)

        def bind(self, trainer) -> None:
            # Deterministic, and before a checkpoint loads: a resumed stage starts from the same edit.
            self.closed_form_stats = self.closed_form.apply()
            self.resilience.trainer = trainer

        def loss(self, step: int, generator: torch.Generator) -> dict[str, Any]:
            retain = distillation_loss(self, generator)
            return _with_resilience(self, {"loss": self.config.alpha * retain, "retain": retain}, generator)

        def record(self) -> dict[str, Any]:
            return {"stats": self.closed_form_stats} | self.resilience.record()

    ResilienceStage.__name__ = ResilienceStage.__qualname__ = f"ResAlign{base.__name__}Stage"
    return ResilienceStage
