"""How much does Scissorhands' trimming alone damage a model, before any repair step?

For each re-initialisation scope and sparsity (share of weights kept), trims the model as
`unrelearn unlearn -m shs -o reinit=R -o sparsity=S` does (SNIP connection sensitivity on the
forget set, the most sensitive re-initialised where the scope allows) and prints the
retain diffusion loss before and after on one fixed batch, how many weights were trimmed, how
many of them are normalisation scales, and the tensors that lost most.

    python benchmarks/shs_trim_damage.py [--model builtin:shapes] [--concept striped] [--sparsities 0.99,0.999,0.9999] [--reinit official,all]
"""

from __future__ import annotations

import argparse

import torch

from unrelearn.assets import load_model
from unrelearn.methods.base import build_config, resolve_method
from unrelearn.worlds import get_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:shapes")
    parser.add_argument("--concept", default="striped")
    parser.add_argument("--sparsities", default="0.99,0.999,0.9999")
    parser.add_argument("--reinit", default="official,all")
    args = parser.parse_args()

    cls, variant = resolve_method("shs")
    settings = [(r, float(s)) for r in args.reinit.split(",") for s in args.sparsities.split(",")]
    for reinit, sparsity in settings:
        model = load_model(args.model)
        world = get_world(model.world)
        config = build_config(cls, world.name, variant | {"sparsity": sparsity, "reinit": reinit})
        method = cls(model, world.concept_sets(args.concept), config, world)
        with torch.no_grad():
            before = float(method.retain_loss(torch.Generator().manual_seed(1)))
        counts = method.trim()
        with torch.no_grad():
            after = float(method.retain_loss(torch.Generator().manual_seed(1)))
        norm_scales = sum(n for name, n in counts.items() if "norm" in name and name.endswith("weight"))
        top = ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])[:3])
        print(f"reinit {reinit}, sparsity {sparsity}: {sum(counts.values())} weights trimmed ({norm_scales} norm scales); "
              f"retain loss {before:.4f} -> {after:.4f}; most trimmed: {top}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
