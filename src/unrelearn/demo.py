"""``unrelearn demo``: the whole story on the embedded default, in minutes on a laptop CPU.

For now it evaluates the shipped base model on one concept; unlearning, attacks and the
comparison join as their issues land.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from unrelearn.assets import load_model
from unrelearn.evaluate import EvalConfig, evaluate
from unrelearn.io import atomic_directory, ensure_writable_parent, library_versions
from unrelearn.report import save_grid
from unrelearn.worlds import get_world


def run_demo(out: str | Path, concept: str = "circle", samples: int = 64, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    out = Path(out)
    ensure_writable_parent(out)
    get_world("shapes").attribute_of(concept)
    config = EvalConfig(samples=samples, seed=seed)
    began = time.perf_counter()
    model = load_model("builtin:shapes")
    base = evaluate(model, concept, config, progress=progress)
    summary = {
        "concept": concept,
        "base_model": {k: base.metrics[k] for k in ("forget_rate", "forget_rate_ci", "retain_alignment", "fid")},
    }
    report = {
        "summary": summary,
        "evaluations": {"base_model": base.metrics},
        "config": {"concept": concept, "samples": samples, "seed": seed, "model": "builtin:shapes"},
        "versions": library_versions(),
        "wall_seconds": time.perf_counter() - began,
    }
    with atomic_directory(out) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        save_grid(base.forget_images[:32], base.forget_prompts[:32], tmp / "base_concept_prompts.png",
                  title=f"base model, prompts mentioning {concept!r}")  # fmt: skip
        save_grid(base.retain_images[:32], base.retain_prompts[:32], tmp / "base_retain_prompts.png",
                  title="base model, retain prompts")  # fmt: skip
    return report
