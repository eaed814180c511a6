"""ResAlign's own protocol on the embedded world: forget rate before and after fine-tuning
(benign ``clean`` and ``dimra-aux``, malicious ``hrm-m``), full and LoRA, for ESD-u-1, ResAlign,
its ablations and the exact-unlearning oracle, with 95% intervals and retain alignment.

Models are built under ``--work`` with the same names as ``meta_table1.py`` (so the two share
their ESD-u-1 and ResAlign models); every finished cell is merged into ``OUT.json`` at once and
skipped when run again.

    python benchmarks/resalign_protocol.py [--concepts circle] [--models esd-u-1,resalign,oracle]
        [--attacks clean,dimra-aux,hrm-m] [--modes full,lora] [--steps 200] [--eval-at 0,100,200]

Ablations (``--models``), the paper's Table: ``resalign-no-hypergradient`` (beta 0),
``resalign-fixed`` (one configuration: Adam, lr 1e-4, 10 steps, full, harmful data),
``resalign-data`` (that configuration over harmful, benign and mixed data); ``resalign`` varies
everything.

The same protocol runs through the benchmark's store (circle and striped, shared models,
shards, the report): ``unrelearn bench --preset resalign --out DIR``, then ``unrelearn table
resalign DIR --out docs/defences/resalign``; this script made the cells computed before.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unrelearn.assets import load_model
from unrelearn.attacks import AttackConfig, attack, parse_eval_at
from unrelearn.attacks.finetune import EMBEDDED_DEFAULTS
from unrelearn.evaluate import EvalConfig
from unrelearn.io import command_legend, library_versions, merge_json_rows, write_text_atomic
from unrelearn.methods import unlearn

FIXED = {"ft_lrs": [1e-4], "ft_steps": [10], "ft_optimizers": ["adam"], "ft_modes": ["full"], "ft_data": ["hrm-m"]}
ABLATIONS: dict[str, dict] = {
    "resalign-no-hypergradient": {"beta": 0.0},
    "resalign-fixed": FIXED,
    "resalign-data": FIXED | {"ft_data": ["hrm-m", "clean", "poison:0.5"]},
}


def model_spec(args: argparse.Namespace, concept: str, name: str) -> str:
    """The model ``name`` unlearned from ``--model`` (built once), or the shipped oracle."""
    if name == "oracle":
        return f"builtin:shapes-oracle-{concept}"
    method, options = (("resalign", ABLATIONS[name]) if name in ABLATIONS else (name, {}))
    folder = args.work / concept / name.replace(":", "-")
    if not (folder / "run.json").is_file():
        unlearn(load_model(args.model), method, concept, out=folder, overrides={"seed": args.seed} | options)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:shapes")
    parser.add_argument("--concepts", default="circle")
    parser.add_argument("--models", default="esd-u-1,resalign,oracle")
    parser.add_argument("--attacks", default="clean,dimra-aux,hrm-m")
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--lr", type=float, default=1e-5, help="full fine-tuning (the paper's relearning evaluation)")
    parser.add_argument("--lora-lr", type=float, default=1e-4, help="LoRA fine-tuning (adapters start at zero)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-at", default="0,100,200")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("runs/meta_table1"))
    parser.add_argument("--out", type=Path, default=Path("docs/defences/resalign"))
    args = parser.parse_args()

    command = "python benchmarks/resalign_protocol.py " + " ".join(sys.argv[1:])
    eval_config = EvalConfig(samples=args.samples, seed=args.seed)
    eval_at = parse_eval_at(args.eval_at, args.steps)
    store = args.out.with_suffix(".json")
    table = json.loads(store.read_text()) if store.is_file() else {"cells": []}
    for concept in args.concepts.split(","):
        for name in args.models.split(","):
            source = model_spec(args, concept, name)
            for mode in args.modes.split(","):
                lr = args.lr if mode == "full" else args.lora_lr
                for data in args.attacks.split(","):
                    key = {"concept": concept, "model": name, "attack": data, "mode": mode, "lr": lr}
                    if any(all(c.get(k) == v for k, v in key.items()) for c in table["cells"]):
                        continue
                    config = AttackConfig(data=data, steps=args.steps, lr=lr, mode=mode, seed=args.seed,
                                          batch_size=EMBEDDED_DEFAULTS["batch_size"])  # fmt: skip
                    out = args.work / concept / f"rp-{name.replace(':', '-')}-{data}-{mode}-{lr:g}"
                    curve = attack(load_model(source), concept, config, out, eval_at, eval_config, threshold=0.5)
                    for p in curve["points"]:
                        table["cells"].append(key | {"command": command} | {
                            k: p[k] for k in ("step", "forget_rate", "forget_rate_ci", "retain_alignment")})  # fmt: skip
                    table = _save(args.out, table)


def _save(out: Path, table: dict) -> dict:
    table = merge_json_rows(
        out.with_suffix(".json"), table, {"cells": ("concept", "model", "attack", "mode", "lr", "step")},
        {"versions": library_versions()},
    )  # fmt: skip
    legend, marks = command_legend(table["cells"])
    groups: dict[tuple, list] = {}
    for c in table["cells"]:
        groups.setdefault((c["concept"], c["model"], c["attack"], c["mode"], c["lr"]), []).append(c)
    lines = ["| concept | model | attack | mode | lr | forget rate by step [95% CI] | retain alignment by step | made by |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (concept, model, data, mode, lr), cells in groups.items():
        cells = sorted(cells, key=lambda c: c["step"])
        rates = "; ".join(f"{c['step']}: {c['forget_rate']:.3f} [{c['forget_rate_ci'][0]:.3f}, {c['forget_rate_ci'][1]:.3f}]" for c in cells)
        alignment = "; ".join(f"{c['step']}: {c['retain_alignment']:.3f}" for c in cells)
        made = ", ".join(dict.fromkeys(marks[c.get("command")] for c in cells))
        lines.append(f"| {concept} | {model} | {data} | {mode} | {lr:g} | {rates} | {alignment} | {made} |")
    write_text_atomic(out.with_suffix(".md"), "\n".join(legend + lines) + "\n")
    return table


if __name__ == "__main__":
    main()
