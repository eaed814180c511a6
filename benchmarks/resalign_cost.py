"""Cost of ResAlign on the embedded world: seconds per outer step and peak memory of
``resalign:esd-u-1`` and ``resalign`` against ``esd-u-1``, by J (configurations per step), K
(Richardson iterations) and full or LoRA simulated fine-tuning, each in its own process, side
by side in one invocation (timing code shared with ``meta_cost.py``). The whole-run ratio uses
each method's embedded number of steps.

    python benchmarks/resalign_cost.py [--steps 5] [--out docs/defences/resalign_cost]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

BASE = ("esd-u-1", {})
CONFIGS = [BASE] + [
    ("resalign:esd-u-1", {"configs_per_step": j, "solve_iterations": k, "ft_modes": [mode]})
    for j in (1, 3)
    for k in (0, 5)
    for mode in ("full", "lora")
] + [("resalign", {})]


def embedded_steps(method: str) -> int:
    from unrelearn.methods.base import build_config, resolve_method

    cls, variant = resolve_method(method)
    return build_config(cls, "shapes", variant).steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("docs/defences/resalign_cost"))
    args = parser.parse_args()

    from unrelearn.io import library_versions, write_json_atomic, write_text_atomic

    timer = Path(__file__).with_name("meta_cost.py")
    rows = []
    for method, options in CONFIGS:
        command = [sys.executable, str(timer), "--one", json.dumps([method, options]), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]) | {"run_steps": embedded_steps(method)})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    base_run = base["seconds_per_step"] * base["run_steps"]
    lines = ["| method | J | K | simulated fine-tuning | s / step (median, min-max) | x esd-u-1 step | steps | x esd-u-1 run | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        o = row["options"]
        run = row["seconds_per_step"] * row["run_steps"]
        lines.append(
            f"| {row['method']} | {o.get('configs_per_step', '')} | {o.get('solve_iterations', '')} "
            f"| {','.join(o.get('ft_modes', []))} "
            f"| {row['seconds_per_step']:.3f} ({row['seconds_min']:.3f}-{row['seconds_max']:.3f}) "
            f"| {row['seconds_per_step'] / base['seconds_per_step']:.2f} | {row['run_steps']} | {run / base_run:.2f} "
            f"| {row['peak_rss_bytes'] / 2**20:.0f} |"
        )
    command = "python benchmarks/resalign_cost.py " + " ".join(sys.argv[1:])
    write_json_atomic(args.out.with_suffix(".json"), {"rows": rows, "command": command, "versions": library_versions()})
    write_text_atomic(args.out.with_suffix(".md"), f"`{command}` (circle, embedded defaults)\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
