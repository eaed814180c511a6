"""Tiny random Stable Diffusion v1 and SDXL folders, built from configs and saved by diffusers'
own pipelines, the way a user's local folder looks (no hub access)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TOKENIZER = Path(__file__).parent / "data" / "tiny-clip-tokenizer"
IMAGE_SIZE = 32  # pixels; latents are 16x16 (one VAE downsampling)


def tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    return CLIPTokenizer(str(TOKENIZER / "vocab.json"), str(TOKENIZER / "merges.txt"), model_max_length=16, pad_token=pad_token)


def _clip_config(hidden: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=83, hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=hidden,
    )  # fmt: skip


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[8, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=IMAGE_SIZE,
    )  # fmt: skip


def _unet(cross_attention_dim: int, **sdxl) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=4, **sdxl,
    )  # fmt: skip


def save_sd1(folder: Path, seed: int = 0) -> Path:
    """An SD v1.x folder: one CLIP encoder, PNDM scheduler, VAE latents."""
    torch.manual_seed(seed)
    # As in CompVis/stable-diffusion-v1-4: clip_sample is not PNDM's own field, but the folder
    # carries it for the DDIM/DDPM schedulers built from this config.
    scheduler = PNDMScheduler.from_config({
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "skip_prk_steps": True,
        "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False,
    })  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_clip_config(32)), tokenizer=tokenizer(), unet=_unet(32),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


def save_sdxl(folder: Path, seed: int = 0) -> Path:
    """An SDXL folder: two CLIP encoders (the second with a projection), pooled embeddings and
    time ids, Euler scheduler."""
    torch.manual_seed(seed)
    unet = _unet(
        64, addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
        transformer_layers_per_block=(1, 1),
    )  # fmt: skip
    scheduler = EulerDiscreteScheduler.from_config({
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
        "clip_sample": False, "set_alpha_to_one": False,
    })  # fmt: skip
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_clip_config(32)), text_encoder_2=CLIPTextModelWithProjection(_clip_config(32)),
        tokenizer=tokenizer(), tokenizer_2=tokenizer(pad_token="!"), unet=unet, scheduler=scheduler,
    )  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random CLIPModel with its processor, as a local folder (what --clip reads)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=_clip_config(32).to_dict(),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                       image_size=32, patch_size=8).to_dict(),
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer()).save_pretrained(folder)
    return folder
