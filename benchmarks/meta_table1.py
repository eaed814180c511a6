"""Tuning runs of the defences under the Meta-Unlearning paper's Table 1 protocol: each method
plain and defended with settings of one's own (``--defence meta`` or ``resalign``, ``--meta-option``,
``--meta-tag`` to name the setting; ``--methods resalign --no-defended`` for ResAlign's own row), then
malicious (HRM-s, HRM-m) and benign (CLEAN) fine-tuning, forget rate with its 95% interval at
each evaluated step, retain alignment and FID before fine-tuning. Every setting tried is kept in
``docs/defences/meta_tuning_cells.{json,md}`` (the record ``meta_tuning.md`` and
``resalign_tuning.md`` discuss). The table itself is drawn from the benchmark's store:
``unrelearn bench --preset table1 --out DIR`` then ``unrelearn table table1 DIR --out STEM``.

Every model and attack is cached under ``--work`` (attacks resume from their checkpoints), and
every finished cell is merged into ``OUT.json`` at once, so the table can be built in parts and
re-run to fill in the rest.

    python benchmarks/meta_table1.py [--concepts circle] [--methods esd-u-1,uce] [--attacks hrm-s,hrm-m,clean]
        [--lrs 1e-5] [--eval-at 0,50,100,200,300] [--samples 128] [--meta-option gamma2=0.05 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unrelearn.assets import load_model
from unrelearn.attacks import AttackConfig, attack, parse_eval_at
from unrelearn.attacks.finetune import EMBEDDED_DEFAULTS
from unrelearn.evaluate import EvalConfig, evaluate
from unrelearn.io import command_legend, library_versions, merge_json_rows, write_text_atomic
from unrelearn.methods import unlearn
from unrelearn.model import DiffusionModel


def _options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:shapes")
    parser.add_argument("--concepts", default="circle")
    parser.add_argument("--methods", default="esd-u-1")
    parser.add_argument("--attacks", default="hrm-s,hrm-m,clean")
    parser.add_argument("--lrs", default="1e-5")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-at", default="0,50,100,200,300")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--defence", default="meta", choices=["meta", "resalign"], help="the defence of the defended rows")
    parser.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True, help="the undefended rows")
    parser.add_argument("--defended", action=argparse.BooleanOptionalAction, default=True, help="the defended rows")
    parser.add_argument("--method-option", action="append", default=[], help="key=value for every run, plain or defended")
    parser.add_argument("--meta-option", action="append", default=[], help="key=value for every defended run")
    parser.add_argument("--meta-tag", default="", help="names this defence setting (folders, rows), to compare several")
    parser.add_argument("--work", type=Path, default=Path("runs/meta_table1"))
    parser.add_argument("--out", type=Path, default=Path("docs/defences/meta_tuning_cells"))
    args = parser.parse_args()

    command = "python benchmarks/meta_table1.py " + " ".join(sys.argv[1:])
    eval_config = EvalConfig(samples=args.samples, seed=args.seed)
    eval_at = parse_eval_at(args.eval_at, args.steps)
    meta_options = _options(args.meta_option)
    store = args.out.with_suffix(".json")
    table = json.loads(store.read_text()) if store.is_file() else {"cells": [], "models": []}

    for concept in args.concepts.split(","):
        for method in args.methods.split(","):
            defended = args.defence + (f" {args.meta_tag}" if args.meta_tag else "")
            for variant in (["unlearn"] if args.plain else []) + ([defended] if args.defended else []):
                meta = variant != "unlearn"
                name = f"{args.defence}:{method}" if meta else method
                options = {"seed": args.seed} | _options(args.method_option) | (meta_options if meta else {})
                folder = args.work / concept / (name.replace(":", "-") + (f"-{args.meta_tag}" if meta and args.meta_tag else ""))
                if not (folder / "run.json").is_file():
                    unlearn(load_model(args.model), name, concept, out=folder, overrides=options)
                record = json.loads((folder / "run.json").read_text())
                if not any((m["concept"], m["method"], m["variant"]) == (concept, method, variant) for m in table["models"]):
                    before = evaluate(DiffusionModel.load(folder), concept, eval_config, progress=False).metrics
                    table["models"].append({
                        "concept": concept, "method": method, "variant": variant, "config": record["config"], "command": command,
                        "final_losses": record.get("final_losses"), "wall_seconds": record["wall_seconds"],
                        **{k: before[k] for k in ("forget_rate", "forget_rate_ci", "retain_alignment",
                                                  "retain_alignment_ci", "fid")},
                    })  # fmt: skip
                    table = _save(args.out, table)
                for data in args.attacks.split(","):
                    for lr in (float(x) for x in args.lrs.split(",")):
                        key = {"concept": concept, "method": method, "variant": variant, "attack": data, "lr": lr}
                        if any(all(c[k] == v for k, v in key.items()) for c in table["cells"]):
                            continue
                        config = AttackConfig(data=data, steps=args.steps, lr=lr, seed=args.seed,
                                              batch_size=EMBEDDED_DEFAULTS["batch_size"])  # fmt: skip
                        curve = attack(DiffusionModel.load(folder), concept, config, folder.with_name(f"{folder.name}-{data}-{lr:g}"),
                                       eval_at, eval_config, threshold=0.5)  # fmt: skip
                        for p in curve["points"]:
                            table["cells"].append(key | {"command": command} | {
                                k: p[k] for k in ("step", "forget_rate", "forget_rate_ci", "retain_alignment")})  # fmt: skip
                        table = _save(args.out, table)


def _save(out: Path, table: dict) -> dict:
    """Merge this process's rows into OUT.json (other processes may be filling it too) and
    rewrite OUT.md from the merged table."""
    table = merge_json_rows(
        out.with_suffix(".json"), table,
        {"models": ("concept", "method", "variant"), "cells": ("concept", "method", "variant", "attack", "lr", "step")},
        {"versions": library_versions()},
    )  # fmt: skip
    legend, marks = command_legend(table["models"] + table["cells"])
    lines = ["| concept | method | variant | before: forget / alignment / FID | attack | lr | forget rate by step | made by |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for m in table["models"]:
        lo, hi = m["forget_rate_ci"]
        before = f"{m['forget_rate']:.3f} [{lo:.3f}, {hi:.3f}] / {m['retain_alignment']:.3f} / {m['fid']:.0f}"
        groups: dict[tuple, list] = {}
        for c in table["cells"]:
            if (c["concept"], c["method"], c["variant"]) == (m["concept"], m["method"], m["variant"]):
                groups.setdefault((c["attack"], c["lr"]), []).append(c)
        if not groups:
            lines.append(f"| {m['concept']} | {m['method']} | {m['variant']} | {before} | | | | {marks[m.get('command')]} |")
        for (data, lr), cells in groups.items():
            steps = "; ".join(f"{c['step']}: {c['forget_rate']:.3f} [{c['forget_rate_ci'][0]:.3f}, {c['forget_rate_ci'][1]:.3f}]"
                              for c in sorted(cells, key=lambda c: c["step"]))  # fmt: skip
            made = ", ".join(dict.fromkeys(marks[c.get("command")] for c in cells))
            lines.append(f"| {m['concept']} | {m['method']} | {m['variant']} | {before} | {data} | {lr:g} | {steps} | {made} |")
    write_text_atomic(out.with_suffix(".md"), "\n".join(legend + lines) + "\n")
    return table


if __name__ == "__main__":
    main()
