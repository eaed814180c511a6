"""``unrelearn demo``: the whole story on the embedded default, in minutes on a laptop CPU.

It runs the ``quick`` benchmark preset into ``OUT`` — the concept unlearned with ESD, with UCE
and with UCE under its Meta-Unlearning defence, each attacked by fine-tuning on the concept and
on benign data without it, beside the exact-unlearning oracle under the same attacks — and
writes the report
(``OUT/report/report.html``: tables, curves, image grids before and after the attack).
Killed, the same command resumes: the benchmark recomputes no finished cell.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from unrelearn.bench.grid import load_preset
from unrelearn.bench.report import write_report
from unrelearn.bench.run import run_bench
from unrelearn.bench.store import ResultStore
from unrelearn.io import write_json_atomic


def demo_preset(concept: str = "circle", samples: int = 64, seed: int = 0, attack_steps: int = 100,
                unlearn_steps: int | None = None) -> dict[str, Any]:  # fmt: skip
    """The ``quick`` preset with the demo's settings (its defaults give exactly the preset's cells)."""
    from unrelearn.methods import resolve_method

    preset = load_preset("quick")
    preset["concepts"] = [concept]
    preset["seeds"] = [seed]
    preset["eval"] = preset["eval"] | {"samples": samples, "quality_samples": samples, "seed": seed}
    preset["attacks"] = [a | {"steps": attack_steps,
                              "eval_at": sorted({round(p * attack_steps / a["steps"]) for p in a["eval_at"]})}
                         for a in preset["attacks"]]  # fmt: skip
    if unlearn_steps is not None:
        for contender in preset["contenders"]:
            if not resolve_method(contender["method"])[0].closed_form:
                contender["options"] = contender.get("options", {}) | {"steps": unlearn_steps}
    return preset


def run_demo(
    out: str | Path,
    concept: str = "circle",
    samples: int = 64,
    seed: int = 0,
    attack_steps: int = 100,
    unlearn_steps: int | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    preset: dict[str, Any] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the demo's benchmark into ``out``, write its report, and return the headline."""
    out = Path(out)
    preset = preset or demo_preset(concept, samples, seed, attack_steps, unlearn_steps)
    run_bench(preset, out, device=device, progress=progress, command=command)
    written = write_report(out)
    store = ResultStore(out / "results.sqlite")
    try:
        keys = set(store.meta(f"preset:{preset.get('name', 'quick')}")["cells"])
        rows = []
        for cell in (c for c in store.cells() if c.key in keys):
            first, last = cell.points[0], cell.points[-1]
            rows.append({
                "concept": cell.concept, "contender": cell.contender, "attack": cell.attack, "seed": cell.seed,
                "oracle": bool(cell.spec.get("oracle")),
                "forget_rate_before_attack": [first["forget_rate"], first["forget_rate_ci"]],
                "forget_rate_after_attack": [last["forget_rate"], last["forget_rate_ci"]],
                "steps_to_relearn": cell.summary["steps_to_relearn"], "threshold": cell.summary["threshold"],
            })  # fmt: skip
    finally:
        store.close()
    headline = {"rows": rows, "report": str(written["html"]), "markdown": str(written["markdown"])}
    write_json_atomic(out / "report" / "headline.json", headline)
    return headline
