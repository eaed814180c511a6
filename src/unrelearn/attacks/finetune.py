"""Relearning attacks: fine-tune a model on attack data, full or LoRA, and trace durability.

The attack is the plain diffusion loss ``L_DM`` on the attacker's data, driven by the same
:class:`~unrelearn.training.Trainer` as unlearning. At each ``eval_at`` step the model is
evaluated (forget rate with its interval, retain alignment, FID); the points form the
durability curve, and the first step whose forget rate reaches the threshold is the
*steps-to-relearn*.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from unrelearn.attacks.data import build_attack_data
from unrelearn.errors import TrainingDiverged, UnrelearnError
from unrelearn.evaluate import EvalConfig, evaluate
from unrelearn.finetuning import FineTuning
from unrelearn.io import atomic_directory, ensure_writable_parent, library_versions, output_lock
from unrelearn.model import DiffusionModel
from unrelearn.options import NonNegativeInt, PositiveInt
from unrelearn.progress import stage
from unrelearn.training import Processes, TrainConfig, Trainer, parameter_digest
from unrelearn.worlds import get_world

ADAPTER_NAME = "attack"


@dataclass
class AttackConfig(FineTuning):
    """An attacker's fine-tuning: the shared :class:`~unrelearn.finetuning.FineTuning`
    description (data, steps, lr, optimizer, batch, full or LoRA) plus how this run is carried
    out (seed, size of the rendered data set, checkpoint interval).

    Stable Diffusion defaults follow the Meta-Unlearning paper (Adam, lr 1e-5, up to 300
    steps). ``EMBEDDED_DEFAULTS`` holds the embedded world's own, chosen by measurement.
    """

    option_owner: ClassVar[str] = "attack"

    seed: int = 0
    data_size: PositiveInt = 256
    checkpoint_every: NonNegativeInt = 50


# lr 1e-4: both the malicious (hrm-m) and the benign (dimra-aux) attack restore an ESD-erased
# concept within 300 steps while the oracle stays flat under dimra-aux (README, "Relearning").
EMBEDDED_DEFAULTS: dict[str, Any] = {"lr": 1e-4, "batch_size": 16}


# What each point of a durability curve keeps of an evaluation.
CURVE_METRICS = ("forget_rate", "forget_rate_ci", "retain_alignment", "retain_alignment_ci", "precision", "precision_ci",
                 "manifold_distance", "manifold_distance_ci", "fid", "kid", "kid_std", "alternative_rate",
                 "alternative_rate_ci")  # fmt: skip


def parse_eval_at(text: str | list[int], steps: int) -> list[int]:
    try:
        points = sorted({int(p) for p in (text.split(",") if isinstance(text, str) else text) if str(p).strip()})
    except ValueError:
        raise UnrelearnError(f"--eval-at must be comma-separated step numbers, got {text!r}") from None
    if not points:
        raise UnrelearnError("--eval-at is empty")
    if points[0] < 0:
        raise UnrelearnError(f"--eval-at steps must be >= 0, got {points[0]}")
    if points[-1] > steps:
        raise UnrelearnError(
            f"--eval-at asks for step {points[-1]} but the attack runs only {steps} steps; lower --eval-at or raise --steps"
        )
    return points


def add_lora(unet: torch.nn.Module, config: Any, adapter_name: str = ADAPTER_NAME) -> dict[str, torch.nn.Parameter]:
    """Stack a fresh peft LoRA adapter (``config.lora_rank``, ``config.lora_targets``, initialized
    from ``config.seed``) on the weights; only it trains. Attacks and ResAlign's outer LoRA use it."""
    from peft import LoraConfig

    if adapter_name in (getattr(unet, "peft_config", None) or {}):
        raise UnrelearnError(f"this UNet already carries a LoRA adapter named {adapter_name!r}; fuse or remove it first")
    unet.requires_grad_(False)
    lora = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_rank, init_lora_weights="gaussian", target_modules=config.lora_targets
    )
    # peft draws the initial adapter from torch's global generator; seeding it from the attack's
    # seed makes a LoRA attack as reproducible as a full one.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        try:
            unet.add_adapter(lora, adapter_name=adapter_name)
        except ValueError as error:
            raise UnrelearnError(f"cannot add the LoRA adapter: {' '.join(str(error).split())}") from None
    return {name: p for name, p in unet.named_parameters() if "lora_" in name and p.requires_grad}


def fuse_lora(unet: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> None:
    """Merge the adapter into the base weights and drop the peft layers (a plain UNet again)."""
    unet.fuse_lora(adapter_names=[adapter_name])
    unet.unload_lora()


def steps_to_relearn(points: list[dict[str, Any]], threshold: float) -> int | None:
    return next((p["step"] for p in points if p["forget_rate"] >= threshold), None)


def attack(
    model: DiffusionModel,
    concept: str,
    config: AttackConfig,
    out: str | Path,
    eval_at: list[int],
    eval_config: EvalConfig,
    threshold: float | None = None,
    reference_rate: float | None = None,
    original_model: DiffusionModel | None = None,
    progress: bool = True,
    initial_point: dict[str, Any] | None = None,
    stop_at: int | None = None,
    record_divergence: bool = False,
) -> dict[str, Any]:
    """Fine-tune ``model`` on ``config.data``; write ``out/curve.json``, ``curve.png``, ``run.json``, ``model/``.

    Checkpoints go to ``OUT.checkpoint`` every ``config.checkpoint_every`` steps, with the curve
    so far; a re-run with the same settings resumes there. ``initial_point`` (the
    ``CURVE_METRICS`` of this model under ``eval_config``, evaluated before) stands in for the
    step-0 evaluation: a benchmark evaluates each model once, not once per attack.

    ``stop_at`` pauses the attack at that step (a checkpoint there, nothing written to ``out``)
    and returns the curve so far, ``{"points", "stopped_at"}``: a worst-case search runs many
    attacks a little way and continues only the strongest, each to its uninterrupted result.

    An attack whose loss or weights stop being finite raises :class:`TrainingDiverged`; with
    ``record_divergence`` it ends there instead, as a finished attack: ``curve.json`` holds the
    points evaluated before and ``diverged_at`` (the step), ``run.json`` the error, and there is no
    ``model/`` (its weights are not finite). A worst-case grid counts such a setting as one the
    attacker cannot use.
    """
    out = Path(out)
    if Processes().count > 1:
        raise UnrelearnError("attacks run in one process (their evaluations are not split); launch without accelerate/torchrun")
    ensure_writable_parent(out)
    world = get_world(model.world)
    sets = world.concept_sets(concept)
    eval_at = parse_eval_at(eval_at, config.steps)
    if stop_at is not None and not 0 < stop_at < config.steps:
        raise UnrelearnError(f"an attack can pause only between step 0 and its last ({config.steps}), not at {stop_at}")
    if threshold is None and reference_rate is None:
        raise UnrelearnError("give a relearning threshold or the base model's forget rate (reference_rate)")
    threshold = 0.5 * reference_rate if threshold is None else threshold
    with output_lock(out):
        return _attack(model, concept, config, out, eval_at, eval_config, threshold, reference_rate, original_model,
                       progress, world, sets, initial_point, stop_at, record_divergence)  # fmt: skip


def _attack(
    model: DiffusionModel, concept: str, config: AttackConfig, out: Path, eval_at: list[int], eval_config: EvalConfig,
    threshold: float, reference_rate: float | None, original_model: DiffusionModel | None, progress: bool,
    world: Any, sets: Any, initial_point: dict[str, Any] | None, stop_at: int | None, record_divergence: bool,
) -> dict[str, Any]:  # fmt: skip
    resolution = model.unet.config.sample_size if model.vae is None else None
    data = build_attack_data(config.data, world, sets, config.data_size, config.seed, original_model, resolution)
    settings = {
        "attack": asdict(config), "concept": concept, "eval_at": eval_at, "eval": asdict(eval_config),
        "source_model_sha256": parameter_digest(model.unet), "data_sha256": data.digest(),
    }  # fmt: skip

    if config.mode == "lora":
        params = add_lora(model.unet, config)
    else:
        params = dict(model.unet.named_parameters())

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        images, prompts = data.batch(config.batch_size, generator)
        return model.diffusion_loss(model.images_to_model_space(images), model.encode_prompts(prompts), generator)

    checkpoints = out.with_name(f"{out.name}.checkpoint")
    train_config = TrainConfig(
        steps=config.steps, lr=config.lr, optimizer=config.optimizer, seed=config.seed, grad_clip=None,
        checkpoint_every=config.checkpoint_every, weight_decay=config.weight_decay, momentum=config.momentum,
        schedule=config.schedule, warmup_steps=config.warmup_steps,
    )  # fmt: skip
    description = f"attack {config.data}"
    trainer = Trainer(params, loss_fn, train_config, checkpoints, progress, description=description, settings=settings)

    def evaluate_at(step: int) -> None:
        trainer.extra_state.setdefault("curve", [])
        if step not in eval_at or any(p["step"] == step for p in trainer.extra_state["curve"]):
            return
        if step == 0 and initial_point is not None:
            m = initial_point
        else:
            m = evaluate(model, concept, eval_config, world.name, progress=False).metrics
        # .get: a benchmark's cached starting point may predate a metric (None: not measured).
        point = {"step": step, **{k: m.get(k) for k in CURVE_METRICS}}
        trainer.extra_state["curve"].append(point)
        lo, hi = m["forget_rate_ci"]
        stage(f"{description}: evaluated at step {step}/{config.steps}: forget rate {m['forget_rate']:.3f} "
              f"[{lo:.3f}, {hi:.3f}]" + (f", retain alignment {m['retain_alignment']:.3f}" if m["retain_alignment"] is not None else ""),
              progress)  # fmt: skip

    trainer.on_step = evaluate_at
    trainer.on_start = evaluate_at  # step 0 = the model before the attack (skipped on resume)
    began = time.perf_counter()
    try:
        result = trainer.run(stop_at=stop_at)
    except TrainingDiverged as error:
        points = sorted(trainer.extra_state.get("curve", []), key=lambda p: p["step"])
        if not record_divergence or not points:
            raise
        stage(f"{description}: diverged at step {error.step}; the attack ends there", progress)
        return _diverged(config, eval_config, eval_at, out, checkpoints, points, error, threshold, reference_rate, concept,
                         time.perf_counter() - began, model)  # fmt: skip
    points = sorted(trainer.extra_state["curve"], key=lambda p: p["step"])
    if result.steps_done < config.steps:
        return {"points": [p for p in points if p["step"] <= stop_at], "stopped_at": stop_at}
    if config.mode == "lora":
        fuse_lora(model.unet)
    summary = _curve_summary(concept, config, threshold, reference_rate, points)
    record = {
        "config": asdict(config),
        "eval": asdict(eval_config),
        "eval_at": eval_at,
        "final_losses": result.final_losses(),
        "resumed_from_step": result.resumed_from,
        "trained_parameters": sum(p.numel() for p in params.values()),
        "wall_seconds": time.perf_counter() - began,
        "device": str(model.device),
        "versions": library_versions(),
        "source_model": model.info.get("unlearned"),
    }
    model.info["attacked"] = {"data": config.data, "steps": config.steps, "mode": config.mode}
    with atomic_directory(out) as tmp:
        model.save(tmp / "model")
        (tmp / "curve.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "run.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
        plot_curves({config.data: points}, tmp / "curve.png", threshold, title=f"{concept}: attack with {config.data}")
    shutil.rmtree(checkpoints, ignore_errors=True)
    return summary


def _curve_summary(
    concept: str, config: AttackConfig, threshold: float, reference_rate: float | None, points: list[dict[str, Any]]
) -> dict[str, Any]:
    """What ``curve.json`` says of an attack: its curve, when it relearned and how far."""
    return {
        "concept": concept,
        "data": config.data,
        "threshold": threshold,
        "reference_forget_rate": reference_rate,
        "steps_to_relearn": steps_to_relearn(points, threshold),
        "max_forget_rate": max(p["forget_rate"] for p in points),
        "points": points,
    }


def _diverged(
    config: AttackConfig, eval_config: EvalConfig, eval_at: list[int], out: Path, checkpoints: Path,
    points: list[dict[str, Any]], error: TrainingDiverged, threshold: float, reference_rate: float | None,
    concept: str, wall_seconds: float, model: DiffusionModel,
) -> dict[str, Any]:  # fmt: skip
    """Write a diverged attack as finished: its curve up to the divergence, no model."""
    summary = _curve_summary(concept, config, threshold, reference_rate, points) | {"diverged_at": error.step}
    record = {
        "config": asdict(config), "eval": asdict(eval_config), "eval_at": eval_at, "diverged": str(error),
        "wall_seconds": wall_seconds, "device": str(model.device), "versions": library_versions(),
        "source_model": model.info.get("unlearned"),
    }  # fmt: skip
    with atomic_directory(out) as tmp:
        (tmp / "curve.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "run.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
        plot_curves({config.data: points}, tmp / "curve.png", threshold,
                    title=f"{concept}: attack with {config.data} (diverged at step {error.step})")  # fmt: skip
    shutil.rmtree(checkpoints, ignore_errors=True)
    return summary


def plot_curves(curves: dict[str, list[dict[str, Any]]], path: Path, threshold: float | None, title: str = "") -> None:
    """Forget rate (with its 95% band) and retain alignment against attack steps, one line per curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_forget, ax_retain) = plt.subplots(1, 2, figsize=(9, 3.4))
    for label, points in curves.items():
        steps = [p["step"] for p in points]
        line = ax_forget.plot(steps, [p["forget_rate"] for p in points], marker="o", label=label)[0]
        ax_forget.fill_between(
            steps, [p["forget_rate_ci"][0] for p in points], [p["forget_rate_ci"][1] for p in points],
            color=line.get_color(), alpha=0.15,
        )  # fmt: skip
        retained = [(p["step"], p["retain_alignment"]) for p in points if p["retain_alignment"] is not None]
        if retained:
            ax_retain.plot(*zip(*retained), marker="o", color=line.get_color(), label=label)
    if threshold is not None:
        ax_forget.axhline(threshold, color="grey", linestyle="--", linewidth=1, label="relearn threshold")
    ax_forget.set(xlabel="attack steps", ylabel="forget-concept rate", ylim=(0, 1), title="concept regained")
    ax_retain.set(xlabel="attack steps", ylabel="retain alignment", ylim=(0, 1), title="retained quality")
    ax_forget.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
