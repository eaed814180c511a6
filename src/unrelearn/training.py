"""The one training loop that base training, unlearning methods and attacks share.

A run is ``steps`` optimizer steps of a loss function ``loss_fn(step, generator)``. Each step
draws its randomness from its own generator seeded by ``(seed, step)``, so a run resumed from
a checkpoint replays exactly the batches an uninterrupted run would have seen. Checkpoints hold
the trained parameters, the optimizer and learning-rate-schedule state, the EMA weights, the
loss history and the *settings* of the run they belong to, all as safetensors + JSON (no
pickle), written atomically. A checkpoint is resumed only by a run with the same settings.

After every update the parameters are checked before anything can be saved: a step that makes
them non-finite, or grows their norm ``max_norm_growth``-fold over the start, ends the run with
the last good checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from unrelearn.errors import TrainingDiverged, UnrelearnError
from unrelearn.io import atomic_directory
from unrelearn.options import Fraction, NonNegativeFloat, NonNegativeInt, Options, PositiveFloat
from unrelearn.progress import progress_bar

# A loss, or a dict with "loss" (backpropagated), optional "grads" (name -> gradient added to
# the parameters' own, for objectives whose gradient is not the gradient of a loss, like a
# first-order meta-gradient) and any further scalars to log.
LossFn = Callable[[int, torch.Generator], "torch.Tensor | Mapping[str, Any]"]
OptimizerName = Literal["adamw", "adam", "sgd"]
OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
# Settings that change how a run is carried out but not its result: a checkpoint written under
# one value resumes under another.
RESULT_NEUTRAL_SETTINGS = frozenset({"checkpoint_every"})


@dataclass
class TrainConfig(Options):
    steps: NonNegativeInt
    lr: NonNegativeFloat
    optimizer: OptimizerName = "adamw"
    weight_decay: NonNegativeFloat = 0.0
    warmup_steps: NonNegativeInt = 0
    grad_clip: PositiveFloat | None = 1.0
    seed: int = 0
    ema_decay: Fraction | None = None
    # Ramp the EMA decay up as (1 + step) / (10 + step) early on, so it does not average in
    # the random initialisation; methods whose EMA starts from a trained model turn it off.
    ema_warmup: bool = True
    checkpoint_every: NonNegativeInt = 0
    momentum: NonNegativeFloat = 0.0
    # One step decay: from ``lr_drop_step`` on, the learning rate is ``lr * lr_drop_factor``.
    lr_drop_step: NonNegativeInt | None = None
    lr_drop_factor: NonNegativeFloat = 1.0
    # The blow-up guard: the trained parameters' norm may not exceed this multiple of its value
    # at the start of the run.
    max_norm_growth: PositiveFloat = 100.0
    # "warmup-then-drop": base training's linear warm-up from lr / warmup_steps, then the optional
    # drop. "constant" and "cosine": an attacker's schedules as diffusers computes them
    # (finetuning.schedule_factor, warm-up from 0).
    schedule: Literal["warmup-then-drop", "constant", "cosine"] = "warmup-then-drop"

    def lr_factor(self, step: int) -> float:
        """The multiple of ``lr`` used at ``step``."""
        if self.schedule != "warmup-then-drop":
            from unrelearn.finetuning import schedule_factor

            return schedule_factor(self.schedule, self.warmup_steps, self.steps, step)
        factor = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.lr_drop_step is not None and step >= self.lr_drop_step:
            factor *= self.lr_drop_factor
        return factor


@dataclass
class TrainResult:
    steps_done: int
    losses: list[dict[str, float]] = field(default_factory=list)
    wall_seconds: float = 0.0
    resumed_from: int | None = None

    def final_losses(self, window: int = 20) -> dict[str, float]:
        """Mean of each logged loss over the last ``window`` steps that logged it (methods that
        alternate stages log each stage's terms on its own steps)."""
        tail = self.losses[-window:]
        keys = dict.fromkeys(key for row in tail for key in row if key != "step")
        return {key: sum(values) / len(values) for key in keys if (values := [row[key] for row in tail if key in row])}


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The randomness of one step; each process of a multi-process run draws its own batch (rank
    0 draws what a single process would)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step + rank * 7_919_117_003)


class Processes:
    """The processes of a run launched with ``accelerate launch`` / ``torchrun`` (data parallel),
    or the one process of a plain run. Gradients are averaged over them after every backward
    pass, so every process applies the same update and holds the same weights; only the main
    process writes checkpoints and outputs."""

    def __init__(self) -> None:
        from unrelearn.device import accelerate_state

        self.state = accelerate_state()
        self.count = self.state.num_processes
        self.rank = self.state.process_index
        self.main = self.state.is_main_process

    def mean_gradients(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        if self.count == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]
        flat = torch.cat([g.reshape(-1) for g in grads]) / self.count
        torch.distributed.all_reduce(flat)
        offset = 0
        for p, g in zip(params.values(), grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.count == 1:
            return value
        value = value.detach().clone().reshape(1).float()
        torch.distributed.all_reduce(value)
        return value[0] / self.count

    def wait(self) -> None:
        if self.count > 1:
            self.state.wait_for_everyone()


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return OPTIMIZERS[config.optimizer](params, lr=config.lr, weight_decay=config.weight_decay)


def parameter_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, dtypes, shapes, bytes): which weights a run starts from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def result_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` without the keys (at any depth) that do not change a run's result, as plain JSON values."""

    def strip(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: strip(v) for k, v in value.items() if k not in RESULT_NEUTRAL_SETTINGS}
        return value

    return json.loads(json.dumps(strip(values), default=str))


def _flat(values: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(values, dict):
        out: dict[str, Any] = {}
        for key, value in values.items():
            out |= _flat(value, f"{prefix}{key}.")
        return out
    return {prefix.rstrip("."): values}


def settings_difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"lr: 0.0001 there, 0.0002 here"`` for every setting that differs (dotted paths, sorted)."""
    there, here = _flat(dict(saved)), _flat(dict(current))
    differences = []
    for key in sorted(set(there) | set(here)):
        old, new = there.get(key, "(unset)"), here.get(key, "(unset)")
        if old == new:
            continue
        if key.endswith("_sha256"):
            # A digest names weights or data; say which, and shorten the hashes.
            what = key.rsplit(".", 1)[-1].removesuffix("_sha256").replace("_", " ")
            differences.append(f"the {what} differs (sha256 {str(old)[:12]} there, {str(new)[:12]} here)")
        else:
            differences.append(f"{key}: {old} there, {new} here")
    return differences


class Trainer:
    """Runs ``loss_fn`` for ``config.steps`` steps on ``params`` (a name -> Parameter mapping).

    ``settings``: what, besides ``config``, decides the result of the run (the method and its
    options, the source model's digest, the data); a checkpoint records them and is resumed only
    by a run with equal settings.
    """

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
        settings: Mapping[str, Any] | None = None,
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
        self.settings = result_settings({"train": asdict(config), **dict(settings or {})})
        # JSON-serialisable state of the run's owner (an attack's curve so far), checkpointed too.
        self.extra_state: dict[str, Any] = {}
        self.optimizer = make_optimizer(list(self.params.values()), config)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, config.lr_factor)
        self.ema: dict[str, torch.Tensor] | None = (
            {name: p.detach().clone() for name, p in self.params.items()} if config.ema_decay is not None else None
        )
        self.initial_norm: float | None = None
        self.processes = Processes()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int, losses: list[dict[str, float]]) -> None:
        if self.checkpoint_dir is None:
            return
        if not self.processes.main:
            self.processes.wait()
            return
        self._write_checkpoint(step, losses)
        self.processes.wait()

    def _write_checkpoint(self, step: int, losses: list[dict[str, float]]) -> None:
        assert self.checkpoint_dir is not None
        with atomic_directory(self.checkpoint_dir) as tmp:
            save_file({n: p.detach().contiguous() for n, p in self.params.items()}, str(tmp / "params.safetensors"))
            if self.ema is not None:
                save_file({n: t.contiguous() for n, t in self.ema.items()}, str(tmp / "ema.safetensors"))
            tensors, scalars = _flatten_optimizer_state(self.optimizer.state_dict())
            if tensors:
                save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "state.json").write_text(
                json.dumps(
                    {"step": step, "settings": self.settings, "optimizer": scalars, "schedule": self.schedule.state_dict(),
                     "initial_norm": self.initial_norm, "losses": losses, "extra": self.extra_state}
                )
            )  # fmt: skip

    def _damaged(self, reason: str) -> UnrelearnError:
        return UnrelearnError(
            f"checkpoint {str(self.checkpoint_dir)!r} is damaged ({reason}); delete that folder to start the run over"
        )

    def load_checkpoint(self) -> tuple[int, list[dict[str, float]]] | None:
        if self.checkpoint_dir is None or not self.checkpoint_dir.exists():
            return None
        folder = self.checkpoint_dir
        try:
            state = json.loads((folder / "state.json").read_text())
        except FileNotFoundError:
            raise self._damaged("no state.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise self._damaged(f"state.json is not JSON: {error}") from None
        if not isinstance(state, dict) or "settings" not in state:
            raise self._damaged("state.json records no settings: written by an older unrelearn or by hand")
        if differences := settings_difference(state["settings"], self.settings):
            raise UnrelearnError(
                f"checkpoint {str(folder)!r} belongs to a run with other settings ({'; '.join(differences)}); "
                f"run again with the same settings to resume it, or delete {str(folder)!r} to start this run over"
            )
        device = next(iter(self.params.values())).device
        try:
            saved = load_file(str(folder / "params.safetensors"), device=str(device))
            ema_file, optimizer_file = folder / "ema.safetensors", folder / "optimizer.safetensors"
            ema = load_file(str(ema_file), device=str(device)) if ema_file.is_file() else None
            tensors = load_file(str(optimizer_file)) if optimizer_file.is_file() else {}
        except (SafetensorError, OSError) as error:
            raise self._damaged(f"{error}") from None
        if set(saved) != set(self.params) or any(saved[n].shape != p.shape for n, p in self.params.items()):
            raise self._damaged("it holds other parameters than this run trains")
        if (self.ema is None) != (ema is None):
            raise self._damaged("its EMA weights do not match the run's settings")
        try:
            self.optimizer.load_state_dict(_unflatten_optimizer_state(tensors, state["optimizer"]))
            self.schedule.load_state_dict(state["schedule"])
            step, losses = int(state["step"]), list(state["losses"])
        except (KeyError, ValueError, TypeError) as error:
            raise self._damaged(f"its optimizer state does not fit: {error}") from None
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(saved[name])
        self.ema = ema
        self.initial_norm = state.get("initial_norm")
        self.extra_state = state.get("extra", {})
        return step, losses

    # ------------------------------------------------------------------ loop
    def _parameter_norm(self) -> float:
        norms = torch.stack([torch.linalg.vector_norm(p.detach().float()) for p in self.params.values()])
        return float(torch.linalg.vector_norm(norms))

    def _blow_up(self, step: int, what: str, last_checkpoint: int | None) -> TrainingDiverged:
        if last_checkpoint is not None:
            kept = (
                f"the checkpoint of step {last_checkpoint} in {str(self.checkpoint_dir)!r} is intact but belongs to "
                f"these settings: delete {str(self.checkpoint_dir)!r}, then run again with a lower learning rate "
                "(or gradient clipping)"
            )
        else:
            kept = "nothing was saved; run again with a lower learning rate (or gradient clipping)"
        return TrainingDiverged(f"training blew up at step {step}: {what}; {kept}", step)

    def run(self, resume: bool = True, stop_at: int | None = None) -> TrainResult:
        """Train to ``config.steps``, or pause at ``stop_at`` with a checkpoint there: a later run
        resumes from it to exactly the result of an uninterrupted one."""
        if stop_at is not None and stop_at < self.config.steps and self.checkpoint_dir is None:
            raise UnrelearnError("pausing a training run needs a checkpoint folder to resume from")
        start, losses, resumed_from = 0, [], None
        if resume and (loaded := self.load_checkpoint()) is not None:
            start, losses = loaded
            resumed_from = start
        config = self.config
        if self.initial_norm is None:
            self.initial_norm = self._parameter_norm()
        heading = f"{self.description}: {config.steps} steps" + (f", resuming at step {start}" if resumed_from else "")
        processes = self.processes
        bar = progress_bar(config.steps, self.description, enabled=self.progress and processes.main, initial=start, heading=heading)
        if self.on_start is not None:
            self.on_start(start)
        began = time.perf_counter()
        last_checkpoint = start if resumed_from is not None else None
        stop = config.steps if stop_at is None else min(stop_at, config.steps)
        for step in range(start, stop):
            out = self.loss_fn(step, step_generator(config.seed, step, processes.rank))
            terms = dict(out) if isinstance(out, Mapping) else {"loss": out}
            extra_grads = terms.pop("grads", None) or {}
            loss = terms["loss"]
            # Checked on the mean over processes, so that all of them stop together.
            if not torch.isfinite(processes.mean(loss)):
                raise self._blow_up(step, f"the loss became {loss.item()}", last_checkpoint)
            self.optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
            for name, grad in extra_grads.items():
                p = self.params[name]
                p.grad = grad.detach().clone() if p.grad is None else p.grad + grad.detach()
            processes.mean_gradients(self.params)
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(list(self.params.values()), config.grad_clip)
            self.optimizer.step()
            self.schedule.step()
            norm = self._parameter_norm()
            if not math.isfinite(norm):
                raise self._blow_up(step, "its update made the parameters non-finite", last_checkpoint)
            if norm > config.max_norm_growth * max(self.initial_norm, 1e-12):
                raise self._blow_up(
                    step, f"its update grew the parameters' norm {norm / self.initial_norm:.3g}-fold "
                    f"(the guard is {config.max_norm_growth:g}-fold, max_norm_growth)", last_checkpoint,
                )  # fmt: skip
            if self.ema is not None:
                decay = min(config.ema_decay, (1 + step) / (10 + step)) if config.ema_warmup else config.ema_decay
                with torch.no_grad():
                    for name, p in self.params.items():
                        self.ema[name].lerp_(p.detach(), 1 - decay)
            row = {"step": step, **{k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in terms.items()}}
            if processes.count > 1:
                row["loss"] = float(processes.mean(terms["loss"]))
            losses.append(row)
            bar.update(1, loss=row["loss"])
            if self.on_step is not None:
                self.on_step(step + 1)
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                self.save_checkpoint(step + 1, losses)
                last_checkpoint = step + 1
        bar.close()
        if stop < config.steps and (last_checkpoint is None or last_checkpoint < stop):
            self.save_checkpoint(stop, losses)
        return TrainResult(max(stop, start), losses, time.perf_counter() - began, resumed_from)

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
