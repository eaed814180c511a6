"""Runs you can trust: interrupted runs resume to the uninterrupted result, checkpoints belong to
their settings, blow-ups are caught before anything is saved, and every output is readable."""

import json
import math
import os
import stat

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from unrelearn.errors import UnrelearnError
from unrelearn.methods import method_names, resolve_method, unlearn
from unrelearn.model import DiffusionModel
from unrelearn.training import TrainConfig, Trainer

# Fast settings for every registered method. A method added to the registry without an entry
# here fails test_every_method_has_fast_settings, so resume equality cannot silently skip it.
FAST = {
    "esd": {"steps": 4, "batch_size": 2, "ddim_steps": 4},
    "sdd": {"steps": 4, "batch_size": 2, "ddim_steps": 4, "ema_decay": 0.5},
    "salun": {"steps": 4, "batch_size": 2, "mask_batches": 1},
    "ca": {"steps": 4, "batch_size": 2},
    "erasediff": {"steps": 4, "batch_size": 2},
    "dimum": {"steps": 4, "batch_size": 2, "images_per_prompt": 2},
    "sfront": {"steps": 4, "batch_size": 2},
    "shs": {"steps": 4, "batch_size": 2},
    "uce": {},
    "rece": {"epochs": 2},
    "resalign": {"steps": 4, "batch_size": 2, "configs_per_step": 2, "ft_steps": [2], "ft_data_size": 8,
                 "harm_batch_size": 2, "ft_batch_size": 2, "solve_iterations": 2},
}
# Learning rates large enough that a resumed run with the wrong teacher, batch or optimizer
# state ends measurably elsewhere.
FAST_LR = 1e-2


def fresh_model(minilm) -> DiffusionModel:
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    return DiffusionModel(tiny_unet(), *minilm, scheduler, max_length=20, info={"world": "shapes"})


def unet_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_every_method_has_fast_settings():
    assert set(FAST) == set(method_names())


def _options(method: str) -> dict:
    cls, _ = resolve_method(method)
    if cls.closed_form:
        return dict(FAST[method])
    return FAST[method] | {"lr": FAST_LR, "checkpoint_every": 2}


@pytest.mark.parametrize("method", sorted(FAST))
def test_interrupted_then_resumed_run_gives_the_uninterrupted_weights(method, minilm, tmp_path, monkeypatch):
    """Kill every registered method after its first checkpoint (closed-form ones while saving),
    run it again, and get the uninterrupted model bit for bit."""
    cls, _ = resolve_method(method)
    options = _options(method)
    straight_record = unlearn(fresh_model(minilm), method, "circle", out=tmp_path / "straight", overrides=options, progress=False)

    with monkeypatch.context() as patch:
        if cls.closed_form:
            def killed(self, folder, **kwargs):
                raise KeyboardInterrupt

            patch.setattr(DiffusionModel, "save", killed)
        else:
            original = Trainer.save_checkpoint

            def killed(self, step, losses):
                original(self, step, losses)
                raise KeyboardInterrupt

            patch.setattr(Trainer, "save_checkpoint", killed)
        with pytest.raises(KeyboardInterrupt):
            unlearn(fresh_model(minilm), method, "circle", out=tmp_path / "resumed", overrides=options, progress=False)
    assert not (tmp_path / "resumed").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    # A fresh process would start from the original weights again; everything else must come
    # from the checkpoint.
    record = unlearn(fresh_model(minilm), method, "circle", out=tmp_path / "resumed", overrides=options, progress=False)
    if not cls.closed_form:
        assert record["resumed_from_step"] == 2
    # Counts a method keeps across steps (ResAlign's solves) come back from the checkpoint too.
    assert record.get("solves") == straight_record.get("solves")
    straight, resumed = unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "resumed")
    differing = [name for name in straight if not torch.equal(straight[name], resumed[name])]
    assert differing == [], f"{len(differing)} of {len(straight)} tensors differ"


def test_esd_teacher_is_the_original_model_even_when_resumed(minilm, tmp_path):
    """The frozen theta* is the model as it was given, not the weights a checkpoint loads."""
    model = fresh_model(minilm)
    original = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    cls, _ = resolve_method("esd-u-1")
    from unrelearn.worlds import get_world

    world = get_world("shapes")
    method = cls(model, world.concept_sets("circle"), cls.Config(**FAST["esd"]), world)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(1.0)  # what loading a checkpoint does to the live weights
    teacher = dict(method.teacher.named_parameters())
    assert all(torch.equal(teacher[n], original[n]) for n in original)


def _interrupt_after_first_checkpoint(monkeypatch):
    original = Trainer.save_checkpoint

    def killed(self, step, losses):
        original(self, step, losses)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_checkpoint", killed)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"lr": 2e-2}, "lr"),
        ({"seed": 1}, "seed"),
        ({"steps": 3}, "steps"),
        ({"eta": 3.0}, "eta"),
        ({"checkpoint_every": 1}, None),  # how often to save does not change the result
    ],
)
def test_a_checkpoint_resumes_only_the_run_it_belongs_to(minilm, tmp_path, monkeypatch, change, named):
    options = FAST["esd"] | {"lr": FAST_LR, "checkpoint_every": 2}
    with monkeypatch.context() as patch:
        _interrupt_after_first_checkpoint(patch)
        with pytest.raises(KeyboardInterrupt):
            unlearn(fresh_model(minilm), "esd-u-1", "circle", out=tmp_path / "out", overrides=options, progress=False)
    checkpoint = tmp_path / "out.checkpoint"
    assert checkpoint.is_dir()
    if named is None:
        record = unlearn(fresh_model(minilm), "esd-u-1", "circle", out=tmp_path / "out", overrides=options | change,
                         progress=False)  # fmt: skip
        assert record["resumed_from_step"] == 2
        return
    with pytest.raises(UnrelearnError) as error:
        unlearn(fresh_model(minilm), "esd-u-1", "circle", out=tmp_path / "out", overrides=options | change, progress=False)
    message = str(error.value)
    assert "\n" not in message and named in message and str(checkpoint) in message
    assert "same settings" in message and "delete" in message
    assert not (tmp_path / "out").exists() and checkpoint.is_dir()


def test_a_checkpoint_of_another_source_model_is_refused(minilm, tmp_path, monkeypatch):
    options = FAST["esd"] | {"lr": FAST_LR, "checkpoint_every": 2}
    with monkeypatch.context() as patch:
        _interrupt_after_first_checkpoint(patch)
        with pytest.raises(KeyboardInterrupt):
            unlearn(fresh_model(minilm), "esd-u-1", "circle", out=tmp_path / "out", overrides=options, progress=False)
    other = fresh_model(minilm)
    with torch.no_grad():
        next(other.unet.parameters()).add_(1.0)
    with pytest.raises(UnrelearnError, match="source model"):
        unlearn(other, "esd-u-1", "circle", out=tmp_path / "out", overrides=options, progress=False)


def test_two_runs_cannot_write_one_output_at_once(minilm, tmp_path):
    from unrelearn.io import output_lock

    with output_lock(tmp_path / "out"), pytest.raises(UnrelearnError, match="another unrelearn run is writing"):
        unlearn(fresh_model(minilm), "uce", "circle", out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    unlearn(fresh_model(minilm), "uce", "circle", out=tmp_path / "out", progress=False)  # the lock is released
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _problem():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def loss_fn(step, generator):
        x = torch.randn(16, 4, generator=generator)
        return ((net(x) - x.sum(1, keepdim=True)) ** 2).mean()

    return net, loss_fn


def _blowing_up_at(step_index: int, factor: float):
    net, loss_fn = _problem()

    def loss(step, generator):
        value = loss_fn(step, generator)
        return value * factor if step == step_index else value

    return net, loss


@pytest.mark.parametrize("factor", [1e30, float("inf")])
def test_a_blown_up_update_is_caught_before_the_next_checkpoint(tmp_path, factor):
    # The update of step 5 explodes; a checkpoint is due right after it (step 6). The
    # checkpoint on disk must stay the good one of step 4.
    net, loss = _blowing_up_at(5, factor)
    config = TrainConfig(steps=10, lr=1e-2, optimizer="sgd", grad_clip=None, checkpoint_every=2)
    trainer = Trainer(dict(net.named_parameters()), loss, config, tmp_path / "ckpt", progress=False)
    with pytest.raises(UnrelearnError) as error:
        trainer.run()
    message = str(error.value)
    assert "step 5" in message and "delete" in message and str(tmp_path / "ckpt") in message
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert state["step"] == 4
    saved = load_file(str(tmp_path / "ckpt" / "params.safetensors"))
    assert all(torch.isfinite(t).all() and t.abs().max() < 100 for t in saved.values())


def test_a_blow_up_in_the_last_step_fails_the_run():
    net, loss = _blowing_up_at(5, 1e30)
    trainer = Trainer(dict(net.named_parameters()), loss, TrainConfig(steps=6, lr=1e-2, optimizer="sgd", grad_clip=None),
                      progress=False)  # fmt: skip
    with pytest.raises(UnrelearnError, match="step 5"):
        trainer.run()


def test_a_method_that_blows_up_writes_no_model(minilm, tmp_path):
    options = FAST["esd"] | {"lr": 1e12, "optimizer": "sgd"}
    with pytest.raises(UnrelearnError, match="blew up"):
        unlearn(fresh_model(minilm), "esd-u-1", "circle", out=tmp_path / "out", overrides=options, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_saved_files_follow_the_umask(minilm, tmp_path):
    previous = os.umask(0o022)
    try:
        fresh_model(minilm).save(tmp_path / "model")
    finally:
        os.umask(previous)
    for path in [tmp_path / "model", *(tmp_path / "model").rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_every_method_accepts_and_records_a_seed(minilm):
    for method in method_names():
        record = unlearn(fresh_model(minilm), method, "circle", overrides=_options(method) | {"seed": 7}, progress=False)
        assert record["config"]["seed"] == 7, method


@pytest.mark.parametrize(
    "method, options, fragment",
    [
        ("esd-u-1", {"eta": "abc"}, "eta"),
        ("esd-u-1", {"steps": 1.5}, "steps"),
        ("esd-u-1", {"lr": "abc"}, "lr"),
        ("esd-u-1", {"lr": float("nan")}, "lr"),
        ("esd-u-1", {"ddim_steps": 1}, "ddim_steps"),
        ("esd-u-1", {"batch_size": 0}, "batch_size"),
        ("esd-u-1", {"steps": 0}, "steps"),
        ("esd-u-1", {"scope": "z"}, "scope"),
        ("salun", {"mask_fraction": 1.5}, "mask_fraction"),
        ("uce", {"preserve_clean": "maybe"}, "preserve_clean"),
        ("sdd", {"grad_clip": -1}, "grad_clip"),
    ],
)
def test_option_values_are_checked_against_their_types_and_ranges(minilm, method, options, fragment):
    with pytest.raises(UnrelearnError) as error:
        unlearn(fresh_model(minilm), method, "circle", overrides=options, progress=False)
    message = str(error.value)
    assert fragment in message and "\n" not in message


def test_trainer_prints_progress_lines_when_not_on_a_terminal(capsys):
    net, loss = _problem()
    Trainer(dict(net.named_parameters()), loss, TrainConfig(steps=20, lr=1e-2), description="toy").run()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines and all("toy" in line for line in lines)
    assert any("20/20" in line for line in lines)
    assert len(lines) <= 12


def test_resolve_device():
    from unrelearn.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda", "mps", "xpu")
    with pytest.raises(UnrelearnError, match="unknown device"):
        resolve_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(UnrelearnError, match="no CUDA"):
            resolve_device("cuda")


def test_demo_output_folder_is_ignored_by_git():
    from pathlib import Path

    ignored = (Path(__file__).parents[1] / ".gitignore").read_text().splitlines()
    assert "/unrelearn-demo/" in ignored


def test_bootstrap_interval_brackets_the_mean_and_is_deterministic():
    from unrelearn.metrics import bootstrap_interval

    flags = [True] * 30 + [False] * 10
    lo, hi = bootstrap_interval(flags, seed=0)
    assert lo < 0.75 < hi and (lo, hi) == bootstrap_interval(flags, seed=0)
    assert bootstrap_interval([True] * 5) == (1.0, 1.0)
    assert math.isclose(hi - lo, 0.27, abs_tol=0.06)  # about 2 x 1.96 x sqrt(0.75 x 0.25 / 40)


def test_demo_runs_its_benchmark_and_report_and_resumes_without_recomputing(tmp_path, monkeypatch):
    """The demo is the quick preset plus the report: interrupted, it resumes from the store."""
    from unrelearn import demo
    from unrelearn.bench import run as bench_run

    preset = demo.demo_preset(samples=4, attack_steps=2, unlearn_steps=2)
    preset["eval"]["steps"] = 2
    preset["contenders"] = [c for c in preset["contenders"] if c["label"] != "meta:uce"]
    original = bench_run._Runner.run
    calls = []

    def killed_after_one_cell(self, cell):
        if calls:
            raise KeyboardInterrupt
        calls.append(cell.key)
        original(self, cell)

    monkeypatch.setattr(bench_run._Runner, "run", killed_after_one_cell)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(tmp_path / "demo", preset=preset, progress=False)
    monkeypatch.setattr(bench_run._Runner, "run", lambda self, cell: (calls.append(cell.key), original(self, cell)))
    from unrelearn.attacks import finetune

    during_attacks = []
    evaluate = finetune.evaluate
    monkeypatch.setattr(finetune, "evaluate", lambda *a, **k: during_attacks.append(1) or evaluate(*a, **k))
    headline = demo.run_demo(tmp_path / "demo", preset=preset, progress=False)
    # esd-u-1, uce, oracle x (hrm-m, dimra-aux): each cell ran once
    assert len(calls) == len(set(calls)) == 6
    assert {r["contender"] for r in headline["rows"]} == {"esd-u-1", "uce", "oracle"}
    # The resumed cells evaluate at their steps after 0; step 0 is each model's one evaluation
    # before any attack, shared by its cells.
    from unrelearn.bench.grid import expand

    eval_points = {cell.key: len(cell.eval_at) - 1 for cell in expand(preset)}
    assert len(during_attacks) == sum(eval_points[key] for key in calls[1:])
    steps_zero = {(r["contender"], str(r["forget_rate_before_attack"])) for r in headline["rows"]}
    assert len(steps_zero) == 3
    assert (tmp_path / "demo" / "report" / "report.html").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_a_kill_inside_an_atomic_write_is_recovered_by_the_next_run(tmp_path):
    from unrelearn.io import output_lock

    out = tmp_path / "out"
    out.mkdir()
    (out / "weights").write_text("finished")
    # Killed while replacing the checkpoint: the old one moved aside, the new one half-written.
    (tmp_path / ".out.checkpoint.old-x1" / "out.checkpoint").mkdir(parents=True)
    (tmp_path / ".out.checkpoint.old-x1" / "out.checkpoint" / "state.json").write_text("{}")
    (tmp_path / ".out.checkpoint.tmp-x2").mkdir()
    (tmp_path / ".out.tmp-x3").mkdir()
    (tmp_path / ".other.tmp-x4").mkdir()  # another output's: not ours to touch
    with output_lock(out):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-x4", "out", "out.checkpoint"]
    assert (tmp_path / "out.checkpoint" / "state.json").read_text() == "{}"


@pytest.fixture()
def quiet_evaluate(monkeypatch):
    from types import SimpleNamespace

    def fake(model, concept, config, world_name=None, detector=None, progress=True):
        metrics = {"forget_rate": 0.5, "forget_rate_ci": [0.25, 0.75], "retain_alignment": 0.9,
                   "retain_alignment_ci": [0.8, 1.0], "fid": 1.0,
                   "precision": 0.7, "precision_ci": [0.6, 0.8], "kid": 0.1, "kid_std": 0.01}  # fmt: skip
        return SimpleNamespace(metrics=metrics)

    monkeypatch.setattr("unrelearn.attacks.finetune.evaluate", fake)


def test_lora_attacks_with_one_seed_give_one_model_and_resume_exactly(minilm, tmp_path, monkeypatch, quiet_evaluate):
    from unrelearn.attacks import AttackConfig, attack
    from unrelearn.evaluate import EvalConfig

    config = AttackConfig(data="hrm-m", steps=4, lr=1e-2, batch_size=2, mode="lora", lora_rank=2, checkpoint_every=2)
    run = {"eval_at": [0, 4], "eval_config": EvalConfig(samples=2, steps=1), "threshold": 0.5, "progress": False}

    def model_in_a_fresh_process(state: int) -> DiffusionModel:
        model = fresh_model(minilm)
        torch.manual_seed(state)  # whatever a process's global generator holds after loading
        return model

    attack(model_in_a_fresh_process(1), "circle", config, tmp_path / "a", **run)
    attack(model_in_a_fresh_process(2), "circle", config, tmp_path / "b", **run)
    with monkeypatch.context() as patch:
        _interrupt_after_first_checkpoint(patch)
        with pytest.raises(KeyboardInterrupt):
            attack(model_in_a_fresh_process(3), "circle", config, tmp_path / "c", **run)
    attack(model_in_a_fresh_process(4), "circle", config, tmp_path / "c", **run)
    a, b, c = (unet_weights(tmp_path / name / "model") for name in "abc")
    assert all(torch.equal(a[n], b[n]) for n in a), "same seed, different LoRA attack"
    assert all(torch.equal(a[n], c[n]) for n in a), "resumed LoRA attack differs"


def test_attack_prints_a_line_per_evaluation_point(minilm, tmp_path, capsys, quiet_evaluate):
    from unrelearn.attacks import AttackConfig, attack
    from unrelearn.evaluate import EvalConfig

    attack(fresh_model(minilm), "circle", AttackConfig(steps=4, lr=1e-3, batch_size=2), tmp_path / "a", [0, 2, 4],
           EvalConfig(samples=2, steps=1), threshold=0.5, progress=True)  # fmt: skip
    err = capsys.readouterr().err
    for step in (0, 2, 4):
        assert f"evaluated at step {step}/4: forget rate 0.500 [0.250, 0.750]" in err


def test_a_killed_cli_run_resumes_to_the_uninterrupted_weights(minilm, tmp_path):
    """The issue's scenario, with a real SIGKILL: esd-u-1 killed after a checkpoint, then run again."""
    import signal
    import subprocess
    import sys
    import time

    folder = fresh_model(minilm).save(tmp_path / "model")
    options = ["-o", "steps=120", "-o", "batch_size=1", "-o", "ddim_steps=2", "-o", "lr=0.01", "-o", "checkpoint_every=10"]
    command = [sys.executable, "-m", "unrelearn.cli", "unlearn", str(folder), "-m", "esd-u-1", "-c", "circle",
               "--out", str(tmp_path / "killed"), *options]  # fmt: skip
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed.checkpoint"
    deadline = time.monotonic() + 120
    while not (checkpoint / "state.json").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert checkpoint.is_dir() and not (tmp_path / "killed").exists()

    finished = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert finished.returncode == 0, finished.stderr
    assert "resuming at step" in finished.stderr
    record = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert record["resumed_from_step"] >= 10

    overrides = {"steps": 120, "batch_size": 1, "ddim_steps": 2, "lr": 0.01}
    unlearn(DiffusionModel.load(folder), "esd-u-1", "circle", out=tmp_path / "straight", overrides=overrides, progress=False)
    straight, resumed = unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "killed")
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed", "model", "straight"]


def test_options_added_later_leave_a_checkpoints_settings_as_they_were_at_their_defaults():
    """A checkpoint written before an option existed (ResAlign's resilience, DiMUM's mask, the memory
    options) resumes: at its default the option is not part of a checkpoint's settings; set
    otherwise, it is."""
    from dataclasses import fields

    from unrelearn.defences.resalign import ResilienceOptions
    from unrelearn.methods import resolve_method
    from unrelearn.methods.base import _LATER_OPTIONS, OptimizationConfig, _checkpoint_config, build_config
    from unrelearn.methods.dimum import DiMUMConfig

    defaults = {f.name: f.default for cls in (OptimizationConfig, ResilienceOptions, DiMUMConfig) for f in fields(cls)}
    assert all(defaults[name] == value for name, value in _LATER_OPTIONS.items())
    cls, variant = resolve_method("resalign:esd-u-1")
    plain = _checkpoint_config(build_config(cls, "shapes", variant))
    assert not set(_LATER_OPTIONS) & set(plain) and plain["harm"] == "ga"  # harm predates this rule: kept
    changed = _checkpoint_config(build_config(cls, "shapes", variant | {"resilience": "after_ft"}))
    assert changed["resilience"] == "after_ft"
    dimum, _ = resolve_method("dimum")
    assert "mask_fraction" not in _checkpoint_config(build_config(dimum, "digits", {}))
    assert _checkpoint_config(build_config(dimum, "digits", {"mask_fraction": 0.5}))["mask_fraction"] == 0.5
    # SalUn's own mask_fraction (never None) stays in its settings as it always was.
    salun, _ = resolve_method("salun")
    assert _checkpoint_config(build_config(salun, "digits", {}))["mask_fraction"] == 0.5
