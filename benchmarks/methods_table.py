"""Issue 3's table: every unlearning method on the embedded world, against the base model.

For each concept and method: unlearn from the shipped base model, evaluate (forget rate with
its 95% interval, retain alignment, FID), and check the bar: forget rate at most a quarter of
the base model's, retain alignment down by at most 5 points, FID up by at most 25%.

    python benchmarks/methods_table.py [--concepts circle,striped] [--methods esd-u-1,uce,...] [--samples 128]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from unrelearn.assets import load_model
from unrelearn.evaluate import EvalConfig, evaluate
from unrelearn.io import write_json_atomic, write_text_atomic
from unrelearn.methods import unlearn

DEFAULT_METHODS = "esd-u-1,esd-u-3,esd-f-3,esd-x-1,sdd,uce,rece,salun,erasediff,ca"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:shapes")
    parser.add_argument("--concepts", default="circle,striped")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--option", action="append", default=[], help="METHOD:key=value override, repeatable")
    parser.add_argument("--out", type=Path, default=Path("docs/methods_table"))
    args = parser.parse_args()

    overrides: dict[str, dict] = {}
    for item in args.option:
        method, pair = item.split(":", 1)
        key, value = pair.split("=", 1)
        overrides.setdefault(method, {})[key] = json.loads(value)

    eval_config = EvalConfig(samples=args.samples, seed=args.seed)
    protocol = {"model": args.model, "eval": asdict(eval_config)}
    table = args.out.with_suffix(".json")
    for concept in args.concepts.split(","):
        base = _base_row_on_disk(table, concept, protocol)
        if base is None:
            metrics = evaluate(load_model(args.model), concept, eval_config, progress=False).metrics
            base = _row(concept, "base model", metrics, metrics, None) | protocol
            _save(args.out, [base])
        print(_format(base), flush=True)
        for method in args.methods.split(","):
            model = load_model(args.model)
            options = dict(overrides.get(method, {}))
            options.setdefault("seed", args.seed)
            record = unlearn(model, method, concept, overrides=options, progress=False)
            metrics = evaluate(model, concept, eval_config, progress=False).metrics
            row = _row(concept, method, metrics, base, record) | protocol
            _save(args.out, [row])  # after every row, so a stopped run keeps what it finished
            print(_format(row), flush=True)


def _base_row_on_disk(table: Path, concept: str, protocol: dict) -> dict | None:
    """The base model's row from an earlier invocation with the same model and evaluation protocol."""
    if not table.is_file():
        return None
    for row in json.loads(table.read_text()):
        if row["concept"] == concept and row["method"] == "base model" and all(row.get(k) == v for k, v in protocol.items()):
            return row
    return None


def _save(out: Path, rows: list[dict]) -> None:
    rows = _merge_with_disk(out.with_suffix(".json"), rows)
    write_json_atomic(out.with_suffix(".json"), rows)
    header = "| concept | method | forget rate [95% CI] | retain alignment | FID | wall s | peak MB | meets bar |\n|---|---|---|---|---|---|---|---|\n"
    write_text_atomic(out.with_suffix(".md"), header + "\n".join(_format(r) for r in rows) + "\n")


def _merge_with_disk(path: Path, rows: list[dict]) -> list[dict]:
    """Rows of earlier invocations for other (concept, method) pairs are kept, so the table can be built in parts."""
    if not path.is_file():
        return rows
    fresh = {(r["concept"], r["method"]) for r in rows}
    kept = [r for r in json.loads(path.read_text()) if (r["concept"], r["method"]) not in fresh]
    return sorted(kept + rows, key=lambda r: (r["concept"], r["method"] != "base model"))


def _row(concept, method, metrics, base, record) -> dict:
    meets = (
        metrics["forget_rate"] <= base["forget_rate"] / 4
        and metrics["retain_alignment"] >= base["retain_alignment"] - 0.05
        and metrics["fid"] <= 1.25 * base["fid"]
    )
    return {
        "concept": concept,
        "method": method,
        "forget_rate": metrics["forget_rate"],
        "forget_rate_ci": metrics["forget_rate_ci"],
        "retain_alignment": metrics["retain_alignment"],
        "fid": metrics["fid"],
        "wall_seconds": record["wall_seconds"] if record else None,
        "peak_memory_mb": record["peak_memory_bytes"] / 2**20 if record else None,
        "meets_bar": meets if record else None,
        "config": record["config"] if record else None,
        "final_losses": record.get("final_losses") if record else None,
    }


def _format(r: dict) -> str:
    lo, hi = r["forget_rate_ci"]
    wall = f"{r['wall_seconds']:.0f}" if r["wall_seconds"] is not None else "-"
    peak = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "-"
    meets = {None: "-", True: "yes", False: "no"}[r["meets_bar"]]
    return (f"| {r['concept']} | {r['method']} | {r['forget_rate']:.3f} [{lo:.3f}, {hi:.3f}] | "
            f"{r['retain_alignment']:.3f} | {r['fid']:.2f} | {wall} | {peak} | {meets} |")  # fmt: skip


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
