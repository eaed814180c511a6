"""``unrelearn demo``: the whole story on the embedded default, in minutes on a laptop CPU.

1. evaluate the shipped base model on a concept;
2. unlearn it with ESD and evaluate again (before / after);
3. attack the unlearned model by fine-tuning on the concept (HRM-m) and trace the forget rate.

Everything lands in one folder: ``report.json`` (numbers, configs, versions), image grids and
the durability curve.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from unrelearn.assets import load_model
from unrelearn.attacks import AttackConfig, attack
from unrelearn.attacks.finetune import EMBEDDED_DEFAULTS
from unrelearn.evaluate import EvalConfig, evaluate
from unrelearn.io import atomic_directory, ensure_writable_parent, library_versions
from unrelearn.methods import unlearn
from unrelearn.report import save_grid
from unrelearn.worlds import get_world

_HEADLINE = ("forget_rate", "forget_rate_ci", "retain_alignment", "fid")


def run_demo(
    out: str | Path,
    concept: str = "circle",
    samples: int = 64,
    seed: int = 0,
    method: str = "esd-u-1",
    unlearn_steps: int | None = None,
    attack_steps: int = 100,
    progress: bool = True,
) -> dict[str, Any]:
    out = Path(out)
    ensure_writable_parent(out)
    get_world("shapes").attribute_of(concept)
    config = EvalConfig(samples=samples, seed=seed)
    began = time.perf_counter()
    with atomic_directory(out) as tmp:
        model = load_model("builtin:shapes")
        base = evaluate(model, concept, config, progress=progress)
        _grids(tmp, "1-base", base, concept)

        overrides = {"seed": seed} | ({"steps": unlearn_steps} if unlearn_steps else {})
        record = unlearn(model, method, concept, out=tmp / "unlearned-model", overrides=overrides, progress=progress)
        after = evaluate(model, concept, config, progress=progress)
        _grids(tmp, f"2-{method}", after, concept)

        attack_config = AttackConfig(data="hrm-m", steps=attack_steps, seed=seed, **EMBEDDED_DEFAULTS)
        eval_at = sorted({0, attack_steps // 2, attack_steps})
        curve = attack(model, concept, attack_config, tmp / "3-attack-hrm-m", eval_at, config,
                       threshold=0.5 * base.metrics["forget_rate"], progress=progress)  # fmt: skip

        summary = {
            "concept": concept,
            "base_model": {k: base.metrics[k] for k in _HEADLINE},
            f"after_{method}": {k: after.metrics[k] for k in _HEADLINE},
            "attack_hrm_m": {
                "forget_rate_by_step": {p["step"]: p["forget_rate"] for p in curve["points"]},
                "steps_to_relearn": curve["steps_to_relearn"],
                "threshold": curve["threshold"],
            },
        }
        report = {
            "summary": summary,
            "evaluations": {"base_model": base.metrics, method: after.metrics},
            "unlearning": record,
            "attack": curve,
            "config": {"concept": concept, "samples": samples, "seed": seed, "model": "builtin:shapes",
                       "method": method, "attack": attack_config.__dict__},  # fmt: skip
            "versions": library_versions(),
            "wall_seconds": time.perf_counter() - began,
        }
        (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    return report


def _grids(folder: Path, prefix: str, evaluation, concept: str) -> None:
    save_grid(evaluation.forget_images[:32], evaluation.forget_prompts[:32], folder / f"{prefix}-concept-prompts.png",
              title=f"{prefix}: prompts mentioning {concept!r}")  # fmt: skip
    save_grid(evaluation.retain_images[:32], evaluation.retain_prompts[:32], folder / f"{prefix}-retain-prompts.png",
              title=f"{prefix}: retain prompts")  # fmt: skip
