"""``unrelearn demo``: the whole story on the embedded default, in minutes on a laptop CPU.

1. evaluate the shipped base model on a concept;
2. unlearn it with ESD and evaluate again (before / after);
3. attack the unlearned model by fine-tuning on the concept (HRM-m) and trace the forget rate.

Everything lands in one folder: ``report.json`` (numbers, configs, versions), image grids and
the durability curve. The work happens in ``OUT.partial/``, a visible folder that keeps every
finished stage (and the checkpoints of the running one), so a killed demo run again with the
same settings resumes where it stopped; when all stages are done it becomes ``OUT``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from unrelearn.assets import load_model
from unrelearn.attacks import AttackConfig, attack
from unrelearn.attacks.finetune import EMBEDDED_DEFAULTS
from unrelearn.errors import UnrelearnError
from unrelearn.evaluate import EvalConfig, Evaluation, evaluate
from unrelearn.io import (
    apply_umask,
    ensure_writable_parent,
    library_versions,
    output_lock,
    replace_directory,
    write_json_atomic,
)
from unrelearn.methods import unlearn
from unrelearn.model import DiffusionModel
from unrelearn.progress import stage
from unrelearn.report import save_grid
from unrelearn.training import settings_difference
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
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    out = Path(out)
    ensure_writable_parent(out)
    get_world("shapes").attribute_of(concept)
    config = EvalConfig(samples=samples, seed=seed)
    settings = {"concept": concept, "samples": samples, "seed": seed, "model": "builtin:shapes", "method": method,
                "unlearn_steps": unlearn_steps, "attack_steps": attack_steps}  # fmt: skip
    with output_lock(out):
        work = out.with_name(f"{out.name}.partial")
        _claim(work, settings)
        report = _run(work, settings, config, progress, device)
        apply_umask(work)
        (work / "settings.json").unlink()
        replace_directory(work, out)
    return report


def _claim(work: Path, settings: dict[str, Any]) -> None:
    """Start ``work`` for these settings, or check that the partial run there has them."""
    record = work / "settings.json"
    if not work.exists():
        work.mkdir()
        write_json_atomic(record, settings)
        return
    try:
        saved = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        raise UnrelearnError(f"{str(work)!r} is not a demo's partial run; delete it or choose another --out") from None
    if differences := settings_difference(saved, settings):
        raise UnrelearnError(
            f"{str(work)!r} holds a partial demo with other settings ({'; '.join(differences)}); run again with the "
            f"same settings to resume it, or delete {str(work)!r} to start over"
        )
    stage(f"demo: resuming the partial run in {work}", True)


def _evaluation(work: Path, name: str, model_fn, concept: str, config: EvalConfig, progress: bool) -> dict[str, Any]:
    """The metrics of stage ``name``: read from ``work`` when that stage finished before."""
    metrics_file = work / f"{name}.metrics.json"
    if metrics_file.is_file():
        return json.loads(metrics_file.read_text())
    stage(f"demo: evaluating {name} ({config.samples} samples per prompt set)", progress)
    result = evaluate(model_fn(), concept, config, progress=progress)
    _grids(work, name, result, concept)
    write_json_atomic(metrics_file, result.metrics)  # last: it marks the stage as done
    return result.metrics


def _run(work: Path, settings: dict[str, Any], config: EvalConfig, progress: bool, device: Any) -> dict[str, Any]:
    concept, method, seed = settings["concept"], settings["method"], settings["seed"]
    began = time.perf_counter()
    base = _evaluation(work, "1-base", lambda: load_model("builtin:shapes", device=device), concept, config, progress)

    unlearned = work / "unlearned-model"
    if (unlearned / "run.json").is_file():
        record = json.loads((unlearned / "run.json").read_text())
    else:
        stage(f"demo: unlearning {concept!r} with {method}", progress)
        overrides = {"seed": seed} | ({"steps": settings["unlearn_steps"]} if settings["unlearn_steps"] else {})
        model = load_model("builtin:shapes", device=device)
        record = unlearn(model, method, concept, out=unlearned, overrides=overrides, progress=progress)

    def unlearned_model() -> DiffusionModel:
        return DiffusionModel.load(unlearned, device=device)

    after = _evaluation(work, f"2-{method}", unlearned_model, concept, config, progress)

    attack_steps = settings["attack_steps"]
    attack_config = AttackConfig(data="hrm-m", steps=attack_steps, seed=seed, **EMBEDDED_DEFAULTS)
    attack_folder = work / "3-attack-hrm-m"
    if (attack_folder / "curve.json").is_file():
        curve = json.loads((attack_folder / "curve.json").read_text())
    else:
        stage(f"demo: attacking with hrm-m for {attack_steps} steps", progress)
        eval_at = sorted({0, attack_steps // 2, attack_steps})
        curve = attack(unlearned_model(), concept, attack_config, attack_folder, eval_at, config,
                       threshold=0.5 * base["forget_rate"], progress=progress)  # fmt: skip

    summary = {
        "concept": concept,
        "base_model": {k: base[k] for k in _HEADLINE},
        f"after_{method}": {k: after[k] for k in _HEADLINE},
        "attack_hrm_m": {
            "forget_rate_by_step": {str(p["step"]): p["forget_rate"] for p in curve["points"]},
            "steps_to_relearn": curve["steps_to_relearn"],
            "threshold": curve["threshold"],
        },
    }
    report = {
        "summary": summary,
        "evaluations": {"base_model": base, method: after},
        "unlearning": record,
        "attack": curve,
        "config": settings | {"attack": attack_config.__dict__},
        "versions": library_versions(),
        "wall_seconds_this_run": time.perf_counter() - began,
    }
    write_json_atomic(work / "report.json", report)
    shutil.rmtree(work / "unlearned-model.checkpoint", ignore_errors=True)
    return report


def _grids(folder: Path, prefix: str, evaluation: Evaluation, concept: str) -> None:
    save_grid(evaluation.forget_images[:32], evaluation.forget_prompts[:32], folder / f"{prefix}-concept-prompts.png",
              title=f"{prefix}: prompts mentioning {concept!r}")  # fmt: skip
    save_grid(evaluation.retain_images[:32], evaluation.retain_prompts[:32], folder / f"{prefix}-retain-prompts.png",
              title=f"{prefix}: retain prompts")  # fmt: skip
