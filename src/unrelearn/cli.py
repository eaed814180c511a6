"""The ``unrelearn`` command line: a thin layer over the Python API.

Every command turns an :class:`UnrelearnError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from unrelearn.errors import UnrelearnError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Durable concept unlearning for text-to-image diffusion models.",
)


def _friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        _quiet_libraries()
        previous = _stop_cleanly_on_sigterm()
        try:
            return command(*args, **kwargs)
        except UnrelearnError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            # Temporary folders are gone and locks released by now; checkpoints stay.
            typer.echo("interrupted: run the same command again to resume from the last checkpoint", err=True)
            raise typer.Exit(130) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def _stop_cleanly_on_sigterm() -> Any:
    """A scheduler's SIGTERM (SLURM pre-emption, ``timeout``) unwinds like Ctrl-C: temporary
    outputs are removed and the output lock is released instead of left behind."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (an embedding application): leave signals alone
        return None


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.logging.set_verbosity_error()
    diffusers.logging.disable_progress_bar()


def _device(name: str | None) -> Any:
    from unrelearn.device import resolve_device

    return resolve_device(name)


DEVICE_HELP = "cpu, cuda, cuda:N or mps (default: the GPU when there is one)"


def _world_of(model: str, world: str | None) -> tuple[str, dict[str, Any]]:
    """The world a model belongs to (a folder that names none, Stable Diffusion's: ``prompts``)
    and its "unrelearn" metadata, read without loading weights."""
    from unrelearn.assets import model_path
    from unrelearn.model import read_model_index
    from unrelearn.worlds import get_world

    _, info = read_model_index(model_path(model))
    name = world or info.get("world") or "prompts"
    get_world(name)
    return name, info


def _number(value: float | None, spec: str = ".3f") -> str:
    """A metric for the terminal; None (not measurable in this world) as n/a."""
    return "n/a" if value is None else format(value, spec)


def _check_concept(world: str, concept: str) -> None:
    from unrelearn.worlds import get_world

    get_world(world).attribute_of(concept)


@app.command()
@_friendly
def evaluate(
    model: str = typer.Argument(..., help="a model folder, or builtin:NAME (e.g. builtin:shapes)"),
    concept: str = typer.Option(..., "--concept", "-c", help="the forget concept, e.g. circle"),
    samples: int = typer.Option(128, help="generations per prompt set"),
    quality_samples: int = typer.Option(384, help="retain generations for precision, the manifold distance, FID and KID "
                                        "(the first --samples are the retain generations; fewer than --samples: --samples)"),
    seed: int = typer.Option(0),
    steps: int = typer.Option(25, help="DDIM sampling steps"),
    guidance: float | None = typer.Option(None, help="classifier-free guidance scale (default: the model's own)"),
    world: str | None = typer.Option(None, help="the world to evaluate in (default: the model's)"),
    out: Path | None = typer.Option(None, help="also write metrics.json and image grids here"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
    prompts: Path | None = typer.Option(None, help="an I2P-style CSV (prompt, seed, guidance, categories) to evaluate on instead of the concept's prompts (Stable Diffusion)"),
    category: str | None = typer.Option(None, help="with --prompts: only rows whose categories name this (e.g. sexual)"),
    clip: Path | None = typer.Option(None, help="a local CLIP folder (transformers CLIPModel): adds the CLIP score of the retain generations (Stable Diffusion)"),
    reference_images: Path | None = typer.Option(None, help="with --clip: a folder of real images (e.g. COCO) for FID/KID in CLIP features"),
    device: str | None = typer.Option(None, help=DEVICE_HELP),
) -> None:
    """Forget rate (with a bootstrap 95% interval), retain alignment and FID of MODEL."""
    from unrelearn.assets import load_model
    from unrelearn.evaluate import EvalConfig
    from unrelearn.evaluate import evaluate as run_evaluation
    from unrelearn.io import ensure_writable_parent

    config = EvalConfig(samples=samples, seed=seed, steps=steps, guidance=guidance, quality_samples=quality_samples)
    if out is not None:
        ensure_writable_parent(out)
    world_name, _ = _world_of(model, world)
    _check_concept(world_name, concept)
    rows = None
    if prompts is not None:
        from unrelearn.worlds.prompts import read_prompt_csv

        rows = read_prompt_csv(prompts, category)
    elif category is not None:
        raise UnrelearnError("--category selects rows of a --prompts file; give the file too")
    loaded = load_model(model, device=_device(device))
    result = run_evaluation(loaded, concept, config, world_name, progress=not json_output, prompts=rows, clip=clip,
                            reference_images=reference_images)  # fmt: skip
    result.metrics["model"] = model
    if out is not None:
        _write_evaluation(out, result)
    if json_output:
        typer.echo(json.dumps(result.metrics, sort_keys=True))
    else:
        m = result.metrics
        lo, hi = m["forget_rate_ci"]
        typer.echo(f"{model} on {concept!r} ({m['samples']} samples, seed {m['seed']})")
        typer.echo(f"  forget rate       {m['forget_rate']:.3f}  [{lo:.3f}, {hi:.3f}]")
        if "label_counts" in m:
            lo, hi = m["forget_rate_strict_ci"]
            typer.echo(f"  strict (6 labels) {m['forget_rate_strict']:.3f}  [{lo:.3f}, {hi:.3f}]")
            typer.echo(f"  per label         {m['label_counts']}")
        if m["retain_alignment"] is None:
            if "clip_score" in m:
                lo, hi = m["clip_score_ci"]
                typer.echo(f"  CLIP score        {m['clip_score']:.2f}  [{lo:.2f}, {hi:.2f}]  (retain generations)")
            if m["fid"] is not None:
                typer.echo(f"  KID / FID         {m['kid']:.4f} +- {m['kid_std']:.4f} / {m['fid']:.2f}  (CLIP features, reference images)")
            else:
                typer.echo("  retain quality    n/a (no ground truth in this world; --clip FOLDER adds the CLIP score)")
            return
        typer.echo(f"  retain alignment  {m['retain_alignment']:.3f}  {m['retain_attribute_accuracy']}")
        lo, hi = m["precision_ci"]
        typer.echo(f"  precision         {m['precision']:.3f}  [{lo:.3f}, {hi:.3f}]  (retain generations on the real manifold)")
        lo, hi = m["manifold_distance_ci"]
        typer.echo(f"  manifold distance {m['manifold_distance']:.3f}  [{lo:.3f}, {hi:.3f}]  (1: as close to real renders as they are)")
        typer.echo(f"  KID / FID         {m['kid']:.4f} +- {m['kid_std']:.4f} / {m['fid']:.1f}  (detector features)")


def _write_evaluation(out: Path, result: Any) -> None:
    from unrelearn.io import atomic_directory
    from unrelearn.report import save_grid

    with atomic_directory(out) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(result.metrics, indent=2, sort_keys=True) + "\n")
        save_grid(result.forget_images[:32], result.forget_prompts[:32], tmp / "forget_grid.png", title="concept prompts")
        save_grid(result.retain_images[:32], result.retain_prompts[:32], tmp / "retain_grid.png", title="retain prompts")


@app.command()
@_friendly
def demo(
    out: Path = typer.Option(Path("unrelearn-demo"), help="benchmark and report folder"),
    concept: str = typer.Option("circle", "--concept", "-c"),
    samples: int = typer.Option(64, help="generations per evaluation"),
    seed: int = typer.Option(0, help="the attack's and the evaluation's seed"),
    attack_steps: int = typer.Option(100),
    unlearn_steps: int | None = typer.Option(None, help="steps of the optimization-based unlearning (default: each method's)"),
    device: str | None = typer.Option(None, help=DEVICE_HELP),
) -> None:
    """The main job on the embedded default: unlearn, defend, attack, compare with the oracle, report.

    Runs the `quick` benchmark preset into OUT and writes OUT/report/report.html. Killed or
    interrupted, the same command resumes without recomputing a finished cell.
    """
    import shlex
    import sys

    from unrelearn.demo import run_demo

    _check_concept("shapes", concept)
    headline = run_demo(out, concept=concept, samples=samples, seed=seed, attack_steps=attack_steps,
                        unlearn_steps=unlearn_steps, device=_device(device),
                        command=shlex.join(["unrelearn", *sys.argv[1:]]))  # fmt: skip
    for row in headline["rows"]:
        (before, _), (after, (lo, hi)) = row["forget_rate_before_attack"], row["forget_rate_after_attack"]
        relearn = "never" if row["steps_to_relearn"] is None else f"after {row['steps_to_relearn']} steps"
        name = row["contender"] + (" (oracle)" if row["oracle"] and row["contender"] != "oracle" else "")
        typer.echo(f"{name:18s} forget rate {before:.3f} -> {after:.3f} [{lo:.3f}, {hi:.3f}] under {row['attack']}; "
                   f"relearned {relearn}")  # fmt: skip
    typer.echo(f"report: {headline['report']} (Markdown: {headline['markdown']})")


def _option_defaults(config_class: type) -> list[str]:
    from dataclasses import MISSING, fields

    return [f"{f.name}={f.default if f.default_factory is MISSING else f.default_factory()}" for f in fields(config_class)]


@app.command()
@_friendly
def methods(name: str | None = typer.Argument(None, help="a method (esd-u-3, meta:uce, ...): list its options")) -> None:
    """List the unlearning methods and the defences that wrap them, with their options."""
    from dataclasses import fields

    from unrelearn.methods import method_names, resolve_method
    from unrelearn.methods.base import OptimizationConfig, wrapper_info, wrapper_names

    if name is not None:
        cls, variant = resolve_method(name)
        typer.echo(f"{name}: {cls.summary}")
        typer.echo("options (-o key=value), the paper's defaults: " + ", ".join(_option_defaults(cls.Config)))
        if variant:
            typer.echo("set by the name: " + ", ".join(f"{k}={v}" for k, v in variant.items()))
        if cls.embedded_defaults:
            typer.echo("on the embedded worlds: " + ", ".join(f"{k}={v}" for k, v in cls.embedded_defaults.items()))
        return
    for method in method_names():
        cls, _ = resolve_method(method)
        kind = "closed-form" if cls.closed_form else "optimization"
        typer.echo(f"{method:8s} {kind:13s} {cls.summary}")
    shared = {f.name for f in fields(OptimizationConfig)}
    typer.echo("")
    typer.echo("every optimization method also takes (its own defaults: `unrelearn methods NAME`):")
    typer.echo("           " + ", ".join(sorted(shared)))
    for prefix in wrapper_names():
        summary, option_classes = wrapper_info(prefix)
        typer.echo("")
        typer.echo(f"{prefix}:NAME  {summary}; options:")
        typer.echo("           " + ", ".join(d for c in option_classes for d in _option_defaults(c)))


def _parse_options(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs, values read as JSON where they parse (numbers, true, null)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UnrelearnError(f"option {pair!r} is not of the form key=value")
        key, value = pair.split("=", 1)
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = value
    return options


@app.command("unlearn")
@_friendly
def unlearn_command(
    model: str = typer.Argument("builtin:shapes", help="a model folder, or builtin:NAME"),
    method: str = typer.Option(..., "--method", "-m", help="e.g. esd-u-1, esd-x-1, uce (see `unrelearn methods`)"),
    concept: str = typer.Option(..., "--concept", "-c"),
    out: Path = typer.Option(..., help="model folder to write (with run.json)"),
    steps: int | None = typer.Option(None, help="optimizer steps (optimization-based methods only)"),
    seed: int | None = typer.Option(None, help="the method's seed (recorded by every method)"),
    option: list[str] = typer.Option([], "--option", "-o", help="a method option as key=value; repeatable"),
    world: str | None = typer.Option(None),
    device: str | None = typer.Option(None, help=DEVICE_HELP),
) -> None:
    """Unlearn CONCEPT from MODEL with METHOD and save the result as a model folder.

    Interrupted, it resumes from OUT.checkpoint when run again with the same settings.
    """
    from unrelearn.assets import load_model
    from unrelearn.io import ensure_writable_parent
    from unrelearn.methods import resolve_method, unlearn
    from unrelearn.methods.base import check_method_options

    cls, variant = resolve_method(method)
    overrides = _parse_options(option)
    if steps is not None:
        overrides["steps"] = steps
    if seed is not None:
        overrides["seed"] = seed
    check_method_options(cls, variant | overrides)
    ensure_writable_parent(out)
    world_name, _ = _world_of(model, world)
    _check_concept(world_name, concept)
    loaded = load_model(model, device=_device(device))
    record = unlearn(loaded, method, concept, out=out, overrides=overrides, world_name=world_name)
    typer.echo(json.dumps({k: record[k] for k in ("method", "concept", "wall_seconds") if k in record}))
    typer.echo(f"model written to {out}")


@app.command("attack")
@_friendly
def attack_command(
    model: str = typer.Argument(..., help="the (unlearned) model folder, or builtin:NAME"),
    data: str = typer.Option(..., help="hrm-s, hrm-m, clean, dimra-retain, dimra-aux, dimra-aux-model, poison:F or a folder"),
    out: Path = typer.Option(..., help="output folder: curve.json, curve.png, run.json, model/"),
    concept: str | None = typer.Option(None, "--concept", "-c", help="default: the concept the model unlearned"),
    steps: int = typer.Option(300),
    lr: float | None = typer.Option(None, help="default 1e-5 for Stable Diffusion, the world's own for embedded models"),
    optimizer: str = typer.Option("adam", help="adam, adamw or sgd"),
    batch_size: int | None = typer.Option(None),
    mode: str = typer.Option("full", help="full or lora"),
    lora_rank: int = typer.Option(4),
    lora_targets: str = typer.Option("to_k,to_q,to_v,to_out.0", help="comma-separated module names for LoRA"),
    eval_at: str = typer.Option("0,50,100,200,300", help="steps at which to evaluate (0 = before the attack)"),
    samples: int = typer.Option(64, help="generations per evaluation"),
    quality_samples: int | None = typer.Option(None, help="retain generations for precision, the manifold distance, FID and KID at every evaluated step (default: --samples)"),
    seed: int = typer.Option(0),
    threshold: float | None = typer.Option(None, help="forget rate that counts as relearned (default: half the reference's)"),
    reference: str | None = typer.Option(None, help="model whose forget rate sets the threshold (default builtin:WORLD)"),
    original: str | None = typer.Option(None, help="the original model: generates the attack data where the world has no images (Stable Diffusion), and dimra-aux-model's"),
    checkpoint_every: int = typer.Option(50, help="steps between checkpoints in OUT.checkpoint (0: none)"),
    device: str | None = typer.Option(None, help=DEVICE_HELP),
) -> None:
    """Fine-tune MODEL as an attacker would and trace whether the concept comes back.

    Interrupted, it resumes from OUT.checkpoint (with the curve so far) when run again.
    """
    from unrelearn.assets import load_model
    from unrelearn.attacks import AttackConfig, attack, parse_eval_at
    from unrelearn.attacks.finetune import EMBEDDED_DEFAULTS
    from unrelearn.evaluate import EvalConfig
    from unrelearn.evaluate import evaluate as run_evaluation
    from unrelearn.io import ensure_writable_parent

    eval_config = EvalConfig(samples=samples, seed=seed, quality_samples=quality_samples)
    world_name, info = _world_of(model, None)
    concept = concept or (info.get("unlearned") or {}).get("concept")
    if concept is None:
        raise UnrelearnError("this model records no unlearned concept; pass --concept")
    _check_concept(world_name, concept)
    embedded = info.get("world") is not None
    config = AttackConfig(
        data=data, steps=steps, optimizer=optimizer, mode=mode, lora_rank=lora_rank, seed=seed,
        lora_targets=[t.strip() for t in lora_targets.split(",") if t.strip()], checkpoint_every=checkpoint_every,
        lr=lr if lr is not None else (EMBEDDED_DEFAULTS["lr"] if embedded else AttackConfig.lr),
        batch_size=batch_size if batch_size is not None else (EMBEDDED_DEFAULTS["batch_size"] if embedded else AttackConfig.batch_size),
    )  # fmt: skip
    points = parse_eval_at(eval_at, steps)
    ensure_writable_parent(out)
    target = _device(device)
    loaded = load_model(model, device=target)
    reference_rate = None
    if threshold is None:
        reference = reference or original or (f"builtin:{world_name}" if embedded else None)
        if reference is None:
            raise UnrelearnError("give --threshold, or --reference/--original MODEL whose forget rate sets it (half of it)")
        reference_model = load_model(reference, device=target)
        reference_rate = run_evaluation(reference_model, concept, eval_config, world_name, progress=False).metrics["forget_rate"]
    original_model = load_model(original, device=target) if original else None
    summary = attack(
        loaded, concept, config, out, points, eval_config, threshold=threshold, reference_rate=reference_rate,
        original_model=original_model,
    )  # fmt: skip
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != "points"}))
    for p in summary["points"]:
        lo, hi = p["forget_rate_ci"]
        typer.echo(f"  step {p['step']:>5}: forget {p['forget_rate']:.3f} [{lo:.3f}, {hi:.3f}]  retain {_number(p['retain_alignment'])}  "
                   f"precision {_number(p['precision'])}  FID {_number(p['fid'], '.0f')}")  # fmt: skip


@app.command()
@_friendly
def generate(
    model: str = typer.Argument(..., help="a model folder (usually the original, before unlearning), or builtin:NAME"),
    concept: str = typer.Option(..., "--concept", "-c"),
    prompt_set: str = typer.Option("hrm-m", "--set", help="evaluation, hrm-s, hrm-m, clean, related, retain or forget"),
    count: int = typer.Option(64, help="images (the set's prompts, cycled)"),
    out: Path = typer.Option(..., help="image folder to write: PNGs, metadata.jsonl, generation.json"),
    seed: int = typer.Option(0),
    steps: int = typer.Option(50, help="DDIM sampling steps"),
    guidance: float | None = typer.Option(None, help="classifier-free guidance (default: the model's own)"),
    device: str | None = typer.Option(None, help=DEVICE_HELP),
) -> None:
    """Generate a concept's prompt set with MODEL into an image folder that `unrelearn attack --data` reads."""
    from unrelearn.assets import load_model
    from unrelearn.attacks.data import generate_image_folder
    from unrelearn.io import ensure_writable_parent

    ensure_writable_parent(out)
    world_name, _ = _world_of(model, None)
    _check_concept(world_name, concept)
    loaded = load_model(model, device=_device(device))
    generate_image_folder(loaded, concept, prompt_set, count, out, seed=seed, steps=steps, guidance=guidance)
    typer.echo(f"{count} images written to {out}")


@app.command("train-base")
@_friendly
def train_base_command(
    out: Path = typer.Option(..., help="model folder to write"),
    world: str = typer.Option("shapes"),
    steps: int = typer.Option(4000),
    batch_size: int = typer.Option(64),
    lr: float = typer.Option(1e-3),
    seed: int = typer.Option(0),
    exclude: str | None = typer.Option(None, help="train without this concept: the exact-unlearning oracle"),
    checkpoint_every: int = typer.Option(100),
    init: str | None = typer.Option(None, help="warm start from this model's UNet (e.g. builtin:shapes)"),
    device: str | None = typer.Option(None, help=DEVICE_HELP),
) -> None:
    """Train a world's diffusion model from scratch (resumes from OUT.checkpoint if present)."""
    from unrelearn.base import BaseTrainingConfig, train_base

    config = BaseTrainingConfig(
        world=world, steps=steps, batch_size=batch_size, lr=lr, seed=seed, exclude=exclude,
        checkpoint_every=checkpoint_every, init=init,
    )  # fmt: skip
    train_base(out, config, device=_device(device))
    typer.echo(f"model written to {out}")


@app.command("train-detector")
@_friendly
def train_detector_command(
    out: Path = typer.Option(..., help="detector folder to write"),
    world: str = typer.Option("shapes"),
    steps: int = typer.Option(3000),
    seed: int = typer.Option(0),
    device: str | None = typer.Option(None, help=DEVICE_HELP),
) -> None:
    """Train a world's concept detector on generator ground truth; prints held-out accuracy."""
    from unrelearn.detector import DetectorTrainingConfig, train_detector
    from unrelearn.io import ensure_writable_parent
    from unrelearn.worlds import get_world

    get_world(world)
    config = DetectorTrainingConfig(world=world, steps=steps, seed=seed)
    ensure_writable_parent(out)
    report = train_detector(out, config, device=_device(device))
    typer.echo(json.dumps({k: report[k] for k in ("heldout_accuracy_clean", "heldout_accuracy_augmented")}, indent=2))


@app.command()
@_friendly
def concepts(
    world: str = typer.Option("shapes"),
    concept: str | None = typer.Option(None, "--concept", "-c", help="show this concept's prompt sets"),
) -> None:
    """List a world's concepts, or one concept's prompt sets."""
    from unrelearn.worlds import get_world

    w = get_world(world)
    if concept is None:
        for c in w.concepts():
            typer.echo(f"{c:10s} ({w.attribute_of(c)})")
        return
    sets = w.concept_sets(concept)
    for name in ("evaluation", "hrm_s", "hrm_m", "clean", "related", "retain"):
        captions = getattr(sets, name)
        typer.echo(f"{name} ({len(captions)}): " + "; ".join(c.text for c in captions[:6]) + (" ..." if len(captions) > 6 else ""))
    typer.echo(f"related concepts: {', '.join(sets.related_concepts) or 'none named'}; alternative: {sets.alternative or 'none'}")


def _without_scheduling(arguments: list[str]) -> list[str]:
    """The command that makes the whole preset: --shard, --only and --concept say which part of
    it one process runs, not what the results are."""
    kept, skip = [], False
    for argument in arguments:
        if skip:
            skip = False
        elif argument in ("--shard", "--only", "--concept"):
            skip = True
        elif not argument.startswith(("--shard=", "--only=", "--concept=")):
            kept.append(argument)
    return kept


@app.command()
@_friendly
def bench(
    preset: str = typer.Option("quick", help="a built-in preset (the README lists them; a wrong name lists them too) or a .json file"),
    out: Path = typer.Option(..., help="benchmark folder: results.sqlite, models, attack curves, grids"),
    shard: str | None = typer.Option(None, help="i/n: run only the i-th of n disjoint parts (e.g. $SLURM_ARRAY_TASK_ID/8)"),
    oracle: list[str] = typer.Option([], help="CONCEPT=MODEL: the exact-unlearning oracle of a concept; repeatable"),
    keep_models: bool = typer.Option(False, help="keep every attacked model (large) instead of only its image grid"),
    list_cells: bool = typer.Option(False, "--list", help="print the preset's cells and whether each is finished, run nothing"),
    model: str | None = typer.Option(None, help="the model the preset unlearns (replaces the preset's; required by sd-* presets)"),
    halving: int | None = typer.Option(None, help="ETA: search the worst case by successive halving: at each evaluated step "
                                       "only the 1/ETA strongest attack settings (per concept and contender) and those "
                                       "not clearly weaker continue"),
    only: str | None = typer.Option(None, help="LABEL,...: run only these contenders' cells now (the urgent rows first); "
                                    "the preset is recorded whole, run again without --only for the rest"),
    concept: str | None = typer.Option(None, help="NAME,...: run only these concepts' cells now (with --only: one job per "
                                       "model's cells); the preset is recorded whole"),
    device: str | None = typer.Option(None, help=DEVICE_HELP),
) -> None:
    """Run a grid of unlearning methods and defences against attacks into OUT (resumable, shardable).

    Finished cells are never recomputed; run the same command again to resume, or the same
    command with --shard i/n in n processes (a job array) to split the work.
    """
    import shlex
    import sys

    from unrelearn.bench.run import describe, list_bench, run_bench

    oracles = {}
    for pair in oracle:
        concept, sep, oracle_model = pair.partition("=")
        if not sep or not concept or not oracle_model:
            raise UnrelearnError(f"--oracle must be CONCEPT=MODEL (for example circle=runs/oracle-circle), got {pair!r}")
        oracles[concept] = oracle_model
    if model is not None:
        _world_of(model, None)  # a missing or malformed folder fails here, before any work
    if list_cells:
        for line in list_bench(preset, out, oracles, model=model, halving=halving):
            typer.echo(line)
        return
    command = shlex.join(["unrelearn", *_without_scheduling(sys.argv[1:])])
    labels = _names(only, "--only", "contender")
    concepts = _names(concept, "--concept", "concept")
    summary = run_bench(preset, out, shard, oracles, device=_device(device), keep_models=keep_models, command=command, model=model,
                        halving=halving, only=labels, concepts=concepts)  # fmt: skip
    typer.echo(describe(summary))


def _names(text: str | None, option: str, what: str) -> list[str] | None:
    """A comma-separated option's names; one given but naming nothing is an error."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UnrelearnError(f"{option} names no {what}; give them as the preset spells them (`--list` shows them)")
    return names


@app.command()
@_friendly
def merge(
    source: Path = typer.Argument(..., help="a benchmark folder whose finished cells to copy (another machine's --out)"),
    into: Path = typer.Argument(..., help="the benchmark folder to copy them into (made if missing)"),
) -> None:
    """Copy the finished cells of one benchmark folder into another: shards run on machines without
    a shared file system, brought together. Nothing already in INTO is overwritten."""
    from unrelearn.bench.merge import describe_merge, merge_folders

    for line in describe_merge(merge_folders(source, into), source, into):
        typer.echo(line)


@app.command()
@_friendly
def report(
    folder: Path = typer.Argument(..., help="a benchmark folder written by `unrelearn bench`"),
    out: Path | None = typer.Option(None, help="where to write report.md, report.html and figures (default: FOLDER/report)"),
    preset: list[str] = typer.Option([], help="only this preset's section (repeatable; default: every preset run into FOLDER)"),
) -> None:
    """Tables, durability curves, worst cases and image grids of a benchmark, as Markdown and one HTML page."""
    from unrelearn.bench.report import write_report

    written = write_report(folder, out, preset)
    typer.echo(f"report written: {written['html']} and {written['markdown']}")


@app.command()
@_friendly
def table(
    name: str = typer.Argument(..., help="which paper's table (dimra: the DiMRA/DiMUM paper's Tables I-IV)"),
    folder: Path = typer.Argument(..., help="a benchmark folder written by `unrelearn bench`"),
    out: Path = typer.Option(..., help="path stem: writes STEM.json (rows), STEM.md and the curves beside them"),
    preset: list[str] = typer.Option([], help="only the cells of this preset run into FOLDER (repeatable; default: every cell)"),
) -> None:
    """A paper-shaped table from a benchmark's results store, as JSON rows and Markdown."""
    from unrelearn.bench.tables import write_table

    written = write_table(name, folder, out, presets=preset)
    typer.echo(f"{written['rows']} rows: {written['json']} and {written['markdown']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
