"""The one fine-tuning step shared by the attack and by the defences' simulated attackers.

An attacker's fine-tuning is described once (:class:`FineTuning`: data, steps, learning rate,
optimizer, batch, full or LoRA) and carried out by functional optimizer steps on a parameter
dict, in the style of torch.func's MAML example and torchopt: ``step(params, grads, state)``
returns new tensors instead of editing parameters in place. Called with gradients that carry a
graph (``create_graph=True``), the steps are differentiable, so a defence can backpropagate
through a simulated attack (exact meta-gradients); called without, they are plain updates
(first-order defences, attacks). Each optimizer equals its ``torch.optim`` counterpart step for
step (``tests/test_finetuning.py``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from unrelearn.options import Fraction, NonNegativeFloat, NonNegativeInt, Options, PositiveInt

Params = dict[str, torch.Tensor]
# sqrt is not differentiable at 0: an entry whose gradient is exactly 0 would turn a
# backpropagation through Adam into NaN. Its forward change (sqrt(1e-30) = 1e-15 against
# eps = 1e-8) is below float32 resolution.
_SQRT_FLOOR = 1e-30


@dataclass
class FineTuning(Options):
    """How an attacker fine-tunes: the same description for ``unrelearn attack``, Meta-Unlearning's
    simulated attacker and ResAlign's sampled configurations."""

    data: str = "hrm-m"
    steps: PositiveInt = 300
    lr: NonNegativeFloat = 1e-5
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    batch_size: PositiveInt = 8
    mode: Literal["full", "lora"] = "full"
    lora_rank: PositiveInt = 4
    lora_targets: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    weight_decay: NonNegativeFloat = 0.0
    momentum: Fraction = 0.0
    # As diffusers' get_constant_schedule_with_warmup / get_cosine_schedule_with_warmup: linear
    # from 0 over ``warmup_steps``, then constant or half a cosine down to 0 at ``steps``.
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: NonNegativeInt = 0

    def lr_factor(self, step: int) -> float:
        return schedule_factor(self.schedule, self.warmup_steps, self.steps, step)


def schedule_factor(schedule: str, warmup_steps: int, steps: int, step: int) -> float:
    """The multiple of the learning rate at ``step`` (0-based), as diffusers'
    ``get_constant_schedule_with_warmup`` / ``get_cosine_schedule_with_warmup`` compute it."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass
class SGD:
    """``theta <- theta - lr (g + wd theta)``, with torch.optim.SGD's momentum buffer (dampening 0)."""

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0

    def init(self, params: Mapping[str, torch.Tensor]) -> dict[str, Params]:
        return {"momentum": {}} if self.momentum else {}

    def step(self, params: Params, grads: Params, state: dict[str, Params]) -> tuple[Params, dict[str, Params]]:
        new_params: Params = {}
        new_state: dict[str, Params] = {"momentum": {}} if self.momentum else {}
        for name, p in params.items():
            g = grads[name]
            if self.weight_decay:
                g = g + self.weight_decay * p
            if self.momentum:
                previous = state["momentum"].get(name)
                g = g if previous is None else self.momentum * previous + g
                new_state["momentum"][name] = g
            new_params[name] = p - self.lr * g
        return new_params, new_state


@dataclass
class Adam:
    """torch.optim.Adam (``decoupled=False``) or AdamW (``decoupled=True``), amsgrad off."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False

    def init(self, params: Mapping[str, torch.Tensor]) -> dict[str, Params]:
        return {"step": {}, "exp_avg": {}, "exp_avg_sq": {}}

    def step(self, params: Params, grads: Params, state: dict[str, Params]) -> tuple[Params, dict[str, Params]]:
        beta1, beta2 = self.betas
        new_params: Params = {}
        new_state: dict[str, Params] = {"step": {}, "exp_avg": {}, "exp_avg_sq": {}}
        for name, p in params.items():
            g = grads[name]
            if self.weight_decay and self.decoupled:
                p = p * (1 - self.lr * self.weight_decay)
            elif self.weight_decay:
                g = g + self.weight_decay * p
            count = int(state["step"].get(name, 0)) + 1
            m = state["exp_avg"].get(name)
            v = state["exp_avg_sq"].get(name)
            m = (1 - beta1) * g if m is None else beta1 * m + (1 - beta1) * g
            v = (1 - beta2) * g * g if v is None else beta2 * v + (1 - beta2) * g * g
            denom = v.clamp_min(_SQRT_FLOOR).sqrt() / math.sqrt(1 - beta2**count) + self.eps
            new_params[name] = p - (self.lr / (1 - beta1**count)) * m / denom
            new_state["step"][name] = count  # type: ignore[assignment]
            new_state["exp_avg"][name] = m
            new_state["exp_avg_sq"][name] = v
        return new_params, new_state


def functional_optimizer(tuning: FineTuning, lr: float | None = None) -> SGD | Adam:
    lr = tuning.lr if lr is None else lr
    if tuning.optimizer == "sgd":
        return SGD(lr, momentum=tuning.momentum, weight_decay=tuning.weight_decay)
    return Adam(lr, weight_decay=tuning.weight_decay, decoupled=tuning.optimizer == "adamw")


@dataclass
class InnerRun:
    """The parameters after a simulated fine-tuning and the loss seen at each step."""

    params: Params
    losses: list[float]


def fine_tune(
    loss_fn: Callable[[Params, int], torch.Tensor],
    params: Params,
    optimizer: SGD | Adam,
    steps: int,
    create_graph: bool,
    lr_factor: Callable[[int], float] | None = None,
) -> InnerRun:
    """``steps`` functional optimizer steps on ``loss_fn(params, step)`` from ``params``.

    ``create_graph=True`` keeps the graph of every gradient, so the result is a differentiable
    function of the starting parameters (exact meta-gradients, second order); ``False`` detaches
    each update (first-order defences, plain fine-tuning).
    """
    state = optimizer.init(params)
    losses = []
    current = dict(params)
    if not create_graph:
        current = {n: p.detach().requires_grad_(True) for n, p in current.items()}
    for step in range(steps):
        loss = loss_fn(current, step)
        grads = torch.autograd.grad(loss, list(current.values()), create_graph=create_graph, allow_unused=True)
        grads_by_name = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(current.items(), grads)}
        stepper = optimizer if lr_factor is None else dataclasses.replace(optimizer, lr=optimizer.lr * lr_factor(step))
        current, state = stepper.step(current, grads_by_name, state)
        if not create_graph:
            current = {n: p.detach().requires_grad_(True) for n, p in current.items()}
            state = {
                k: {n: v.detach() if isinstance(v, torch.Tensor) else v for n, v in s.items()} for k, s in state.items()
            }
        losses.append(float(loss.detach()))
    return InnerRun(current, losses)


@dataclass
class LoRA:
    """A functional LoRA adapter: ``W + (alpha / rank) B A`` on every 2-D weight whose module name
    ends with one of ``targets`` (peft's suffix rule), initialized as the attack's peft adapter
    (``init_lora_weights="gaussian"``: A ~ N(0, 1 / rank^2), B = 0; ``lora_alpha = rank``)."""

    rank: int
    targets: list[str]

    def applies(self, name: str) -> bool:
        # A layer that already carries a peft adapter keeps its weight in ``.base_layer``.
        module = name.removesuffix(".weight").removesuffix(".base_layer")
        return name.endswith(".weight") and any(module == t or module.endswith(f".{t}") for t in self.targets)

    def init(self, weights: Mapping[str, torch.Tensor], generator: torch.Generator) -> Params:
        adapter: Params = {}
        for name, w in weights.items():
            if self.applies(name) and w.dim() == 2:
                out_features, in_features = w.shape
                a = torch.randn(self.rank, in_features, generator=generator, dtype=torch.float64) / self.rank
                adapter[f"{name}:A"] = a.to(w.device, w.dtype).requires_grad_(True)
                adapter[f"{name}:B"] = torch.zeros(
                    out_features, self.rank, device=w.device, dtype=w.dtype, requires_grad=True
                )
        if not adapter:
            raise ValueError(f"no 2-D weight matches the LoRA targets {self.targets}")
        return adapter

    def merge(self, weights: Mapping[str, torch.Tensor], adapter: Mapping[str, torch.Tensor]) -> Params:
        merged = dict(weights)
        for key, a in adapter.items():
            name, part = key.rsplit(":", 1)
            if part == "A":
                merged[name] = weights[name] + adapter[f"{name}:B"] @ a
        return merged


def simulate(
    loss_fn: Callable[[Params, int], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    tuning: FineTuning,
    generator: torch.Generator,
    lora_bases: Mapping[str, torch.Tensor] | None = None,
) -> Params:
    """The weights after ``tuning`` from ``params``, detached (a first-order simulated attacker).

    Full mode fine-tunes ``params``; LoRA mode fine-tunes a fresh adapter (initialized from
    ``generator``) on the target weights among ``params`` and ``lora_bases`` (weights the
    defender does not train but an attacker's adapter still changes) and returns the merged
    weights of both.
    """
    optimizer = functional_optimizer(tuning)
    if tuning.mode == "full":
        return fine_tune(loss_fn, dict(params), optimizer, tuning.steps, create_graph=False, lr_factor=tuning.lr_factor).params
    lora = LoRA(tuning.lora_rank, tuning.lora_targets)
    bases = {n: p.detach() for n, p in {**(lora_bases or {}), **params}.items()}
    adapter = lora.init({n: w for n, w in bases.items() if lora.applies(n)}, generator)
    run = fine_tune(
        lambda a, step: loss_fn(lora.merge(bases, a), step), adapter, optimizer, tuning.steps, create_graph=False,
        lr_factor=tuning.lr_factor,
    )
    with torch.no_grad():
        return lora.merge(bases, run.params)
