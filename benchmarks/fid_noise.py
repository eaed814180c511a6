"""How much do the evaluation's quality metrics move when nothing but the seed changes?

For each sample count N and seed S, the images `unrelearn evaluate --seed S --samples A
--quality-samples N` scores for quality (the first A = min(N, --alignment-samples) retain
generations, seed S + 1, then N - A more from the extra quality stream) are scored in the
detector's 64-d features, as `evaluate` scores them:
- precision: the share inside the k-NN manifold of the cached 10,000 ground-truth renders;
- the manifold distance: the mean distance to the k-th nearest of those renders, in units of
  their own k-NN radii (k as precision's);
- FID against the same reference;
- KID against it (torchmetrics, 100 subsets, standardized features);
- the former FID against as many fresh renders as generations (renders S + 2), for comparison.
It prints each metric's relative spread over the seeds, (max - min) / mean, and with more than
three seeds the spread three seeds are expected to show, 1.69 standard deviations (the expected
range of three normal draws) over the mean.

    python benchmarks/fid_noise.py [--model builtin:shapes] [--concept striped] [--samples 64,128]
        [--alignment-samples 128] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from unrelearn.assets import load_detector, load_model
from unrelearn.evaluate import (
    PRECISION_K,
    EvalConfig,
    cycle_captions,
    quality_generations,
    reference_features,
    reference_radii,
    retain_generations,
)
from unrelearn.io import write_json_atomic
from unrelearn.metrics import (
    detector_features,
    detector_fid,
    frechet_distance,
    kernel_distance,
    manifold_distances,
    manifold_precision_flags,
)
from unrelearn.worlds import get_world

# The expected range of three independent normal draws, in standard deviations.
RANGE_OF_THREE = 1.693


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.mean(values)


def expected_spread_of_three(values: list[float]) -> float | None:
    return RANGE_OF_THREE * statistics.stdev(values) / statistics.mean(values) if len(values) > 3 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:shapes")
    parser.add_argument("--concept", default="striped")
    parser.add_argument("--samples", default="64,128")
    parser.add_argument("--alignment-samples", type=int, default=EvalConfig.samples,
                        help="evaluate's --samples: the retain generations that come first (default: evaluate's)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    model = load_model(args.model)
    world = get_world(model.world)
    detector = load_detector(world.name)
    began = time.perf_counter()
    reference = reference_features(world, args.concept, detector)
    radii = reference_radii(world, args.concept, detector)
    mean, deviation = reference.mean(0), reference.std(0).clamp_min(1e-6)
    print(f"reference features: {len(reference)} renders in {time.perf_counter() - began:.1f} s (cached afterwards)")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = {}
    for samples in [int(n) for n in args.samples.split(",")]:
        captions = world.concept_sets(args.concept).retain
        retain = cycle_captions(captions, samples)
        first = min(samples, args.alignment_samples)
        precision, distance, fid, kid, paired = [], [], [], [], []
        for seed in seeds:
            config = EvalConfig(samples=first, quality_samples=samples, seed=seed, guidance=model.guidance)
            generated = quality_generations(model, captions, config, retain_generations(model, retain[:first], config))
            features = detector_features(detector, generated)
            inside = manifold_precision_flags(reference, radii, features)
            precision.append(sum(inside) / len(inside))
            distance.append(float(manifold_distances(reference, radii, features, PRECISION_K).mean()))
            fid.append(frechet_distance(reference, features))
            kid.append(kernel_distance((reference - mean) / deviation, (features - mean) / deviation, seed=seed)[0])
            renders, _ = world.render(retain, torch.Generator().manual_seed(seed + 2))
            paired.append(detector_fid(detector, renders, generated))
            print(f"samples {samples} seed {seed}: precision {precision[-1]:.3f}, manifold distance {distance[-1]:.3f}, "
                  f"FID {fid[-1]:.1f}, KID {kid[-1]:.4f}, "
                  f"former paired FID {paired[-1]:.0f}",
                  flush=True)  # fmt: skip
        values = {"precision": precision, "manifold_distance": distance, "fid": fid, "kid": kid, "paired_fid": paired}
        rows[samples] = {**values, "spread": {name: spread(v) for name, v in values.items()},
                         "expected_spread_of_three": {name: expected_spread_of_three(v) for name, v in values.items()}}  # fmt: skip
        print(f"samples {samples}: relative spread over seeds {seeds}: "
              + ", ".join(f"{name} {spread(v):.1%}" for name, v in values.items()))  # fmt: skip
        if len(seeds) > 3:
            print(f"samples {samples}: expected spread of three seeds (1.69 sd / mean): "
                  + ", ".join(f"{name} {expected_spread_of_three(v):.1%}" for name, v in values.items()))  # fmt: skip
    summary = {"model": args.model, "concept": args.concept, "seeds": seeds,
               "alignment_samples": args.alignment_samples, "by_samples": rows,
               "wall_seconds": time.perf_counter() - began}  # fmt: skip
    if args.out:
        write_json_atomic(args.out, summary)


if __name__ == "__main__":
    main()
