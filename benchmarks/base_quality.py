"""How well does a world model draw what it is asked for? Per-attribute detection rates.

For each concept, generate from its evaluation prompts (many phrasings, attributes partly
stated) and its retain prompts (fully stated), and report, per attribute, the share of
generations in which the detector finds the stated value.

    python benchmarks/base_quality.py [--model builtin:shapes] [--samples 256] [--out docs/base_quality.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from unrelearn.assets import load_detector, load_model
from unrelearn.evaluate import cycle_captions
from unrelearn.io import write_text_atomic
from unrelearn.metrics import stated_attribute_accuracy
from unrelearn.worlds import get_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:shapes")
    parser.add_argument("--concepts", default="circle,striped")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    model = load_model(args.model)
    world = get_world(model.world)
    detector = load_detector(world.name)
    results = {}
    began = time.perf_counter()
    for concept in args.concepts.split(","):
        sets = world.concept_sets(concept)
        for name, pool in (("evaluation", sets.evaluation), ("retain", sets.retain)):
            captions = cycle_captions(pool, args.samples)
            images = model.sample([c.text for c in captions], seed=args.seed)
            results[f"{concept}/{name}"] = stated_attribute_accuracy(detector, images, captions)
    summary = {
        "model": args.model,
        "samples_per_set": args.samples,
        "seed": args.seed,
        "sampler": {"steps": 25, "guidance": model.guidance},
        "sets": results,
        "wall_seconds": time.perf_counter() - began,
    }
    print(f"{'prompt set':24s} {'shape':>8s} {'colour':>8s} {'texture':>8s} {'background':>10s}")
    for key, row in results.items():
        cells = [f"{row[a]['accuracy']:.3f}" if a in row else "-" for a in ("shape", "colour", "texture", "background")]
        print(f"{key:24s} {cells[0]:>8s} {cells[1]:>8s} {cells[2]:>8s} {cells[3]:>10s}")
    if args.out:
        write_text_atomic(args.out, json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
