"""The one training loop that base training, unlearning methods and attacks share.

A run is ``steps`` optimizer steps of a loss function ``loss_fn(step, generator)``. Each step
draws its randomness from its own generator seeded by ``(seed, step)``, so a run resumed from
a checkpoint replays exactly the batches an uninterrupted run would have seen. Checkpoints hold
the trained parameters, the optimizer state, the EMA weights and the loss history, all as
safetensors + JSON (no pickle), written atomically.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from unrelearn.errors import UnrelearnError
from unrelearn.io import atomic_directory

LossFn = Callable[[int, torch.Generator], "torch.Tensor | Mapping[str, torch.Tensor]"]
OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@dataclass
class TrainConfig:
    steps: int
    lr: float
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    seed: int = 0
    ema_decay: float | None = None
    # Ramp the EMA decay up as (1 + step) / (10 + step) early on, so it does not average in
    # the random initialisation; methods whose EMA starts from a trained model turn it off.
    ema_warmup: bool = True
    checkpoint_every: int = 0
    momentum: float = 0.0
    # One step decay: from ``lr_drop_step`` on, the learning rate is ``lr * lr_drop_factor``.
    lr_drop_step: int | None = None
    lr_drop_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise UnrelearnError(f"steps must be >= 0, got {self.steps}")
        if self.optimizer not in OPTIMIZERS:
            raise UnrelearnError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not math.isfinite(self.lr) or self.lr < 0:
            raise UnrelearnError(f"learning rate must be a finite number >= 0, got {self.lr}")


@dataclass
class TrainResult:
    steps_done: int
    losses: list[dict[str, float]] = field(default_factory=list)
    wall_seconds: float = 0.0
    resumed_from: int | None = None

    def final_losses(self, window: int = 20) -> dict[str, float]:
        """Mean of each logged loss over the last ``window`` steps."""
        tail = self.losses[-window:]
        if not tail:
            return {}
        return {key: sum(row[key] for row in tail) / len(tail) for key in tail[-1] if key != "step"}


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return OPTIMIZERS[config.optimizer](params, lr=config.lr, weight_decay=config.weight_decay)


class Trainer:
    """Runs ``loss_fn`` for ``config.steps`` steps on ``params`` (a name -> Parameter mapping)."""

    def __init__(
        self,
        params: Mapping[str, torch.nn.Parameter],
        loss_fn: LossFn,
        config: TrainConfig,
        checkpoint_dir: str | Path | None = None,
        progress: bool = True,
        description: str = "training",
        on_step: Callable[[int], None] | None = None,
        on_start: Callable[[int], None] | None = None,
    ) -> None:
        if not params:
            raise UnrelearnError("nothing to train: the parameter selection is empty")
        self.params = dict(params)
        self.loss_fn = loss_fn
        self.config = config
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.progress = progress
        self.description = description
        self.on_step = on_step
        self.on_start = on_start
        # JSON-serialisable state of the run's owner (an attack's curve so far), checkpointed too.
        self.extra_state: dict[str, Any] = {}
        self.optimizer = make_optimizer(list(self.params.values()), config)
        self.ema: dict[str, torch.Tensor] | None = (
            {name: p.detach().clone() for name, p in self.params.items()} if config.ema_decay else None
        )

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int, losses: list[dict[str, float]]) -> None:
        if self.checkpoint_dir is None:
            return
        with atomic_directory(self.checkpoint_dir) as tmp:
            save_file({n: p.detach().contiguous() for n, p in self.params.items()}, str(tmp / "params.safetensors"))
            if self.ema is not None:
                save_file({n: t.contiguous() for n, t in self.ema.items()}, str(tmp / "ema.safetensors"))
            tensors, scalars = _flatten_optimizer_state(self.optimizer.state_dict())
            if tensors:
                save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "state.json").write_text(
                json.dumps(
                    {"step": step, "optimizer": scalars, "config": asdict(self.config), "losses": losses,
                     "extra": self.extra_state}
                )
            )

    def load_checkpoint(self) -> tuple[int, list[dict[str, float]]] | None:
        if self.checkpoint_dir is None or not (self.checkpoint_dir / "state.json").is_file():
            return None
        state = json.loads((self.checkpoint_dir / "state.json").read_text())
        saved = load_file(str(self.checkpoint_dir / "params.safetensors"))
        if set(saved) != set(self.params):
            raise UnrelearnError(
                f"checkpoint {str(self.checkpoint_dir)!r} holds other parameters than this run trains; "
                "delete it or use another output folder"
            )
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(saved[name])
        if self.ema is not None and (self.checkpoint_dir / "ema.safetensors").is_file():
            self.ema = load_file(str(self.checkpoint_dir / "ema.safetensors"))
        optimizer_file = self.checkpoint_dir / "optimizer.safetensors"
        tensors = load_file(str(optimizer_file)) if optimizer_file.is_file() else {}
        self.optimizer.load_state_dict(_unflatten_optimizer_state(tensors, state["optimizer"]))
        self.extra_state = state.get("extra", {})
        return int(state["step"]), list(state["losses"])

    # ------------------------------------------------------------------ loop
    def run(self, resume: bool = True) -> TrainResult:
        from tqdm.auto import tqdm

        start, losses, resumed_from = 0, [], None
        if resume and (loaded := self.load_checkpoint()) is not None:
            start, losses = loaded
            resumed_from = start
        config = self.config
        if self.on_start is not None:
            self.on_start(start)
        began = time.perf_counter()
        bar = tqdm(total=config.steps, initial=start, desc=self.description, disable=not self.progress, leave=False)
        last_checkpoint = start if resumed_from is not None else None
        for step in range(start, config.steps):
            lr = config.lr * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else config.lr
            if config.lr_drop_step is not None and step >= config.lr_drop_step:
                lr *= config.lr_drop_factor
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            out = self.loss_fn(step, step_generator(config.seed, step))
            terms = dict(out) if isinstance(out, Mapping) else {"loss": out}
            loss = terms["loss"]
            if not torch.isfinite(loss):
                where = (
                    f"the last good checkpoint (step {last_checkpoint}) is kept in {str(self.checkpoint_dir)!r}"
                    if last_checkpoint is not None
                    else "no checkpoint was written"
                )
                raise UnrelearnError(
                    f"loss became {loss.item()} at step {step}; lower the learning rate or check the data ({where})"
                )
            self.optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(list(self.params.values()), config.grad_clip)
            self.optimizer.step()
            if self.ema is not None:
                decay = min(config.ema_decay, (1 + step) / (10 + step)) if config.ema_warmup else config.ema_decay
                with torch.no_grad():
                    for name, p in self.params.items():
                        self.ema[name].lerp_(p.detach(), 1 - decay)
            row = {"step": step, **{k: float(v.detach()) for k, v in terms.items()}}
            losses.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if self.on_step is not None:
                self.on_step(step + 1)
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                self.save_checkpoint(step + 1, losses)
                last_checkpoint = step + 1
        bar.close()
        return TrainResult(config.steps, losses, time.perf_counter() - began, resumed_from)

    def copy_ema_to_params(self) -> None:
        if self.ema is None:
            return
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.ema[name])


def _flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for index, entries in state["state"].items():
        scalars["state"][str(index)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.contiguous()
            else:
                scalars["state"][str(index)][key] = value
    return tensors, scalars


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in scalars["state"].items()}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": scalars["param_groups"]}

