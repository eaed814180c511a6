"""Would the worst-case search have found the full grid's worst case? A replay on finished cells.

Takes a benchmark folder whose cells all ran to their end, replays ``unrelearn bench --halving
ETA`` on their curves (each attack's points up to a rung stand for the attack paused there), and
prints per concept and contender: the settings, those the search runs to the end, the worst
forget rate it finds, the full grid's, and the share of attack steps it would have spent.
Nothing is trained: it measures the search's misses on curves that exist.

    python benchmarks/halving_replay.py DIR [--eta 3] [--out docs/bench/halving_replay.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unrelearn.bench.grid import Cell, Contender
from unrelearn.bench.search import Halving
from unrelearn.bench.store import ResultStore
from unrelearn.io import write_json_atomic


def replay(folder: Path, eta: int) -> list[dict]:
    store = ResultStore(folder / "results.sqlite")
    try:
        results = store.cells()
    finally:
        store.close()
    cells, curves = [], {}
    for result in results:
        spec = result.spec
        identity = spec["contender"]
        contender = Contender(spec["label"], identity["model"], identity["method"], identity["options"], spec.get("oracle", False))
        cell = Cell(result.concept, contender, spec["attack"], tuple(spec["eval_at"]), spec["evaluation"])
        cells.append(cell)
        curves[cell.key] = result.points
    search = Halving(cells, eta)
    partials = {(key, step["step"]): [p for p in points if p["step"] <= step["step"]] for key, points in curves.items() for step in points}
    finished: dict[str, list] = {}
    while True:
        work, states = search.plan(finished, partials)
        if not work:
            break
        finished |= {w.cell.key: curves[w.cell.key] for w in work if w.stop_at is None}
    (steps, _), (all_steps, _) = search.cost(states)
    rows = []
    for state in states:
        group = [c for c in cells if c.concept == state.concept and c.contender.label == state.contender]
        true_worst = max(max(p["forget_rate"] for p in curves[c.key] if p["step"] > 0) for c in group)
        found = max(max(p["forget_rate"] for p in curves[c.key] if p["step"] > 0) for c in group if c.key in finished)
        rows.append({"concept": state.concept, "contender": state.contender, "settings": state.candidates[0],
                     "run_to_end": state.candidates[-1], "rungs": state.rungs, "found_worst": found,
                     "grid_worst": true_worst, "missed_by": true_worst - found})  # fmt: skip
    return rows, steps / all_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a benchmark folder whose cells ran to their end")
    parser.add_argument("--eta", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    rows, spent = replay(args.folder, args.eta)
    print("| concept | contender | settings | run to the end | found worst | grid worst | missed by |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concept']} | {r['contender']} | {r['settings']} | {r['run_to_end']} | {r['found_worst']:.3f} | "
              f"{r['grid_worst']:.3f} | {r['missed_by']:.3f} |")  # fmt: skip
    missed = [r for r in rows if r["missed_by"] > 0]
    print(f"\neta {args.eta}: {len(missed)} of {len(rows)} groups missed the grid's worst case "
          f"(largest miss {max((r['missed_by'] for r in rows), default=0):.3f}); the search would have spent "
          f"{spent:.0%} of the grid's attack steps")  # fmt: skip
    if args.out:
        command = "python " + " ".join([sys.argv[0], *sys.argv[1:]])
        write_json_atomic(args.out, {"command": command, "eta": args.eta, "attack_steps_share": spent, "rows": rows})


if __name__ == "__main__":
    main()
