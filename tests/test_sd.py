"""Stable Diffusion v1.x and SDXL folders in the model abstraction, checked against diffusers'
own pipelines on tiny random models built from configs."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from tiny_sd import IMAGE_SIZE, save_sd1, save_sdxl

from unrelearn.errors import UnrelearnError
from unrelearn.model import DiffusionModel

ARCHITECTURES = {"sd1": (save_sd1, StableDiffusionPipeline), "sdxl": (save_sdxl, StableDiffusionXLPipeline)}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def sd_folder(request, tmp_path_factory):
    save, pipeline_class = ARCHITECTURES[request.param]
    return save(tmp_path_factory.mktemp(request.param) / "model"), pipeline_class


def _pipeline_images(pipeline_class, folder, prompts, noise, guidance, steps):
    pipe = pipeline_class.from_pretrained(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompts, num_inference_steps=steps, guidance_scale=guidance, latents=noise, height=IMAGE_SIZE, width=IMAGE_SIZE,
        output_type="pt", eta=0.0,
    ).images  # fmt: skip


def test_sampling_equals_the_diffusers_pipeline(sd_folder):
    """Same initial latents, DDIM, guidance: our sampler conditions the UNet exactly as the
    pipeline does (SDXL: both encoders' penultimate states, pooled embedding, time ids, zeroed
    negative prompt)."""
    folder, pipeline_class = sd_folder
    model = DiffusionModel.load(folder)
    prompts = ["a photo of a cat", "a red car, 4k"]
    ours = model.sample(prompts, steps=3, guidance=5.0, seed=7)
    noise = torch.randn(model.sample_shape(2), generator=torch.Generator().manual_seed(7))
    theirs = _pipeline_images(pipeline_class, folder, prompts, noise, 5.0, 3)
    assert ours.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_the_conditioning_matters(sd_folder):
    """A check that could fail: different prompts give different noise predictions, so the
    equality above is not that of an unconditioned model."""
    model = DiffusionModel.load(sd_folder[0])
    x = torch.randn(model.sample_shape(1), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    a = model.predict_noise(x, t, model.encode_prompts(["a cat"]))
    b = model.predict_noise(x, t, model.encode_prompts(["a dog"]))
    assert not torch.allclose(a, b)


def test_sdxl_context_packs_the_pooled_embedding(tmp_path):
    model = DiffusionModel.load(save_sdxl(tmp_path / "xl"))
    context = model.encode_prompts(["a cat", ""])
    assert model.pooled_dim == 32
    assert context.shape == (2, 16 + 1, 64)
    assert model.token_embeddings(context).shape == (2, 16, 64)
    assert torch.count_nonzero(context[1]) == 0  # force_zeros_for_empty_prompt, as the pipeline
    assert torch.count_nonzero(context[0, -1, 32:]) == 0 and torch.count_nonzero(context[0, -1, :32]) > 0


def test_save_round_trip_loads_in_plain_diffusers(sd_folder, tmp_path):
    """A trained (here: perturbed) model saves to a folder that diffusers' own pipeline loads,
    with the original scheduler class and the changed weights."""
    folder, pipeline_class = sd_folder
    model = DiffusionModel.load(folder)
    original_class = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    with torch.no_grad():
        next(model.unet.parameters()).add_(0.5)
    loss = model.diffusion_loss(
        model.images_to_model_space(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)), model.encode_prompts(["a cat", "a dog"]),
        torch.Generator().manual_seed(0),
    )  # fmt: skip
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.unet.parameters() if p.requires_grad)

    saved = model.save(tmp_path / "saved")
    pipe = pipeline_class.from_pretrained(saved)
    assert type(pipe.scheduler).__name__ == original_class
    for (name, ours), theirs in zip(model.unet.state_dict().items(), pipe.unet.state_dict().values()):
        assert torch.equal(ours, theirs), name
    images = pipe("a cat", num_inference_steps=2, height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="pt").images
    assert images.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(images).all()
    reloaded = DiffusionModel.load(saved)
    # Encoders and tokenizers survive the round trip (a fresh load of the original: the same batch
    # shape, so the same rounding).
    assert torch.equal(reloaded.encode_prompts(["a cat"]), DiffusionModel.load(folder).encode_prompts(["a cat"]))


def test_sdxl_without_its_second_encoder_is_one_clear_error(tmp_path):
    folder = save_sdxl(tmp_path / "xl")
    import shutil

    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(UnrelearnError, match="missing text_encoder_2/"):
        DiffusionModel.load(folder)
