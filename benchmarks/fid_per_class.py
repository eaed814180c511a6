"""Which retain classes does an unlearned model's FID come from?

For each model and each retain class of the concept's attribute (default: all of them), the
model samples ``--samples`` generations from the retain prompts naming that class (the seeds
`unrelearn evaluate --seed S` uses for quality), and FID / KID / the detector's class rate are
measured against ``--reference`` ground-truth images of the same prompts, in the detector's
features. A model that memorised a few images of one class (DiMUM's alternative) would show up as
that class's FID alone rising.

    python benchmarks/fid_per_class.py --models builtin:digits,DIR1,DIR2 --concept seven \\
        [--classes eight,three] [--samples 256] [--out docs/dimra/quality/per_class.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from unrelearn.assets import load_detector, load_model
from unrelearn.evaluate import EvalConfig, cycle_captions, retain_generations
from unrelearn.io import write_json_atomic
from unrelearn.metrics import concept_flags, detector_features, frechet_distance, kernel_distance
from unrelearn.worlds import get_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="comma-separated model folders or builtin:NAME")
    parser.add_argument("--concept", required=True)
    parser.add_argument("--classes", default=None, help="comma-separated retain classes (default: all)")
    parser.add_argument("--samples", type=int, default=256, help="generations per class and model")
    parser.add_argument("--reference", type=int, default=2000, help="ground-truth images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    models = args.models.split(",")
    world = get_world(load_model(models[0]).world)
    detector = load_detector(world.name)
    sets = world.concept_sets(args.concept)
    by_class: dict[str, list] = {}
    for caption in sets.retain:
        by_class.setdefault(caption.attributes[sets.attribute], []).append(caption)
    classes = args.classes.split(",") if args.classes else sorted(by_class)
    unknown = [c for c in classes if c not in by_class]
    if unknown:
        parser.error(f"--classes: {', '.join(unknown)} not among the retain classes ({', '.join(sorted(by_class))})")

    references = {}
    for cls in classes:
        images, _ = world.render(cycle_captions(by_class[cls], args.reference), torch.Generator().manual_seed(20_251_126))
        references[cls] = detector_features(detector, images)
    # KID's features are standardized by the pooled reference: some features are constant
    # within one class, and dividing by that class's own spread blows them up.
    pooled = torch.cat(list(references.values()))
    mean, deviation = pooled.mean(0), pooled.std(0).clamp_min(1e-6)
    rows = []
    for name in models:
        model = load_model(name)
        config = EvalConfig(samples=args.samples, seed=args.seed, guidance=model.guidance)
        began = time.perf_counter()
        for cls in classes:
            reference = references[cls]
            generated = retain_generations(model, cycle_captions(by_class[cls], args.samples), config)
            features = detector_features(detector, generated)
            row = {
                "model": name, "class": cls, "samples": args.samples,
                "fid": frechet_distance(reference, features),
                "kid": kernel_distance((reference - mean) / deviation, (features - mean) / deviation, seed=args.seed)[0],
                "class_rate": sum(concept_flags(detector, generated, sets.attribute, cls)) / len(generated),
            }  # fmt: skip
            rows.append(row)
            print(f"{name} {cls}: FID {row['fid']:.1f}, KID {row['kid']:.4f}, classified as {cls} {row['class_rate']:.3f}", flush=True)
        print(f"{name}: {time.perf_counter() - began:.0f} s", flush=True)
    if args.out:
        write_json_atomic(args.out, {"concept": args.concept, "samples": args.samples, "reference": args.reference,
                                     "seed": args.seed, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
