"""Cost of Meta-Unlearning on the embedded world: seconds per outer step and peak memory of
``meta:esd-u-1`` against ``esd-u-1``, exact and first-order, M in {1, 3, 5}, SGD and Adam
inner steps. Every configuration runs in its own process (peak RSS is per process) on the
same machine in one invocation, so the ratios are side by side.

    python benchmarks/meta_cost.py [--steps 10] [--out docs/defences/meta_cost]
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [("esd-u-1", {})] + [
    ("meta:esd-u-1", {"meta_grad": mode, "inner_steps": m, "inner_optimizer": opt})
    for mode in ("first-order", "exact")
    for m in (1, 3, 5)
    for opt in ("sgd", "adam")
]


def one(method: str, options: dict, steps: int, warmup: int) -> dict:
    """Time ``warmup + steps`` outer steps in this process; report the median step after warm-up."""
    from unrelearn.assets import load_model
    from unrelearn.methods.base import build_config, resolve_method
    from unrelearn.training import Trainer
    from unrelearn.worlds import get_world

    model = load_model("builtin:shapes")
    world = get_world("shapes")
    cls, variant = resolve_method(method)
    config = build_config(cls, "shapes", variant | options | {"steps": warmup + steps})
    instance = cls(model, world.concept_sets("circle"), config, world)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stamps = [time.perf_counter()]
    trainer = Trainer(instance.parameters(), instance.loss, instance.train_config(), progress=False,
                      on_step=lambda step: stamps.append(time.perf_counter()))  # fmt: skip
    instance.bind(trainer)
    model.unet.train()
    trainer.run()
    durations = [b - a for a, b in itertools.pairwise(stamps)][warmup:]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "options": options, "seconds_per_step": statistics.median(durations),
            "seconds_min": min(durations), "seconds_max": max(durations), "steps_timed": len(durations),
            "peak_rss_bytes": peak, "rss_growth_bytes": peak - baseline}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/defences/meta_cost"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, options = json.loads(args.one)
        print(json.dumps(one(method, options, args.steps, args.warmup)))
        return

    from unrelearn.io import library_versions, write_json_atomic, write_text_atomic

    rows = []
    for method, options in CONFIGS:
        command = [sys.executable, __file__, "--one", json.dumps([method, options]), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    lines = ["| method | meta_grad | M | inner optimizer | s / step (median, min-max) | x esd-u-1 | peak RSS (MiB) | RSS growth (MiB) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        o = row["options"]
        lines.append(
            f"| {row['method']} | {o.get('meta_grad', '')} | {o.get('inner_steps', '')} | {o.get('inner_optimizer', '')} "
            f"| {row['seconds_per_step']:.3f} ({row['seconds_min']:.3f}-{row['seconds_max']:.3f}) "
            f"| {row['seconds_per_step'] / base['seconds_per_step']:.2f} | {row['peak_rss_bytes'] / 2**20:.0f} "
            f"| {row['rss_growth_bytes'] / 2**20:.0f} |"
        )
    command = "python benchmarks/meta_cost.py " + " ".join(sys.argv[1:])
    write_json_atomic(args.out.with_suffix(".json"), {"rows": rows, "command": command, "versions": library_versions()})
    write_text_atomic(args.out.with_suffix(".md"), f"`{command}` (circle, embedded defaults)\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
