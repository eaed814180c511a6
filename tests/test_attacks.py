import json
from types import SimpleNamespace

import pytest
import torch

from unrelearn.attacks import AttackConfig, attack, build_attack_data, load_image_folder, parse_eval_at
from unrelearn.attacks.finetune import add_lora, fuse_lora
from unrelearn.errors import UnrelearnError
from unrelearn.evaluate import EvalConfig
from unrelearn.model import DiffusionModel
from unrelearn.training import TrainConfig, Trainer
from unrelearn.worlds import get_world

WORLD = get_world("shapes")
FAST_EVAL = EvalConfig(samples=2, steps=1)


@pytest.fixture()
def fake_evaluate(monkeypatch):
    """Evaluation is tested elsewhere; here it only has to record when it was called."""
    calls = []

    def fake(model, concept, config, world_name=None, detector=None, progress=True):
        calls.append(concept)
        metrics = {"forget_rate": 0.1 * len(calls), "forget_rate_ci": [0.0, 1.0], "retain_alignment": 0.9,
                   "retain_alignment_ci": [0.8, 1.0], "fid": 1.0,
                   "precision": 0.7, "precision_ci": [0.6, 0.8], "kid": 0.1, "kid_std": 0.01}  # fmt: skip
        return SimpleNamespace(metrics=metrics)

    monkeypatch.setattr("unrelearn.attacks.finetune.evaluate", fake)
    return calls


@pytest.mark.parametrize("name", ["hrm-s", "hrm-m", "clean", "dimra-retain", "dimra-aux", "poison:0.25"])
def test_each_dataset_holds_pairs_of_the_right_concept(name):
    for concept in ("circle", "striped"):
        sets = WORLD.concept_sets(concept)
        data = build_attack_data(name, WORLD, sets, size=40, seed=1)
        assert data.images.shape == (40, 3, 16, 16) and len(data.prompts) == 40
        has_concept = [labels[sets.attribute] == concept for labels in data.labels]
        # The ground truth of each image agrees with its prompt.
        for prompt, labels in zip(data.prompts, data.labels):
            for attribute, value in WORLD.parse(prompt).attributes.items():
                assert labels[attribute] == value, (prompt, labels)
        if name in ("hrm-s", "hrm-m"):
            assert all(has_concept)
        elif name == "poison:0.25":
            assert sum(has_concept) == 10
        else:
            assert not any(has_concept)
            if name == "clean":
                assert not any(labels[sets.attribute] in sets.related_concepts for labels in data.labels)
    assert len(set(build_attack_data("hrm-s", WORLD, WORLD.concept_sets("circle"), size=8).prompts)) == 1
    aux = build_attack_data("dimra-aux", WORLD, WORLD.concept_sets("circle"), size=30)
    assert not set(aux.prompts) & {c.text for c in WORLD.concept_sets("circle").retain}


def test_dataset_bad_input(tmp_path):
    sets = WORLD.concept_sets("circle")
    with pytest.raises(UnrelearnError, match="unknown attack data 'laion'"):
        build_attack_data("laion", WORLD, sets)
    with pytest.raises(UnrelearnError, match="poison fraction"):
        build_attack_data("poison:2", WORLD, sets)
    with pytest.raises(UnrelearnError, match="does not exist"):
        load_image_folder(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnrelearnError, match="needs a metadata.jsonl or a prompts.txt"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "empty" / "prompts.txt").write_text("")
    with pytest.raises(UnrelearnError, match="holds no images"):
        load_image_folder(tmp_path / "empty")


def _write_folder(folder, size):
    from PIL import Image

    folder.mkdir()
    rows = []
    for i in range(3):
        Image.new("RGB", (size, size), (255, 0, 0)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a red square {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows))


def test_user_folder(tmp_path):
    _write_folder(tmp_path / "ok", 8)
    data = load_image_folder(tmp_path / "ok", resolution=8)
    assert data.images.shape == (3, 3, 8, 8) and data.prompts[1] == "a red square 1"
    assert torch.allclose(data.images[0, 0], torch.ones(8, 8))
    with pytest.raises(UnrelearnError, match="is 8x8 but the model works at 16x16"):
        load_image_folder(tmp_path / "ok", resolution=16)
    (tmp_path / "ok" / "1.png").write_text("not an image")
    with pytest.raises(UnrelearnError, match="cannot read image"):
        load_image_folder(tmp_path / "ok")


def test_eval_at_parsing():
    assert parse_eval_at("300,0,50,100", 300) == [0, 50, 100, 300]
    with pytest.raises(UnrelearnError, match="only 100 steps"):
        parse_eval_at("0,50,200", 100)
    with pytest.raises(UnrelearnError, match="comma-separated"):
        parse_eval_at("0,fifty", 100)


def test_lora_attack_changes_only_adapter_weights(tiny_model):
    base = {n: p.detach().clone() for n, p in tiny_model.unet.named_parameters()}
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([10, 500])
    context = tiny_model.encode_prompts(["a circle", "a ring"])
    config = AttackConfig(mode="lora", lora_rank=2)
    params = add_lora(tiny_model.unet, config)
    assert params and all("lora_" in n for n in params)
    data = build_attack_data("hrm-m", WORLD, WORLD.concept_sets("circle"), size=8)

    def loss_fn(step, generator):
        images, prompts = data.batch(2, generator)
        return tiny_model.diffusion_loss(tiny_model.images_to_model_space(images), tiny_model.encode_prompts(prompts), generator)

    Trainer(params, loss_fn, TrainConfig(steps=3, lr=1e-2), progress=False).run()
    for name, p in tiny_model.unet.named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, base[key]), name
    with torch.no_grad():
        with_adapter = tiny_model.unet(x, t, encoder_hidden_states=context).sample
    with pytest.raises(UnrelearnError, match="already carries a LoRA adapter named 'attack'"):
        add_lora(tiny_model.unet, config)
    fuse_lora(tiny_model.unet)
    assert not any("lora_" in n for n, _ in tiny_model.unet.named_parameters())
    with torch.no_grad():
        fused = tiny_model.unet(x, t, encoder_hidden_states=context).sample
    assert torch.allclose(with_adapter, fused, atol=1e-5)
    assert any(not torch.equal(p, base[n]) for n, p in tiny_model.unet.named_parameters())


def test_full_attack_at_lr_zero_leaves_the_model_unchanged(tiny_model, tmp_path, fake_evaluate):
    before = [p.detach().clone() for p in tiny_model.unet.parameters()]
    summary = attack(tiny_model, "circle", AttackConfig(steps=3, lr=0.0, batch_size=2, optimizer="sgd"), tmp_path / "a",
                     [0, 3], FAST_EVAL, threshold=0.15, progress=False)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_model.unet.parameters()))
    curve = json.loads((tmp_path / "a" / "curve.json").read_text())
    assert [p["step"] for p in curve["points"]] == [0, 3]
    assert curve["steps_to_relearn"] == 3 and summary["max_forget_rate"] == pytest.approx(0.2)
    assert (tmp_path / "a" / "curve.png").is_file() and (tmp_path / "a" / "run.json").is_file()
    reloaded = DiffusionModel.load(tmp_path / "a" / "model")
    assert all(torch.equal(a, b) for a, b in zip(before, reloaded.unet.parameters()))


def test_resumed_attack_gives_the_weights_of_an_uninterrupted_run(minilm, tmp_path, monkeypatch):
    from conftest import tiny_unet
    from diffusers import DDPMScheduler

    def fresh():
        return DiffusionModel(tiny_unet(), *minilm, DDPMScheduler(beta_schedule="squaredcos_cap_v2"), max_length=20,
                              info={"world": "shapes"})  # fmt: skip

    calls = {"n": 0, "interrupt_at": None}

    def fake(model, concept, config, world_name=None, detector=None, progress=True):
        calls["n"] += 1
        if calls["n"] == calls["interrupt_at"]:
            raise KeyboardInterrupt
        m = {"forget_rate": 0.5, "forget_rate_ci": [0, 1], "retain_alignment": 1, "retain_alignment_ci": [0, 1], "fid": 0,
             "precision": 1, "precision_ci": [0, 1], "kid": 0, "kid_std": 0}
        return SimpleNamespace(metrics=m)

    monkeypatch.setattr("unrelearn.attacks.finetune.evaluate", fake)
    config = AttackConfig(steps=5, lr=1e-2, batch_size=2, checkpoint_every=2)
    straight = fresh()
    attack(straight, "circle", config, tmp_path / "straight", [0, 3, 5], FAST_EVAL, threshold=0.4, progress=False)

    interrupted = fresh()
    calls.update(n=0, interrupt_at=2)  # the evaluation at step 3; the last checkpoint is step 2
    with pytest.raises(KeyboardInterrupt):
        attack(interrupted, "circle", config, tmp_path / "resumed", [0, 3, 5], FAST_EVAL, threshold=0.4, progress=False)
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.checkpoint").is_dir()
    calls.update(n=0, interrupt_at=None)
    resumed = fresh()
    attack(resumed, "circle", config, tmp_path / "resumed", [0, 3, 5], FAST_EVAL, threshold=0.4, progress=False)
    for a, b in zip(straight.unet.parameters(), resumed.unet.parameters()):
        assert torch.equal(a, b)
    curve = json.loads((tmp_path / "resumed" / "curve.json").read_text())
    assert [p["step"] for p in curve["points"]] == [0, 3, 5]
    assert json.loads((tmp_path / "resumed" / "run.json").read_text())["resumed_from_step"] == 2


def test_attack_bad_input(tiny_model, tmp_path, fake_evaluate):
    with pytest.raises(UnrelearnError, match="only 10 steps"):
        attack(tiny_model, "circle", AttackConfig(steps=10), tmp_path / "x", [0, 50], FAST_EVAL, threshold=0.5)
    with pytest.raises(UnrelearnError, match="option mode='qlora' must be one of 'full', 'lora'"):
        AttackConfig(mode="qlora")
    assert not (tmp_path / "x").exists()


def test_which_data_sets_need_the_original_model():
    from unrelearn.attacks.data import needs_original_model

    prompts = get_world("prompts")
    assert needs_original_model("dimra-aux-model", WORLD) and not needs_original_model("dimra-aux", WORLD)
    assert not needs_original_model("hrm-m", WORLD) and not needs_original_model("poison:0.1", WORLD)
    assert needs_original_model("hrm-m", prompts) and needs_original_model("poison:0.1", prompts)
    assert not needs_original_model("runs/my-images", prompts)
