"""Seconds per step and peak memory of ESD, Meta-ESD (first-order and exact) and ResAlign on a
randomly initialized UNet of the Stable Diffusion v1.4 architecture, with and without gradient
checkpointing and bf16 autocast.

Every (method, memory option) pair runs in its own process, twice (1 step and 1 + --steps
steps), so that set-up (the teacher copy, ResAlign's generated fine-tuning data) drops out of
the per-step time and each peak is that pair's own: ``torch.cuda.max_memory_allocated`` on a GPU,
the process's maximum resident set on a CPU (which includes Python and torch themselves).

The published reference point: ResAlign reports a 56 GB peak on an A100 for SD v1.4 (its
rank-4 LoRA, 512x512 images = 64x64 latents).

    python benchmarks/sd_step_cost.py --device cuda                 # the real size, on a GPU
    python benchmarks/sd_step_cost.py --device cpu --width 0.2 --latent 32 --ddim-steps 10   # CPU ratios

The UNet is SD v1.4's (4 levels, 2 layers each, cross-attention dim 768, 8 heads); ``--width``
scales its channels (1 = 320/640/1280/1280). The text encoder is a one-layer random CLIP of width
768 (its cost is not what is measured); there is no VAE, so the UNet runs on 4-channel
64x64 "latents" directly, which is what it costs inside SD. The training images that methods
generate once per prompt with the original model (set-up, minutes per prompt on a CPU) are
random latents here; ESD's own x_t sampling, part of its every step, is measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

METHODS = {
    "esd-u-1": ("esd-u-1", {}),
    "meta:esd-u-1 first-order": ("meta:esd-u-1", {"meta_grad": "first-order", "inner_steps": 1}),
    "meta:esd-u-1 exact": ("meta:esd-u-1", {"meta_grad": "exact", "inner_steps": 1}),
    # The paper's LoRA parametrization; fewer generated fine-tuning images than its 64 per data
    # set, so the set-up stays short (it is not part of the per-step time).
    "resalign": ("resalign", {"ft_data_size": 8}),
}
MEMORY = {
    "plain": {},
    "checkpointing": {"gradient_checkpointing": True},
    "bf16": {"mixed_precision": "bf16"},
    "checkpointing+bf16": {"gradient_checkpointing": True, "mixed_precision": "bf16"},
}
TOKENIZER = Path(__file__).resolve().parent.parent / "tests" / "data" / "tiny-clip-tokenizer"


def build_model(width: float, latent: int, device: str):
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from unrelearn.model import DiffusionModel

    torch.manual_seed(0)
    channels = tuple(max(32, round(c * width / 32) * 32) for c in (320, 640, 1280, 1280))
    unet = UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
    )  # fmt: skip
    tokenizer = CLIPTokenizer(str(TOKENIZER / "vocab.json"), str(TOKENIZER / "merges.txt"), model_max_length=77)
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=83, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=1,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))  # fmt: skip
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
    return DiffusionModel(unet, encoder, tokenizer, scheduler).to(device)


def run_one(method_label: str, memory_label: str, steps: int, width: float, latent: int, device: str, ddim_steps: int | None) -> dict:
    import torch

    from unrelearn.methods import unlearn
    from unrelearn.methods.base import Method

    # The training images of a world without ground truth are generated once per prompt before
    # they are first used (set-up, not a per-step cost, and minutes per prompt on a CPU): random
    # latents of the same shape stand in, so the timed steps measure training alone.
    def random_pool(self, prompt: str, count: int) -> torch.Tensor:
        if prompt not in self._generated_pool:
            self._generated_pool[prompt] = torch.randn(self.model.sample_shape(count)).to(self.model.device)
        return self._generated_pool[prompt]

    Method._generated = random_pool
    method, options = METHODS[method_label]
    model = build_model(width, latent, device)
    parameters = sum(p.numel() for p in model.unet.parameters())
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    overrides = options | MEMORY[memory_label] | {"steps": steps, "checkpoint_every": 0}
    if ddim_steps is not None and method != "resalign":
        overrides["ddim_steps"] = ddim_steps
    record = unlearn(model, method, "nudity", overrides=overrides, progress=False)
    return {"wall_seconds": time.perf_counter() - began, "peak_bytes": record["peak_memory_bytes"], "unet_parameters": parameters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--width", type=float, default=1.0, help="channel scale of the SD v1.4 UNet (1 = the real one)")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512x512 images)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one untimed)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    parser.add_argument("--memory", default=",".join(MEMORY), help="comma-separated, from: " + ", ".join(MEMORY))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--ddim-steps", type=int, help="ESD's sampler steps for x_t (default: the paper's 50); "
                        "fewer keep a CPU run short, at the price of a smaller share of sampling in ESD's step")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "MEMORY", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], int(args.one[2]), args.width, args.latent, args.device, args.ddim_steps)))
        return

    rows = []
    print(f"SD v1.4 UNet architecture, width x{args.width}, {args.latent}x{args.latent} latents, device {args.device}, "
          f"ESD x_t sampler {args.ddim_steps or 50} steps", flush=True)  # fmt: skip
    print(f"{'method':<28} {'memory option':<20} {'s/step':>8} {'peak GiB':>9}", flush=True)
    for method in args.methods.split(","):
        for memory in args.memory.split(","):
            runs = {}
            for steps in (1, 1 + args.steps):
                command = [sys.executable, __file__, "--one", method, memory, str(steps), "--width", str(args.width),
                           "--latent", str(args.latent), "--device", args.device]  # fmt: skip
                if args.ddim_steps is not None:
                    command += ["--ddim-steps", str(args.ddim_steps)]
                done = subprocess.run(command, check=False, capture_output=True, text=True)  # a failure becomes its row
                if done.returncode != 0:
                    tail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "?"
                    runs = {"error": tail}
                    break
                runs[steps] = json.loads(done.stdout.strip().splitlines()[-1])
            if "error" in runs:
                rows.append({"method": method, "memory": memory, "error": runs["error"]})
                print(f"{method:<28} {memory:<20} failed: {runs['error']}", flush=True)
                continue
            per_step = (runs[1 + args.steps]["wall_seconds"] - runs[1]["wall_seconds"]) / args.steps
            peak = runs[1 + args.steps]["peak_bytes"]
            rows.append({"method": method, "memory": memory, "seconds_per_step": per_step, "peak_bytes": peak,
                         "unet_parameters": runs[1]["unet_parameters"]})  # fmt: skip
            print(f"{method:<28} {memory:<20} {per_step:>8.2f} {peak / 2**30:>9.2f}", flush=True)
    plain = {r["method"]: r for r in rows if r["memory"] == "plain" and "error" not in r}
    if "esd-u-1" in plain:
        print("\nratios to ESD-u-1 without memory options (time, peak):")
        for r in rows:
            if "error" not in r:
                base = plain["esd-u-1"]
                print(f"  {r['method']:<28} {r['memory']:<20} {r['seconds_per_step'] / base['seconds_per_step']:>6.2f}x "
                      f"{r['peak_bytes'] / base['peak_bytes']:>6.2f}x")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
