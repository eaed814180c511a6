"""Issue 4's experiment: do unlearned models relearn under fine-tuning, compared with the oracle?

Attacks every model (the base model, ESD-unlearned models, the exact-unlearning oracle trained
without the concept) with every attack data set, evaluating at the same steps, and writes the
curves (one PNG per attack) and a table of forget rates and steps-to-relearn. Finished attacks
(a ``curve.json`` under ``--work``) are reused, so the benchmark can be run in parts (for
example before the oracle has finished training) and rerun to fill in the rest.

    python benchmarks/durability.py --oracle runs/oracle-circle [--concept circle] \
        [--methods esd-u-1] [--attacks hrm-m,dimra-aux] [--steps 300] [--eval-at 0,50,100,200,300]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from unrelearn.assets import load_model
from unrelearn.attacks import AttackConfig, attack, parse_eval_at, plot_curves
from unrelearn.attacks.finetune import EMBEDDED_DEFAULTS
from unrelearn.evaluate import EvalConfig, evaluate
from unrelearn.io import write_json_atomic, write_text_atomic
from unrelearn.methods import unlearn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:shapes")
    parser.add_argument("--oracle", default=None, help="model folder trained with --exclude CONCEPT")
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--methods", default="esd-u-1")
    parser.add_argument("--attacks", default="hrm-m,dimra-aux")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-at", default="0,50,100,200,300")
    parser.add_argument("--lr", type=float, default=EMBEDDED_DEFAULTS["lr"])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("runs/durability"))
    parser.add_argument("--out", type=Path, default=Path("docs/durability"))
    args = parser.parse_args()

    eval_config = EvalConfig(samples=args.samples, seed=args.seed)
    eval_at = parse_eval_at(args.eval_at, args.steps)
    reference = evaluate(load_model(args.model), args.concept, eval_config, progress=False).metrics["forget_rate"]
    threshold = 0.5 * reference

    contenders: dict[str, str] = {"base": args.model}
    for method in args.methods.split(","):
        folder = args.work / f"{method}-{args.concept}"
        if not (folder / "model_index.json").is_file():
            unlearn(load_model(args.model), method, args.concept, out=folder, overrides={"seed": args.seed}, progress=False)
        contenders[method] = str(folder)
    if args.oracle:
        contenders["oracle"] = args.oracle

    table = {
        "concept": args.concept, "reference_forget_rate": reference, "threshold": threshold,
        "attack": {"steps": args.steps, "lr": args.lr, "batch_size": EMBEDDED_DEFAULTS["batch_size"], "eval_samples": args.samples},
        "runs": {},
    }  # fmt: skip
    table_path = args.out / f"{args.concept}.json"
    table["runs"] = _rows_on_disk(table_path, table)
    args.out.mkdir(parents=True, exist_ok=True)
    for data in args.attacks.split(","):
        for name, path in contenders.items():
            folder = args.work / f"attack-{name}-{data}"
            config = AttackConfig(data=data, steps=args.steps, lr=args.lr, batch_size=EMBEDDED_DEFAULTS["batch_size"], seed=args.seed)
            if (folder / "curve.json").is_file():
                _check_same_settings(folder, config, eval_config, eval_at)
                summary = json.loads((folder / "curve.json").read_text())
            else:
                summary = attack(load_model(path), args.concept, config, folder, eval_at, eval_config, threshold=threshold,
                                 progress=False)  # fmt: skip
            table["runs"][f"{name}/{data}"] = summary
            curves = {row.split("/")[0]: run["points"] for row, run in table["runs"].items() if row.endswith(f"/{data}")}
            rates = " ".join(f"{p['step']}:{p['forget_rate']:.2f}" for p in summary["points"])
            print(f"{name:10s} {data:12s} steps-to-relearn={summary['steps_to_relearn']}  {rates}", flush=True)
            plot_curves(curves, args.out / f"{args.concept}-{data}.png", threshold, title=f"{args.concept}: attack with {data}")
            write_json_atomic(table_path, table)
            _write_markdown(table, table_path.with_suffix(".md"))


def _write_markdown(table: dict, path: Path) -> None:
    """The forget-rate table by attack step, with the command that regenerates it."""
    steps = sorted({p["step"] for run in table["runs"].values() for p in run["points"]})
    attack = table["attack"]
    lines = [
        f"# Durability: {table['concept']}",
        "",
        (
            f"`python benchmarks/durability.py --concept {table['concept']} --oracle ORACLE --lr {attack['lr']:g}` "
            f"(full fine-tuning, Adam, batch {attack['batch_size']}, {attack['eval_samples']} samples per evaluation). "
            f"Forget rate [95% CI] by attack step; relearned at {table['threshold']:.2f} (half the base model's rate)."
        ),
        "",
        "| model / attack | " + " | ".join(str(s) for s in steps) + " | steps-to-relearn |",
        "|---|" + "---|" * (len(steps) + 1),
    ]
    for row, run in table["runs"].items():
        by_step = {p["step"]: p for p in run["points"]}
        cells = []
        for step in steps:
            point = by_step.get(step)
            cells.append(f"{point['forget_rate']:.2f} [{point['forget_rate_ci'][0]:.2f}, {point['forget_rate_ci'][1]:.2f}]" if point else "-")
        relearn = run["steps_to_relearn"]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {'never' if relearn is None else relearn} |")
    write_text_atomic(path, "\n".join(lines) + "\n")


def _rows_on_disk(table_path: Path, table: dict) -> dict:
    """Rows from an earlier invocation with the same attack settings, so running one attack adds to the table."""
    if not table_path.is_file():
        return {}
    earlier = json.loads(table_path.read_text())
    same = all(earlier.get(key) == table[key] for key in ("concept", "reference_forget_rate", "attack"))
    return earlier.get("runs", {}) if same else {}


def _check_same_settings(folder: Path, config: AttackConfig, eval_config: EvalConfig, eval_at: list[int]) -> None:
    """A finished attack is reused only if it ran with the settings asked for now."""
    record = json.loads((folder / "run.json").read_text())
    asked = {"config": asdict(config), "eval": asdict(eval_config), "eval_at": eval_at}
    if any(record[key] != value for key, value in asked.items()):
        raise SystemExit(f"{folder} holds an attack run with other settings; pass another --work or delete it")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
