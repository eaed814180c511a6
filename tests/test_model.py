import json

import pytest
import torch
from conftest import tiny_unet
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from unrelearn.errors import UnrelearnError
from unrelearn.model import DiffusionModel, differentiable_attention


def test_prompt_encoding_is_cached_and_padded(tiny_model):
    context = tiny_model.encode_prompts(["a red circle", "a blue square", "a red circle"])
    assert context.shape == (3, 20, 384)
    assert torch.equal(context[0], context[2])
    assert "a red circle" in tiny_model._prompt_cache
    # Paraphrases are real language: a synonym lands nearer than an unrelated shape.
    disc, circle, square = tiny_model.encode_prompts(["a red disc", "a red circle", "a red square"]).mean(1)
    cos = torch.nn.functional.cosine_similarity
    assert cos(disc, circle, dim=0) > cos(disc, square, dim=0) - 0.05


def test_loss_and_sampler_shapes(tiny_model):
    x0 = tiny_model.images_to_model_space(torch.rand(4, 3, 8, 8))
    context = tiny_model.encode_prompts(["a circle"] * 4)
    generator = torch.Generator().manual_seed(0)
    loss = tiny_model.diffusion_loss(x0, context, generator)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in tiny_model.unet.parameters() if p.requires_grad)
    per_example = tiny_model.diffusion_loss(x0, context, torch.Generator().manual_seed(0), reduction="none")
    assert per_example.shape == (4,)
    assert torch.allclose(per_example.mean(), loss)

    images = tiny_model.sample(["a circle", "a square", "a cross"], steps=3, seed=0, batch_size=2)
    assert images.shape == (3, 3, 8, 8) and images.min() >= 0 and images.max() <= 1
    again = tiny_model.sample(["a circle", "a square", "a cross"], steps=3, seed=0, batch_size=2)
    assert torch.equal(images, again)
    x_t, t = tiny_model.denoise(["a circle"], steps=10, guidance=3.0, generator=torch.Generator().manual_seed(0), stop_after=4)
    assert x_t.shape == (1, 3, 8, 8) and 0 < int(t) < 1000


def test_empty_prompt_list_is_an_error(tiny_model):
    with pytest.raises(UnrelearnError, match="prompt list is empty"):
        tiny_model.sample([])


def test_save_load_round_trip(tiny_model, tmp_path):
    folder = tiny_model.save(tmp_path / "model")
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    loaded = DiffusionModel.load(folder)
    assert loaded.world == "shapes" and loaded.max_length == 20
    for (name, a), (_, b) in zip(tiny_model.unet.state_dict().items(), loaded.unet.state_dict().items()):
        assert torch.equal(a, b), name
    prompts = ["a striped ring"]
    assert torch.equal(tiny_model.sample(prompts, steps=2), loaded.sample(prompts, steps=2))


def test_sampling_guidance_defaults_to_the_models_own(tiny_model, tmp_path):
    assert tiny_model.guidance == 7.5  # nothing recorded: the Stable Diffusion convention
    tiny_model.info["guidance"] = 1.5
    loaded = DiffusionModel.load(tiny_model.save(tmp_path / "model"))
    assert loaded.guidance == 1.5
    prompts = ["a striped ring"]
    assert torch.equal(loaded.sample(prompts, steps=2), loaded.sample(prompts, steps=2, guidance=1.5))
    assert not torch.equal(loaded.sample(prompts, steps=2), loaded.sample(prompts, steps=2, guidance=7.5))


@pytest.mark.parametrize(
    "remove, message",
    [
        ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors"),
        ("unet", "unet/config.json"),
        ("scheduler", "scheduler/scheduler_config.json"),
        ("model_index.json", "no model_index.json"),
    ],
)
def test_loading_an_incomplete_folder_names_the_missing_part(tiny_model, tmp_path, remove, message):
    import shutil

    folder = tiny_model.save(tmp_path / "model")
    target = folder / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(UnrelearnError, match=message):
        DiffusionModel.load(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(UnrelearnError, match="does not exist"):
        DiffusionModel.load(tmp_path / "nowhere")


def _tiny_clip(tmp_path):
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    return CLIPTextModel(config), tokenizer


def test_latent_model_with_vae_and_clip_is_a_stable_diffusion_folder(tmp_path):
    """The Stable Diffusion layout: VAE latents, CLIP encoder; diffusers' own pipeline loads our save."""
    text_encoder, tokenizer = _tiny_clip(tmp_path)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[8, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=16,
    )  # fmt: skip
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    index = {"_class_name": "StableDiffusionPipeline", "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}  # fmt: skip
    model = DiffusionModel(tiny_unet(8, 4, 32), text_encoder, tokenizer, scheduler, vae, info={"diffusers_index": index})

    latents = model.images_to_model_space(torch.rand(2, 3, 16, 16))
    assert latents.shape == (2, 4, 8, 8)
    loss = model.diffusion_loss(latents, model.encode_prompts(["a cat", "a dog"]), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    assert model.sample(["a cat"], steps=2).shape == (1, 3, 16, 16)

    folder = model.save(tmp_path / "sd")
    loaded = DiffusionModel.load(folder)
    assert loaded.vae is not None and loaded.world == "prompts"
    assert torch.equal(model.sample(["a cat"], steps=2), loaded.sample(["a cat"], steps=2))
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    out = pipe("a cat", num_inference_steps=2, height=16, width=16, output_type="pt").images
    assert out.shape == (1, 3, 16, 16)


def test_a_prompt_embedding_does_not_depend_on_the_attention_backend_of_its_caller(minilm):
    """The cache must hold the same bits wherever a prompt is first met (a resumed run meets
    some of its prompts inside differentiable_attention(), the uninterrupted one outside)."""
    prompts = ["a red circle on a black background", "a blue square"]
    outside = DiffusionModel(tiny_unet(), *minilm, DDPMScheduler(), max_length=20).encode_prompts(prompts)
    with differentiable_attention():
        inside = DiffusionModel(tiny_unet(), *minilm, DDPMScheduler(), max_length=20).encode_prompts(prompts)
    assert torch.equal(outside, inside)


def test_a_prompt_embedding_does_not_depend_on_the_prompts_encoded_with_it(tmp_path, minilm):
    """Batched, a row's rounding depends on the rest of the batch: the cache must hold the same
    bits whether a prompt was first met alone or among others (found on the tiny CLIP folder,
    where a saved and reloaded model sampled 7e-7 apart)."""
    clip_encoder, clip_tokenizer = _tiny_clip(tmp_path)
    prompts = ["a cat", "a dog sitting on a mat", "a bird", "a red circle on a black background"]
    builders = [
        lambda: DiffusionModel(tiny_unet(), *minilm, DDPMScheduler(), max_length=20),
        lambda: DiffusionModel(tiny_unet(8, 4, 32), clip_encoder, clip_tokenizer, DDPMScheduler()),
    ]
    for fresh in builders:
        together = fresh().encode_prompts(prompts)
        alone = torch.cat([fresh().encode_prompts([p]) for p in prompts])
        assert torch.equal(together, alone)
