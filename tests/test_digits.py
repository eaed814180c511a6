"""The `digits` world (real scans, a train / held-out split) and the DiMRA study's methods and metrics."""

from __future__ import annotations

import math

import pytest
import torch

from unrelearn.attacks.data import build_attack_data
from unrelearn.worlds import get_world
from unrelearn.worlds.digits import DIGITS, split_indices

WORLD = get_world("digits")


def _labels_by_image(split: str) -> dict[bytes, set[str]]:
    """Every scan of a split (as bytes) -> its digit(s), to recognise what a render returned."""
    found: dict[bytes, set[str]] = {}
    for digit, members in zip(DIGITS, WORLD._members[split]):
        for index in members.tolist():
            found.setdefault(WORLD._images[index].numpy().tobytes(), set()).add(digit)
    return found


TRAIN, HELDOUT = _labels_by_image("train"), _labels_by_image("heldout")


def _digit_of(image: torch.Tensor, split: dict[bytes, set[str]]) -> str:
    labels = split.get(image.contiguous().numpy().tobytes())
    assert labels is not None and len(labels) == 1, "not a scan of this split"
    return next(iter(labels))


def test_split_is_stratified_disjoint_and_fixed():
    labels = torch.tensor(__import__("sklearn.datasets", fromlist=["load_digits"]).load_digits().target)
    train, heldout = split_indices(labels)
    assert len(train) + len(heldout) == 1797 and not set(train.tolist()) & set(heldout.tolist())
    for digit in range(10):
        members = int((labels == digit).sum())
        assert int((labels[heldout] == digit).sum()) == round(0.2 * members)
    again = split_indices(labels)
    assert torch.equal(train, again[0]) and torch.equal(heldout, again[1])
    assert (WORLD.split_size("train"), WORLD.split_size("heldout")) == (len(train), len(heldout))


def test_images_are_real_scans_upsampled_to_three_equal_channels():
    images, captions = WORLD.training_batch(32, torch.Generator().manual_seed(0))
    assert images.shape == (32, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    for image, caption in zip(images, captions):
        stated = WORLD.parse(caption).attributes.get("digit")
        assert stated in (None, _digit_of(image, TRAIN))


def test_render_draws_the_stated_digit_from_the_requested_split():
    sets = WORLD.concept_sets("seven")
    images, index = WORLD.render(sets.evaluation, torch.Generator().manual_seed(1))
    assert all(_digit_of(image, TRAIN) == "seven" for image in images)
    assert index["digit"].tolist() == [DIGITS.index("seven")] * len(images)
    held, _ = WORLD.render(sets.retain, torch.Generator().manual_seed(1), heldout=True)
    assert all(_digit_of(image, HELDOUT) == c.attributes["digit"] for image, c in zip(held, sets.retain))


def test_training_batch_without_a_class_never_shows_it():
    images, captions = WORLD.training_batch(256, torch.Generator().manual_seed(2), exclude="three")
    assert all(_digit_of(image, TRAIN) != "three" for image in images)
    assert not any(WORLD.parse(c).attributes.get("digit") == "three" for c in captions)


def test_concept_sets():
    sets = WORLD.concept_sets("seven")
    assert sets.alternative == "eight" and WORLD.concept_sets("nine").alternative == "zero"
    for field in ("evaluation", "hrm_s", "hrm_m", "forget"):
        assert all(WORLD.parse(c.text).attributes == {"digit": "seven"} == c.attributes for c in getattr(sets, field))
    retain = [WORLD.parse(c.text).attributes["digit"] for c in sets.retain]
    assert "seven" not in retain and {retain.count(d) for d in set(retain)} == {7} and len(set(retain)) == 9
    # Any prefix of nine retain prompts covers the nine other classes (the evaluation cycles).
    assert len(set(retain[:9])) == 9
    clean = {WORLD.parse(c.text).attributes["digit"] for c in sets.clean}
    assert not clean & ({"seven"} | set(sets.related_concepts))
    assert {WORLD.parse(c.text).attributes["digit"] for c in sets.related} == set(sets.related_concepts) == {"one"}
    assert {c.text for c in sets.hrm_m} <= {c.text for c in sets.evaluation}


def test_parse_reads_words_and_numerals_but_not_other_numbers():
    assert WORLD.parse("the number 7, handwritten").attributes == {"digit": "seven"}
    assert WORLD.parse("a hand-drawn 0").attributes == {"digit": "zero"}
    assert WORLD.parse("a picture of 12").attributes == {}
    assert WORLD.parse("a handwritten digit").attributes == {}


def test_dimra_aux_is_the_held_out_split_without_the_concept():
    sets = WORLD.concept_sets("seven")
    data = build_attack_data("dimra-aux", WORLD, sets, size=64, seed=3)
    digits = [_digit_of(image, HELDOUT) for image in data.images]
    assert "seven" not in digits
    assert [WORLD.parse(p).attributes["digit"] for p in data.prompts] == digits == [row["digit"] for row in data.labels]
    retain = build_attack_data("dimra-retain", WORLD, sets, size=64, seed=3)
    assert all(_digit_of(image, TRAIN) != "seven" for image in retain.images)


def test_unknown_concept_names_the_known_ones():
    from unrelearn.errors import UnrelearnError

    with pytest.raises(UnrelearnError, match="zero, one, two"):
        WORLD.concept_sets("eleven")


def test_shipped_detector_reads_held_out_scans():
    from unrelearn.assets import load_detector

    detector = load_detector("digits")
    images = WORLD._images
    members = WORLD._members["heldout"]
    predicted = detector.predict(torch.cat([images[m] for m in members]))["digit"]
    truth = [d for d, m in zip(DIGITS, members) for _ in range(len(m))]
    accuracy = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    assert accuracy > 0.97, accuracy


# ---------------------------------------------------------------- the study's methods and metrics
@pytest.fixture(scope="module")
def tiny_digits_model():
    from unrelearn.base import new_world_model

    return new_world_model(WORLD, seed=0)


def test_dimum_memorizes_alternative_scans_under_the_forget_prompts(tiny_digits_model):
    from unrelearn.methods.base import build_config, resolve_method

    cls, _ = resolve_method("dimum")
    sets = WORLD.concept_sets("seven")
    config = build_config(cls, "digits", {"images_per_prompt": 3})
    method = cls(tiny_digits_model, sets, config, WORLD)
    captions, images = method.memorized_pairs()
    prompts = {c.text for c in sets.forget + sets.hrm_m}
    assert len(captions) == 3 * len(prompts) and {c.text for c in captions} == prompts
    # Model space is [-1, 1]; every memorized image is a training scan of the next digit.
    assert all(_digit_of((image + 1) / 2, TRAIN) == "eight" for image in images)
    again = cls(tiny_digits_model, sets, config, WORLD).memorized_pairs()[1]
    assert torch.equal(images, again)
    other = cls(tiny_digits_model, sets, build_config(cls, "digits", {"images_per_prompt": 3, "alternative": "two"}), WORLD)
    assert all(_digit_of((image + 1) / 2, TRAIN) == "two" for image in other.memorized_pairs()[1])


def test_dimum_refuses_an_alternative_the_world_lacks(tiny_digits_model):
    from unrelearn.errors import UnrelearnError
    from unrelearn.methods.base import build_config, resolve_method

    cls, _ = resolve_method("dimum")
    for bad, message in (("circle", "not a digit"), ("seven", "must differ")):
        method = cls(tiny_digits_model, WORLD.concept_sets("seven"), build_config(cls, "digits", {"alternative": bad}), WORLD)
        with pytest.raises(UnrelearnError, match=message):
            method.memorized_pairs()


def test_dimum_with_a_saliency_mask_trains_only_salient_weights(tiny_digits_model):
    from unrelearn.errors import UnrelearnError
    from unrelearn.methods import unlearn

    before = {n: p.detach().clone() for n, p in tiny_digits_model.unet.named_parameters()}
    options = {"steps": 2, "batch_size": 2, "images_per_prompt": 1, "lr": 1e-2, "mask_fraction": 0.3}
    unlearn(tiny_digits_model, "dimum", "seven", overrides=options, progress=False)
    changed = sum(int((p != before[n]).sum()) for n, p in tiny_digits_model.unet.named_parameters())
    total = sum(p.numel() for p in tiny_digits_model.unet.parameters())
    # At most the salient 30% move (Adam moves every weight with a nonzero gradient); some do.
    assert 0 < changed <= round(0.3 * total) + 1
    # Without the option every weight can move: the same run changes more than the mask allows.
    for name, p in tiny_digits_model.unet.named_parameters():
        p.data.copy_(before[name])
    unlearn(tiny_digits_model, "dimum", "seven", overrides=options | {"mask_fraction": None}, progress=False)
    assert sum(int((p != before[n]).sum()) for n, p in tiny_digits_model.unet.named_parameters()) > round(0.3 * total) + 1
    with pytest.raises(UnrelearnError, match="meta:dimum: -o mask_fraction"):
        unlearn(tiny_digits_model, "meta:dimum", "seven", overrides=options, progress=False)


def test_adaptive_ascent_weights_by_hand():
    from unrelearn.methods.sfront import adaptive_ascent_weights

    weights = adaptive_ascent_weights(torch.tensor([1.0, 4.0]), power=0.5)
    assert torch.allclose(weights, torch.tensor([4 / 3, 2 / 3]))
    assert torch.equal(adaptive_ascent_weights(torch.tensor([1.0, 4.0, 9.0]), power=0.0), torch.ones(3))


def test_sfront_alternates_ascent_and_descent_with_a_cosine_forget_weight(tiny_digits_model):
    from unrelearn.methods.base import build_config, resolve_method

    cls, _ = resolve_method("sfront")
    config = build_config(cls, "digits", {"steps": 10, "batch_size": 2})
    method = cls(tiny_digits_model, WORLD.concept_sets("seven"), config, WORLD)
    ascent = method.loss(0, torch.Generator().manual_seed(0))
    assert set(ascent) == {"loss", "forget"} and torch.allclose(ascent["loss"], -10.0 * ascent["forget"])
    descent = method.loss(1, torch.Generator().manual_seed(0))
    assert set(descent) == {"loss", "remain"} and torch.equal(descent["loss"], descent["remain"])
    assert method.forget_weight(5) == pytest.approx(5.0) and method.forget_weight(10) == pytest.approx(0.0)


def test_trim_mask_and_connection_sensitivity_by_hand():
    from unrelearn.methods.scissorhands import connection_sensitivity, trim_mask

    sensitivity = connection_sensitivity({"w": torch.tensor([1.0, -5.0, 3.0, 0.5])}, {"w": torch.tensor([0.1, 0.1, -0.3, 0.6])})
    assert torch.allclose(sensitivity["w"], torch.tensor([0.1, 0.5, 0.9, 0.3]))
    assert trim_mask(sensitivity, keep=0.5)["w"].tolist() == [False, True, True, False]
    assert trim_mask(sensitivity, keep=1.0)["w"].tolist() == [False] * 4


def test_scissorhands_reinitialises_exactly_the_trimmed_weights(tiny_digits_model):
    import copy

    from unrelearn.methods.base import build_config, resolve_method

    cls, _ = resolve_method("shs")
    model = copy.deepcopy(tiny_digits_model)
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    options = {"sparsity": 0.99, "batch_size": 2, "reinit": "all"}
    method = cls(model, WORLD.concept_sets("seven"), build_config(cls, "digits", options), WORLD)
    counts = method.trim()
    total = sum(p.numel() for p in before.values())
    assert sum(counts.values()) == total - math.ceil(0.99 * total)
    changed = {n: int((p.detach() != before[n]).sum()) for n, p in model.unet.named_parameters()}
    # Zero-initialised biases that were already zero do not change; nothing outside the mask does.
    assert all(changed[n] <= counts.get(n, 0) for n in changed) and sum(changed.values()) > 0.9 * sum(counts.values())


def test_scissorhands_official_scope_reinitialises_only_the_decoder_self_attention(tiny_digits_model):
    # The official SD code thresholds over the whole UNet but replaces trimmed weights only in
    # attn1 of SD v1's output_blocks.4 and .7: diffusers' up_blocks.1/2.attentions.1 there, the
    # first two up blocks with two attentions here.
    import copy

    from unrelearn.methods.base import build_config, resolve_method
    from unrelearn.methods.scissorhands import official_reinit_pattern

    cls, _ = resolve_method("shs")
    every, official = copy.deepcopy(tiny_digits_model), copy.deepcopy(tiny_digits_model)
    sets, options = WORLD.concept_sets("seven"), {"sparsity": 0.9, "batch_size": 2}
    all_counts = cls(every, sets, build_config(cls, "digits", options | {"reinit": "all"}), WORLD).trim()
    counts = cls(official, sets, build_config(cls, "digits", options), WORLD).trim()
    scope = official_reinit_pattern(official.unet)
    assert counts and all(scope.search(name) and ".attn1." in name for name in counts)
    # Same global threshold: inside the scope exactly the weights "all" trims there.
    assert counts == {name: n for name, n in all_counts.items() if scope.search(name)}
    before = dict(tiny_digits_model.unet.named_parameters())
    changed = [n for n, p in official.unet.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(scope.search(n) for n in changed)
    sd_names = ["up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q.weight",
                "up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_out.0.bias",
                "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_q.weight",
                "up_blocks.3.attentions.1.transformer_blocks.0.attn1.to_q.weight"]  # fmt: skip

    class Block(torch.nn.Module):
        def __init__(self, attentions: int) -> None:
            super().__init__()
            self.attentions = torch.nn.ModuleList(torch.nn.Identity() for _ in range(attentions))

    sd_v1 = torch.nn.Module()
    sd_v1.up_blocks = torch.nn.ModuleList([torch.nn.Module(), Block(3), Block(3), Block(3)])
    assert [bool(official_reinit_pattern(sd_v1).search(n)) for n in sd_names] == [True, True, False, False, False]


def test_alternative_rate_and_max_during_attack_by_hand():
    from unrelearn.metrics import concept_flags, curve_maximum

    class Fixed:
        def predict(self, images):
            return {"digit": ["seven", "eight", "eight", "one"]}

    assert concept_flags(Fixed(), torch.zeros(4, 3, 2, 2), "digit", "eight") == [False, True, True, False]
    curve = [{"step": 0, "forget_rate": 0.0, "forget_rate_ci": [0, 0]},
             {"step": 100, "forget_rate": 0.25, "forget_rate_ci": [0.1, 0.4]},
             {"step": 200, "forget_rate": 0.125, "forget_rate_ci": [0.0, 0.3]}]  # fmt: skip
    assert curve_maximum(curve) == {"step": 100, "value": 0.25, "ci": [0.1, 0.4]}
    assert curve_maximum(curve, after=150) == {"step": 200, "value": 0.125, "ci": [0.0, 0.3]}


@pytest.mark.parametrize("method", ["dimum", "sfront", "shs", "esd-u-1", "salun", "uce"])
def test_every_method_runs_on_digits_unchanged(tiny_digits_model, method, tmp_path):
    """A new world needs no change to the methods: each unlearns a digit, and the attack and the
    evaluation run on the result."""
    import copy

    from unrelearn.attacks.finetune import AttackConfig, attack
    from unrelearn.evaluate import EvalConfig, evaluate
    from unrelearn.methods import unlearn

    model = copy.deepcopy(tiny_digits_model)
    overrides = {} if method == "uce" else {"steps": 2, "batch_size": 2}
    if method == "salun":
        overrides["mask_batches"] = 1
    unlearn(model, method, "seven", overrides=overrides, out=tmp_path / "model", progress=False)
    tiny = EvalConfig(samples=4, quality_samples=4, steps=2, batch_size=4)
    metrics = evaluate(model, "seven", tiny, progress=False).metrics
    assert metrics["world"] == "digits" and 0 <= metrics["alternative_rate"] <= 1 and metrics["alternative"] == "eight"
    assert metrics["protocol"]["alignment_rule"] == "detector's digit all equal the prompt's"
    if method == "dimum":
        curve = attack(model, "seven", AttackConfig(data="dimra-aux", steps=2, batch_size=2, data_size=8),
                       tmp_path / "attack", eval_at=[0, 2], eval_config=tiny, threshold=0.5, progress=False)["points"]  # fmt: skip
        assert [p["step"] for p in curve] == [0, 2] and all("alternative_rate" in p for p in curve)


def _point(step, ar, alternative=None, fid=None):
    return {"step": step, "forget_rate": ar, "forget_rate_ci": [max(0.0, ar - 0.1), min(1.0, ar + 0.1)],
            "retain_alignment": 0.9, "retain_alignment_ci": [0.8, 1.0], "precision": None, "precision_ci": [None, None],
            "fid": fid, "kid": None, "kid_std": None, "alternative_rate": alternative,
            "alternative_rate_ci": None if alternative is None else [alternative - 0.1, alternative + 0.1]}  # fmt: skip


def _cell(label, method, options, data, lr, points, oracle=False):
    from unrelearn.bench.store import CellResult

    attack = {"data": data, "lr": lr, "mode": "full", "optimizer": "adam", "steps": points[-1]["step"], "seed": 0}
    spec = {"contender": {"model": "builtin:digits", "method": method, "options": options, "concept": "seven"},
            "attack": attack, "label": label, "oracle": oracle}  # fmt: skip
    return CellResult(f"{label}-{data}-{lr}", "seven", label, f"{data} lr={lr:g}", 0, spec, {}, points, 1.0, "h")


def test_dimra_table_rows_by_hand(tmp_path):
    from unrelearn.bench.tables import dimra_table

    cells = [
        _cell("dimum-250", "dimum", {"steps": 250}, "dimra-retain", 1e-4,
              [_point(0, 0.0, 0.9, fid=12.0), _point(100, 0.2, 0.7), _point(500, 0.1, 0.6)]),
        _cell("dimum-250", "dimum", {"steps": 250}, "dimra-aux", 1e-4,
              [_point(0, 0.0, 0.9, fid=12.0), _point(100, 0.05, 0.8), _point(500, 0.15, 0.75)]),
        # A second attack setting: the table keeps the worst case.
        _cell("dimum-250", "dimum", {"steps": 250}, "dimra-aux", 1e-3,
              [_point(0, 0.0, 0.9, fid=12.0), _point(100, 0.3, 0.5), _point(500, 0.25, 0.4)]),
        _cell("salun", "salun", {}, "dimra-retain", 1e-4, [_point(0, 0.05, 0.8, fid=20.0), _point(500, 0.6, 0.1)]),
        _cell("oracle", None, {}, "dimra-retain", 1e-4, [_point(0, 0.02, 0.1, fid=10.0), _point(500, 0.03, 0.1)], oracle=True),
        _cell("salun", "salun", {}, "hrm-m", 1e-4, [_point(0, 0.05), _point(500, 1.0)]),  # not a DiMRA attack
        # The same method and length saving its weights' EMA: a row of its own, told apart by ema_decay.
        _cell("dimum-250-ema", "dimum", {"steps": 250, "ema_decay": 0.98}, "dimra-aux", 1e-4,
              [_point(0, 0.0, 0.9, fid=11.0), _point(500, 0.05, 0.85)]),
    ]  # fmt: skip
    table = dimra_table(cells, "made by hand")
    rows = {r["label"]: r for r in table.rows}
    assert set(rows) == {"dimum-250", "dimum-250-ema", "salun", "oracle"}
    assert (rows["dimum-250-ema"]["method"], rows["dimum-250-ema"]["unlearn_steps"]) == ("dimum", 250)
    assert (rows["dimum-250-ema"]["ema_decay"], rows["dimum-250"]["ema_decay"], rows["oracle"]["ema_decay"]) == (0.98, None, None)
    dimum = rows["dimum-250"]
    assert (dimum["method"], dimum["unlearn_steps"], dimum["fid"], dimum["ar"], dimum["alternative_rate"]) == ("dimum", 250, 12.0, 0.0, 0.9)
    assert (dimum["max_ar_dimra_retain"], dimum["max_ar_dimra_retain_step"]) == (0.2, 100)
    assert (dimum["max_ar_dimra_heldout"], dimum["max_ar_dimra_heldout_step"]) == (0.3, 100)
    assert dimum["max_ar_dimra_heldout_attack"] == "dimra-aux lr=0.001" and dimum["alternative_rate_after_dimra_heldout"] == 0.4
    # The embedded default length where the contender sets none (SalUn: 200 steps on the embedded world).
    assert rows["salun"]["unlearn_steps"] == 200 and rows["salun"]["max_ar_dimra_retain"] == 0.6
    assert "max_ar_dimra_heldout" not in rows["salun"]
    assert (rows["oracle"]["method"], rows["oracle"]["unlearn_steps"]) == ("oracle", None)
    assert "| seven | dimum-250 | 250 | 12.0 | n/a | 0.000 [0.000, 0.100] | 0.900 [0.800, 1.000] | 0.200 [0.100, 0.300] (100) |" in table.markdown
    cells[0].points[0] |= {"kid": 0.01234, "kid_std": 0.00321}
    assert "| seven | dimum-250 | 250 | 12.0 | 0.0123 ± 0.0032 | 0.000 [0.000, 0.100] |" in dimra_table(cells, "made by hand").markdown
    assert len(table.curves) == 3 and all(set(c[1]) <= set(rows) for c in table.curves.values())

