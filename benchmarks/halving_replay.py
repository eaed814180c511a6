"""Would the worst-case search have found the full grid's worst case? A replay on finished cells.

Takes a benchmark folder whose cells all ran to their end (``--preset``: that preset's cells
only), replays ``unrelearn bench --halving ETA`` on their curves (each attack's points up to a
rung stand for the attack paused there) with the search's settled rule read from the store as
the runner reads it (the original model's forget rate; ``--no-settle``: the interval rule alone,
the search before that rule), and prints per concept and contender: the settings, those the
search runs to the end, the worst forget rate it finds, the full grid's, and the share of attack
steps it would have spent. Nothing is trained: it measures the search's misses on curves that exist.

    python benchmarks/halving_replay.py DIR [--preset NAME] [--eta 3] [--no-settle] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unrelearn.bench.grid import Cell, Contender
from unrelearn.bench.run import search_ceilings
from unrelearn.bench.search import Halving
from unrelearn.bench.store import ResultStore, select_presets
from unrelearn.errors import UnrelearnError
from unrelearn.io import write_json_atomic


def replay(folder: Path, eta: int, preset: str | None = None, settle: bool = True) -> tuple[list[dict], float]:
    store = ResultStore(folder / "results.sqlite")
    try:
        results = store.cells()
        recorded = select_presets(dict(store.meta_items("preset:")), [preset] if preset else None, folder)
        if preset is not None:
            results = [r for r in results if r.key in set(recorded[preset]["cells"])]
        models = {entry["preset"].get("model", "builtin:shapes") for entry in recorded.values()}
        if len(models) != 1:
            raise UnrelearnError(f"{folder} holds presets of several base models ({', '.join(sorted(models))}); pick one with --preset")
        cells, curves = _cells(results)
        search = Halving(cells, eta)
        ceilings = search_ceilings(store, models.pop(), search) if settle else {}
    finally:
        store.close()
    partials = {(key, step["step"]): [p for p in points if p["step"] <= step["step"]] for key, points in curves.items() for step in points}
    finished: dict[str, list] = {}
    while True:
        work, states = search.plan(finished, partials, ceilings)
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
                     "grid_worst": true_worst, "missed_by": true_worst - found, "settled_at": ceilings.get(state.concept)})  # fmt: skip
    return rows, steps / all_steps


def _cells(results) -> tuple[list[Cell], dict[str, list]]:
    cells, curves = [], {}
    for result in results:
        spec = result.spec
        identity = spec["contender"]
        contender = Contender(spec["label"], identity["model"], identity["method"], identity["options"], spec.get("oracle", False))
        cell = Cell(result.concept, contender, spec["attack"], tuple(spec["eval_at"]), spec["evaluation"])
        cells.append(cell)
        curves[cell.key] = result.points
    return cells, curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a benchmark folder whose cells ran to their end")
    parser.add_argument("--preset", help="replay this preset's cells only (a folder can hold several)")
    parser.add_argument("--eta", type=int, default=3)
    parser.add_argument("--no-settle", dest="settle", action="store_false", help="the interval rule alone (the search before the settled rule)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    try:
        rows, spent = replay(args.folder, args.eta, args.preset, args.settle)
    except UnrelearnError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
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
        write_json_atomic(args.out, {"command": command, "eta": args.eta, "settle": args.settle, "attack_steps_share": spent, "rows": rows})


if __name__ == "__main__":
    main()
