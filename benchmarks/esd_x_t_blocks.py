"""ESD's frozen-teacher x_t sampled one step at a time vs 20 steps in one batch, side by side.

Both runs unlearn the same concept from the shipped base model with the same seed; the script
prints the wall time of each and the largest weight difference (0 means the batching changed
nothing but the speed).

    python benchmarks/esd_x_t_blocks.py [--steps 60] [--concept circle]
"""

from __future__ import annotations

import argparse
import time

from unrelearn.assets import load_model
from unrelearn.methods import esd, unlearn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--concept", default="circle")
    args = parser.parse_args()
    weights, seconds = {}, {}
    for block in (1, esd.X_T_BLOCK):
        esd.X_T_BLOCK = block
        model = load_model("builtin:shapes")
        began = time.perf_counter()
        unlearn(model, "esd-u-1", args.concept, overrides={"steps": args.steps}, progress=False)
        seconds[block] = time.perf_counter() - began
        weights[block] = model.unet.state_dict()
        print(f"x_t block {block:>2}: {args.steps} steps in {seconds[block]:.1f} s", flush=True)
    one, many = sorted(weights)
    difference = max(float((weights[one][n] - weights[many][n]).abs().max()) for n in weights[one])
    print(f"speed-up {seconds[one] / seconds[many]:.2f}x; largest weight difference {difference:g}")


if __name__ == "__main__":
    main()
