"""How much does the evaluation's FID move when nothing but the seed changes?

FID compares generations from the retain prompts with ground-truth renders of the same
prompts, in the detector's 64-d features. At a few hundred images that estimate is biased
and noisy; this prints the floor (two independent sets of ground-truth renders) and the
model's own spread over seeds, with the seeds `unrelearn evaluate --seed S` uses (retain
generations S + 1, renders S + 2), so seed 0 reproduces the FID of an evaluation.

    python benchmarks/fid_noise.py [--model builtin:shapes] [--concept striped] [--samples 128] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from unrelearn.assets import load_detector, load_model
from unrelearn.evaluate import EvalConfig, cycle_captions, retain_and_real_images
from unrelearn.io import write_json_atomic
from unrelearn.metrics import detector_fid
from unrelearn.worlds import get_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:shapes")
    parser.add_argument("--concept", default="striped")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    model = load_model(args.model)
    world = get_world(model.world)
    detector = load_detector(world.name)
    retain = cycle_captions(world.concept_sets(args.concept).retain, args.samples)
    seeds = [int(s) for s in args.seeds.split(",")]
    began = time.perf_counter()
    real_vs_real, model_fid = {}, {}
    for seed in seeds:
        config = EvalConfig(samples=args.samples, seed=seed, guidance=model.guidance)
        generated, real = retain_and_real_images(model, world, retain, config)
        other_real, _ = world.render(retain, torch.Generator().manual_seed(seed + 1000))
        real_vs_real[seed] = detector_fid(detector, real, other_real)
        model_fid[seed] = detector_fid(detector, real, generated)
        print(f"seed {seed}: real vs real {real_vs_real[seed]:.0f}, model {model_fid[seed]:.0f}", flush=True)
    summary = {
        "model": args.model,
        "concept": args.concept,
        "samples": args.samples,
        "real_vs_real": real_vs_real,
        "model_fid": model_fid,
        "model_relative_spread": (max(model_fid.values()) - min(model_fid.values())) / statistics.mean(model_fid.values()),
        "wall_seconds": time.perf_counter() - began,
    }
    print(f"model FID {min(model_fid.values()):.0f}-{max(model_fid.values()):.0f} over seeds {args.seeds}; "
          f"real vs real {min(real_vs_real.values()):.0f}-{max(real_vs_real.values()):.0f}")  # fmt: skip
    if args.out:
        write_json_atomic(args.out, summary)


if __name__ == "__main__":
    main()
