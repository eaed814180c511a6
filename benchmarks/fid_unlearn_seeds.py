"""How much of a method's FID is the method, and how much the unlearning run's seed?

Reads `benchmarks/fid_noise.py` outputs of models unlearned with different `--seed`s and prints,
per group, each run's FID (mean over the evaluation seeds) and the mean over runs with its 95%
Student-t interval, so two methods are compared over unlearning runs rather than on one run each.
``--metric forget_rate`` reads ``unrelearn evaluate --json`` outputs instead (the AR of each run).
``--compare A,B`` adds the difference of means B - A with its 95% Welch interval and p-value;
``--pool 'A1,B1;A2,B2;...'`` the mean of several such differences (one per class: a stratified
comparison over classes) with its Welch-Satterthwaite interval.

    python benchmarks/fid_unlearn_seeds.py --group 'salun-250=DIR/seven-salun-250-s*.json' \\
        --group 'dimum-250=DIR/seven-dimum-250-s*.json' [--compare salun-250,dimum-250] [--samples 512]
        [--out docs/dimra/quality/unlearn_seeds]
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from pathlib import Path

from scipy import stats

from unrelearn.io import write_json_atomic, write_text_atomic


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """The Student-t interval of the mean of ``values`` (needs two or more); None for identical
    values (every run at AR 0): no between-run spread to build it on, as for a comparison of two
    such groups (scipy's scale 0 would give NaN, and the point itself would claim certainty)."""
    if _no_spread([values]):
        return None
    low, high = stats.t.interval(confidence, len(values) - 1, loc=statistics.mean(values), scale=stats.sem(values))
    return float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", action="append", required=True, help="LABEL=GLOB of fid_noise.py JSON files")
    parser.add_argument("--samples", default="512", help="the sample count to read from each file")
    parser.add_argument("--metric", default="fid", choices=["fid", "kid", "precision", "forget_rate"],
                        help="forget_rate reads `unrelearn evaluate --json` files instead of fid_noise.py's")
    parser.add_argument("--compare", action="append", default=[], help="A,B: the difference B - A of two groups")
    parser.add_argument("--pool", action="append", default=[],
                        help="'A1,B1;A2,B2;...': the mean over the pairs of B - A (per-class differences pooled)")
    parser.add_argument("--out", type=Path, default=None, help="writes OUT.json and OUT.md")
    args = parser.parse_args()

    rows, lines = [], []
    for group in args.group:
        label, _, pattern = group.partition("=")
        files = sorted(glob.glob(pattern))
        if len(files) < 2:
            sys.exit(f"error: --group {label}: {pattern!r} matches {len(files)} file(s); an interval needs 2 or more")
        runs = []
        for file in files:
            record = json.loads(Path(file).read_text())
            if args.metric == "forget_rate":  # `unrelearn evaluate --json` output: one value per run
                runs.append({"file": file, "model": record["model"], "value": record["forget_rate"]})
                continue
            if args.samples not in record["by_samples"]:
                sys.exit(f"error: {file} has no {args.samples}-sample entry; pass --samples {','.join(record['by_samples'])}")
            runs.append({"file": file, "model": record["model"], "value": statistics.mean(record["by_samples"][args.samples][args.metric])})
        values = [r["value"] for r in runs]
        interval = t_interval(values)
        rows.append({"group": label, "metric": args.metric, "samples": int(args.samples), "runs": runs,
                     "mean": statistics.mean(values), "ci95": list(interval) if interval else None, "min": min(values),
                     "max": max(values)})  # fmt: skip
        per_run = ", ".join(f"{v:.4g}" for v in values)
        shown = f"[{interval[0]:.4g}, {interval[1]:.4g}]" if interval else "(no interval: every run at one value)"
        lines.append(f"| {label} | {len(values)} | {per_run} | {statistics.mean(values):.4g} {shown} |")
    value_column = "forget rate per run" if args.metric == "forget_rate" else f"{args.metric.upper()} per run (mean of its evaluation seeds)"
    table = "\n".join([f"| group | runs | {value_column} | mean over runs [95% t-interval] |",
                       "|---|---|---|---|", *lines])
    comparisons = [_compare(rows, spec) for spec in args.compare] + [_pool(rows, spec) for spec in args.pool]
    if comparisons:
        table += "\n\n| B - A | difference of means [95% Welch interval] | Welch p |\n|---|---|---|\n" + "\n".join(
            f"| {c['b']} - {c['a']} | {c['difference']:.4g} [{c['ci95'][0]:.4g}, {c['ci95'][1]:.4g}] | {c['p']:.2g} |"
            if c["ci95"] else f"| {c['b']} - {c['a']} | {c['difference']:.4g} (no interval: every run of each group at one value) | n/a |"
            for c in comparisons
        )
    print(table)
    if args.out:
        command = f"python benchmarks/fid_unlearn_seeds.py --metric {args.metric} --samples {args.samples} "
        command += " ".join(f"--group '{g}'" for g in args.group)
        command += "".join(f" --compare '{c}'" for c in args.compare) + "".join(f" --pool '{p}'" for p in args.pool)
        write_json_atomic(args.out.with_suffix(".json"), {"command": command, "rows": rows, "comparisons": comparisons})
        write_text_atomic(args.out.with_suffix(".md"), f"`{command}`\n\n{table}\n")


def _compare(rows: list[dict], spec: str) -> dict:
    """Mean of group B minus mean of group A, with Welch's interval (unequal variances)."""
    labels = spec.split(",")
    by_label = {r["group"]: [run["value"] for run in r["runs"]] for r in rows}
    if len(labels) != 2 or any(label not in by_label for label in labels):
        sys.exit(f"error: --compare {spec!r}: give two group labels A,B from --group ({', '.join(by_label)})")
    a, b = labels
    difference = statistics.mean(by_label[b]) - statistics.mean(by_label[a])
    if _no_spread([by_label[a], by_label[b]]):
        return {"a": a, "b": b, "difference": difference, "ci95": None, "p": None}
    result = stats.ttest_ind(by_label[b], by_label[a], equal_var=False)
    low, high = result.confidence_interval(0.95)
    return {"a": a, "b": b, "difference": difference, "ci95": [float(low), float(high)], "p": float(result.pvalue)}


def _no_spread(groups: list[list[float]]) -> bool:
    """Every run of every group at one value (four runs of AR 1/256, say): there is no
    between-run variance to test against, and Welch's test would call any difference certain
    (scipy: p = 0, a zero-width interval) although each run's own sampling error is not zero."""
    return all(len(set(runs)) == 1 for runs in groups)


def _pool(rows: list[dict], spec: str) -> dict:
    """The mean over k pairs of (mean of B_i - mean of A_i), each group's runs independent: variance
    sum(s_A^2 / n_A + s_B^2 / n_B) / k^2, degrees of freedom by Welch-Satterthwaite (with one pair,
    Welch's test itself)."""
    by_label = {r["group"]: [run["value"] for run in r["runs"]] for r in rows}
    pairs = [pair.split(",") for pair in spec.split(";")]
    if any(len(pair) != 2 or any(label not in by_label for label in pair) for pair in pairs):
        sys.exit(f"error: --pool {spec!r}: give pairs A,B of group labels separated by ';' ({', '.join(by_label)})")
    k = len(pairs)
    differences = [statistics.mean(by_label[b]) - statistics.mean(by_label[a]) for a, b in pairs]
    groups = [by_label[g] for pair in pairs for g in pair]
    names = {"a": " + ".join(a for a, _ in pairs) + " (mean)", "b": " + ".join(b for _, b in pairs) + " (mean)"}
    if _no_spread(groups):
        return names | {"difference": statistics.mean(differences), "ci95": None, "p": None, "df": None}
    parts = [statistics.variance(runs) / len(runs) / k**2 for runs in groups]
    variance = sum(parts)
    df = variance**2 / sum(part**2 / (len(runs) - 1) for part, runs in zip(parts, groups))
    difference = statistics.mean(differences)
    half = float(stats.t.ppf(0.975, df)) * variance**0.5
    p = float(2 * stats.t.sf(abs(difference) / variance**0.5, df))
    return names | {"difference": difference, "ci95": [difference - half, difference + half], "p": p, "df": df}


if __name__ == "__main__":
    main()
