"""The method registry, the two method shapes, parameter scopes, and the ``unlearn`` runner.

A method is one file in this package that defines a class decorated with
:func:`register_method`. *Optimization-based* methods define a loss on a batch and which
parameters train; the shared :class:`~unrelearn.training.Trainer` drives them. *Closed-form*
methods edit weights directly.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from diffusers.training_utils import free_memory

from unrelearn.errors import UnrelearnError
from unrelearn.io import ensure_writable_parent, library_versions, output_lock
from unrelearn.model import DiffusionModel, copy_unet, default_attention, differentiable_attention
from unrelearn.options import (
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    Options,
    PositiveFloat,
    PositiveInt,
    check_options,
)
from unrelearn.training import OptimizerName, Processes, TrainConfig, Trainer, parameter_digest
from unrelearn.worlds import ConceptSets, World, get_world
from unrelearn.worlds.base import Caption

# Parameter scopes by diffusers module names (so they hold for SD 1.x/2.x/XL and the
# embedded UNet alike). "u" follows the original ESD code's "noxattn", which also leaves out
# the time embedding and the output convolution.
SCOPES: dict[str, tuple[str, str]] = {
    "x": (r"\.attn2\.", "cross-attention only (ESD-x)"),
    "u": (r"^(?!.*\.attn2\.)(?!time_embedding\.)(?!conv_out\.)", "everything but cross-attention, time embedding, conv_out (ESD-u)"),
    "f": (r"", "all UNet parameters (ESD-f)"),
}
ScopeName = Literal["x", "u", "f"]


def select_parameters(unet: torch.nn.Module, scope: str) -> dict[str, torch.nn.Parameter]:
    """The UNet parameters a scope names; an empty match is an error, not a silent no-op."""
    if scope not in SCOPES:
        raise UnrelearnError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    pattern = re.compile(SCOPES[scope][0])
    selected = {name: p for name, p in unet.named_parameters() if pattern.search(name)}
    if not selected:
        raise UnrelearnError(f"scope {scope!r} matches no parameter of this UNet")
    return selected


@dataclass
class MethodConfig(Options):
    """What every method takes: the seed of its randomness (recorded even where it draws none,
    so one ``--seed`` works across a loop over methods)."""

    seed: int = 0


@dataclass
class OptimizationConfig(MethodConfig):
    """What every optimization-based method shares (its paper's defaults per method)."""

    steps: PositiveInt = 1000
    lr: NonNegativeFloat = 1e-5
    optimizer: OptimizerName = "adam"
    batch_size: PositiveInt = 1
    weight_decay: NonNegativeFloat = 0.0
    grad_clip: PositiveFloat | None = None
    # With an output folder, a run is resumable from this many steps back at worst (0: never).
    checkpoint_every: NonNegativeInt = 200
    # Memory for large UNets: recompute activations in the backward pass (also through an exact
    # meta-gradient's double backward), and run the forward passes under bf16 autocast (weights,
    # optimizer state and gradients stay float32; fp16 would need loss scaling: not offered).
    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "bf16"] = "no"
    # Without ground-truth images (Stable Diffusion) the training images of a prompt are this
    # many generations of the frozen original model, made once and drawn from (the papers train
    # on data sets generated before training, not on fresh samples every step).
    generated_per_prompt: PositiveInt = 8
    # Save an exponential moving average of the trained weights instead of the last iterate: ten
    # optimizer steps more or less move a digits model's FID by up to 2x
    # (docs/dimra/quality/iterate). The decay ramps in as (1 + s) / (10 + s), so the average
    # soon holds none of the original weights, which still know the concept.
    ema_decay: Fraction | None = None

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            steps=self.steps, lr=self.lr, optimizer=self.optimizer, weight_decay=self.weight_decay,
            grad_clip=self.grad_clip, seed=self.seed, checkpoint_every=self.checkpoint_every,
            ema_decay=self.ema_decay,
        )  # fmt: skip


class Method(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type]
    closed_form: ClassVar[bool] = False
    # Overrides of the paper's (Stable Diffusion) defaults for the embedded world, found by
    # measurement (see docs/).
    embedded_defaults: ClassVar[dict[str, Any]] = {}

    # Whether the method's loss reads the frozen original UNet theta* (ESD's targets).
    uses_teacher: ClassVar[bool] = False
    # Whether the method masks parameter gradients with hooks (SalUn): such hooks also act on
    # any other gradient of those parameters, a simulated attacker's included.
    masks_gradients: ClassVar[bool] = False

    def __init__(self, model: DiffusionModel, sets: ConceptSets, config: Any, world: World | None = None) -> None:
        self.model = model
        self.sets = sets
        self.world = world
        self.config = config
        # theta* is copied here, before a trainer can load a checkpoint into the live weights: a
        # resumed run must erase against the original model, not against its own partial result.
        self._teacher: torch.nn.Module | None = copy_unet(model.unet) if self.needs_teacher() else None
        self._generated_pool: dict[str, torch.Tensor] = {}

    def needs_teacher(self) -> bool:
        """ESD-style targets read theta*; without a world, training images are theta*'s samples too."""
        return self.uses_teacher or (self.world is None and not self.closed_form)

    def differentiates_twice(self) -> bool:
        """Whether the loss backpropagates through gradients (an exact meta-gradient, ResAlign's
        Hessian-vector products): such runs need attention with a double backward."""
        return False

    def pick(self, pool: list[Caption], generator: torch.Generator, size: int | None = None) -> list[Caption]:
        """A batch of ``size`` (default ``config.batch_size``) captions drawn with replacement."""
        size = self.config.batch_size if size is None else size
        picks = torch.randint(len(pool), (size,), generator=generator).tolist()
        return [pool[i] for i in picks]

    def pairs(
        self, pool: list[Caption], generator: torch.Generator, size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training images and prompt embeddings of a batch drawn from ``pool`` (see :meth:`pick`)."""
        captions = self.pick(pool, generator, size)
        return self.images(captions, generator), self.model.encode_prompts([c.text for c in captions])

    def retain_loss(self, generator: torch.Generator) -> torch.Tensor:
        """``L_DM`` on a batch of retain prompts with their images."""
        return self.model.diffusion_loss(*self.pairs(self.sets.retain, generator), generator)

    def sampled_x_t(
        self, prompts: list[str], generator: torch.Generator, unet: torch.nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_t`` from ``unet``'s own DDIM sampler, stopped at a random step (ESD, SDD)."""
        steps = self.config.ddim_steps
        stop_after = int(torch.randint(1, steps, (1,), generator=generator))
        return self.model.denoise(
            prompts, steps=steps, guidance=self.config.sample_guidance, generator=generator, stop_after=stop_after, unet=unet
        )

    def images(self, captions: list[Caption], generator: torch.Generator) -> torch.Tensor:
        """Training images for ``captions`` in model space.

        In a procedural world they are ground-truth renders; otherwise (Stable Diffusion) the
        frozen model generates them, as ESD-style methods do.
        """
        if self.world is not None:
            images, _ = self.world.render(captions, generator)
            return self.model.images_to_model_space(images)
        count = getattr(self.config, "generated_per_prompt", OptimizationConfig.generated_per_prompt)
        picks = torch.randint(count, (len(captions),), generator=generator).tolist()
        return torch.stack([self._generated(c.text, count)[i] for c, i in zip(captions, picks)])

    def _generated(self, prompt: str, count: int) -> torch.Tensor:
        """``count`` samples of theta* for ``prompt`` (model space), generated when the prompt is
        first met from a seed of the prompt and the method's seed, so a resumed run regenerates
        exactly the same set."""
        if prompt not in self._generated_pool:
            seed = int(hashlib.sha256(f"{self.config.seed}:{prompt}".encode()).hexdigest()[:15], 16)
            # Under torch's own attention choice wherever the prompt is first met (inside an exact
            # meta step's math-kernel context or not), so the set does not depend on the call site.
            with default_attention():
                x, _ = self.model.denoise([prompt] * count, steps=50, guidance=7.5,
                                          generator=torch.Generator().manual_seed(seed), unet=self.teacher)  # fmt: skip
            self._generated_pool[prompt] = x
        return self._generated_pool[prompt]

    @property
    def teacher(self) -> torch.nn.Module:
        """The frozen original UNet ``theta*``, as it was when the method was built."""
        if self._teacher is None:
            raise RuntimeError(f"method {self.name!r} reads the frozen teacher; set uses_teacher = True on its class")
        return self._teacher


class OptimizationMethod(Method):
    @abstractmethod
    def parameters(self) -> dict[str, torch.nn.Parameter]:
        """The parameters this method trains (its scope)."""

    def train_config(self) -> TrainConfig:
        return self.config.train_config()

    @abstractmethod
    def loss(self, step: int, generator: torch.Generator) -> torch.Tensor | dict[str, torch.Tensor]:
        """The loss of one batch; a dict must hold "loss" and may log more terms."""

    def bind(self, trainer: Trainer) -> None:
        """Called once the trainer exists (SDD reads the trainer's EMA weights)."""

    def finish(self) -> None:
        """Called after the last step, once the EMA (if any) is in the parameters (ResAlign merges
        its LoRA here)."""

    def record(self) -> dict[str, Any]:
        """Entries for run.json beyond the losses (a second stage's closed-form statistics)."""
        return {}

    def loss_at(self, generator: torch.Generator) -> Callable[[Mapping[str, torch.Tensor] | None], torch.Tensor] | None:
        """This method's loss on one fixed draw (prompts, ``x_t``, targets) as a function of
        substituted parameters (``None``: the model's own), for defences that evaluate it at a
        simulated attacker's weights (ResAlign's ``harm=method``); ``None`` if not offered."""
        return None


class ClosedFormMethod(Method):
    closed_form = True

    @abstractmethod
    def apply(self) -> dict[str, Any]:
        """Edit the weights in place; returns statistics for run.json."""


_METHODS: dict[str, type[Method]] = {}
# Defences that wrap any method, by prefix: "meta" makes "meta:esd-u-1".
_WRAPPERS: dict[str, Callable[[type[Method]], type[Method]]] = {}
_WRAPPER_INFO: dict[str, tuple[str, tuple[type, ...]]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    _METHODS[cls.name] = cls
    return cls


def register_wrapper(
    prefix: str, summary: str = "", options: tuple[type, ...] = ()
) -> Callable[[Callable[[type[Method]], type[Method]]], Callable[[type[Method]], type[Method]]]:
    """Register a defence ``PREFIX:NAME``; ``summary`` and the dataclasses of its own ``options``
    are what `unrelearn methods` lists."""

    def decorator(wrap: Callable[[type[Method]], type[Method]]) -> Callable[[type[Method]], type[Method]]:
        _WRAPPERS[prefix] = functools.cache(wrap)
        _WRAPPER_INFO[prefix] = (summary, options)
        return wrap

    return decorator


def wrapper_info(prefix: str) -> tuple[str, tuple[type, ...]]:
    return _WRAPPER_INFO[prefix]


def wrapper_names() -> list[str]:
    return sorted(_WRAPPERS)


def method_names() -> list[str]:
    return sorted(_METHODS)


def resolve_method(name: str) -> tuple[type[Method], dict[str, Any]]:
    """A registered name, a family name with variant suffix (``esd-u-3``), or either behind a
    defence's prefix (``meta:esd-u-3``) -> (class, overrides)."""
    prefix, _, inner = name.partition(":")
    if inner:
        if prefix not in _WRAPPERS:
            raise UnrelearnError(f"unknown defence {prefix!r} in {name!r}; known defences: {', '.join(wrapper_names())}")
        cls, overrides = resolve_method(inner)
        return _WRAPPERS[prefix](cls), overrides
    if name in _METHODS:
        return _METHODS[name], {}
    for cls in _METHODS.values():
        parse = getattr(cls, "parse_variant", None)
        if parse is not None and (overrides := parse(name)) is not None:
            return cls, overrides
    raise UnrelearnError(f"unknown method {name!r}; known methods: {', '.join(method_names())} (see `unrelearn methods`)")


def build_config(cls: type[Method], world: str | None, overrides: dict[str, Any]) -> Any:
    """The method's config: its paper's defaults, the world's embedded defaults, then ``overrides``."""
    values = (dict(cls.embedded_defaults) if world is not None else {}) | check_method_options(cls, overrides)
    return cls.Config(**values)


def resolve_config(method: str, world_name: str, overrides: dict[str, Any]) -> Any:
    """The config ``unlearn`` runs ``method`` with on a model of ``world_name``: embedded defaults
    belong to a world with ground truth (the toy scale); a prompt world (Stable Diffusion) runs
    the paper's defaults."""
    cls, variant = resolve_method(method)
    world = get_world(world_name)
    return build_config(cls, world.name if world.ground_truth else None, variant | dict(overrides))


def check_method_options(cls: type[Method], overrides: dict[str, Any]) -> dict[str, Any]:
    """Type- and range-check user options before anything is loaded (the CLI calls this first)."""
    if cls.closed_form and "steps" in overrides:
        raise UnrelearnError(f"{cls.name} is closed-form: it takes no --steps")
    return check_options(cls.Config, overrides, cls.name)


def unlearn(
    model: DiffusionModel,
    method: str,
    concept: str,
    out: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    world_name: str | None = None,
    progress: bool = True,
    resume: bool = True,
) -> dict[str, Any]:
    """Unlearn ``concept`` from ``model`` in place; with ``out``, save the folder and run.json.

    With ``out``, checkpoints go to ``OUT.checkpoint`` and a re-run with the same settings resumes
    from them; a checkpoint of other settings (or of another source model) is refused.
    """
    overrides = dict(overrides or {})
    cls, _ = resolve_method(method)
    world = get_world(world_name or model.world)
    sets = world.concept_sets(concept)
    config = resolve_config(method, world.name, overrides)
    if out is not None:
        out = Path(out)
        ensure_writable_parent(out)
    # In a multi-process run the main process owns the output (the others hold the same weights).
    owner = out is not None and Processes().main
    with output_lock(out) if owner else contextlib.nullcontext():
        return _unlearn(model, cls, method, concept, world, sets, config, out, progress, resume)


def _unlearn(
    model: DiffusionModel, cls: type[Method], method: str, concept: str, world: World, sets: ConceptSets, config: Any,
    out: Path | None, progress: bool, resume: bool,
) -> dict[str, Any]:  # fmt: skip
    began = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    record: dict[str, Any] = {"method": method, "family": cls.name, "concept": concept, "config": asdict(config)}
    checkpoints = out.with_name(f"{out.name}.checkpoint") if out is not None else None
    if issubclass(cls, ClosedFormMethod):
        instance = cls(model, sets, config, _image_world(world))
        record["stats"] = instance.apply()
    else:
        # The digest is taken before the method sees the model: it names the weights this run
        # starts from, which a checkpoint must share to be resumed.
        settings = {"method": cls.name, "concept": concept, "world": world.name, "config": _checkpoint_config(config),
                    "source_model_sha256": parameter_digest(model.unet)}  # fmt: skip
        instance = cls(model, sets, config, _image_world(world))
        trainer = Trainer(
            instance.parameters(), _autocast_loss(instance.loss, config.mixed_precision, model.device),
            instance.train_config(), checkpoints, progress, description=method, settings=settings,
        )  # fmt: skip
        instance.bind(trainer)
        model.unet.train()
        if config.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
        # A checkpointed block is recomputed in the backward pass under the attention backend in
        # force *then*: a loss built inside differentiable_attention() must also be
        # backpropagated there, or the recomputation takes another kernel and fails.
        same_backend = config.gradient_checkpointing and instance.differentiates_twice()
        try:
            with differentiable_attention() if same_backend else contextlib.nullcontext():
                result = trainer.run(resume=resume)
        finally:
            if config.gradient_checkpointing:
                model.unet.disable_gradient_checkpointing()
        model.unet.eval()
        if trainer.ema is not None:
            trainer.copy_ema_to_params()
        instance.finish()
        record["final_losses"] = result.final_losses()
        # An odd stride, so that methods alternating two stages by step parity (Sfront) keep both.
        record["loss_curve"] = result.losses[:: max(1, len(result.losses) // 500) | 1]
        record["resumed_from_step"] = result.resumed_from
        record["trained_parameters"] = sum(p.numel() for p in instance.parameters().values())
        record |= instance.record()
    record["wall_seconds"] = time.perf_counter() - began
    record["peak_memory_bytes"] = _peak_memory()
    # The teacher, EMA copies and simulated attackers' data go with the method instance: hand
    # their memory back before the caller's next phase (evaluation, an attack) allocates.
    del instance
    free_memory()
    record["device"] = str(model.device)
    record["versions"] = library_versions()
    model.info["unlearned"] = {"method": method, "concept": concept}
    processes = Processes()
    record["processes"] = processes.count
    if out is not None and processes.main:
        extra: dict[str, Any] = {"run.json": record}
        if record.get("loss_curve"):
            extra["training.png"] = plot_training_curves(record["loss_curve"], title=f"{method} on {concept!r}")
        model.save(out, extra_files=extra)
        if checkpoints is not None:
            shutil.rmtree(checkpoints, ignore_errors=True)
    processes.wait()
    return record


# Options added after checkpoints were first written: at these values a run is what it was
# before they existed, so they stay out of a checkpoint's settings (older checkpoints resume).
# (ResAlign's resilience is written out: its options class imports this module.)
_LATER_OPTIONS = {name: getattr(OptimizationConfig, name) for name in ("gradient_checkpointing", "mixed_precision", "generated_per_prompt")}
_LATER_OPTIONS["resilience"] = "difference"
_LATER_OPTIONS["mask_fraction"] = None  # DiMUM's (SalUn's own is never None)


def _checkpoint_config(config: Any) -> dict[str, Any]:
    return {k: v for k, v in asdict(config).items() if not (k in _LATER_OPTIONS and v == _LATER_OPTIONS[k])}


def _autocast_loss(loss: Callable, mixed_precision: str, device: torch.device) -> Callable:
    """``loss`` with its forward passes under autocast (``mixed_precision`` bf16), the loss itself
    returned in float32."""
    if mixed_precision == "no":
        return loss

    def autocast_loss(step: int, generator: torch.Generator):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            out = loss(step, generator)
        if isinstance(out, dict):
            return {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() == 0 else v for k, v in out.items()}
        return out.float()

    return autocast_loss


def _image_world(world: World) -> World | None:
    """The world a method draws training images from; None: the frozen original model generates them."""
    return world if world.ground_truth else None


def plot_training_curves(rows: list[dict[str, float]], title: str = "") -> bytes:
    """PNG bytes: one panel per logged term against the step (for meta runs, ``cos_ft_retain`` is
    the self-destruction signal of the Meta-Unlearning paper's Fig. 6)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(k for row in rows for k in row if k != "step"))
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    steps = [row["step"] for row in rows]
    for ax, key in zip(axes[0], keys):
        ax.plot(steps, [row.get(key, float("nan")) for row in rows], linewidth=1)
        ax.set(title=key, xlabel="step")
        if key.startswith("cos"):
            ax.axhline(0, color="grey", linewidth=0.8, linestyle="--")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _peak_memory() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
