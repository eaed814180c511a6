"""The shipped base model: loads offline, is deterministic, and is a trained model."""

import pytest

from unrelearn.assets import builtin_models, load_model
from unrelearn.evaluate import EvalConfig, evaluate


@pytest.fixture(scope="module")
def base():
    return load_model("builtin:shapes")


def test_builtin_models_are_listed():
    oracles = {"shapes-oracle-circle": ("shapes", "circle"), "shapes-oracle-striped": ("shapes", "striped"),
               "digits-oracle-seven": ("digits", "seven"), "digits-oracle-zero": ("digits", "zero"),
               "digits-oracle-four": ("digits", "four")}  # fmt: skip
    assert {"shapes", "digits", *oracles} <= set(builtin_models())
    for name, (world, concept) in oracles.items():
        oracle = load_model(f"builtin:{name}")
        assert (oracle.world, oracle.info["excluded_concept"], oracle.guidance) == (world, concept, 1.5), name


def test_style_oracle_never_draws_its_style_but_draws_the_rest():
    # The striped oracle never saw a striped render: asked for stripes it draws another texture.
    # Measured on these 32 samples: forget rate 0.00 (the base model's: 1.00), alignment 0.94.
    oracle = load_model("builtin:shapes-oracle-striped")
    metrics = evaluate(oracle, "striped", EvalConfig(samples=32, seed=0), progress=False).metrics
    assert metrics["forget_rate"] <= 0.1, metrics
    assert metrics["retain_alignment"] >= 0.75, metrics


def test_evaluation_is_deterministic(base):
    config = EvalConfig(samples=8, steps=8, seed=3)
    first = evaluate(base, "circle", config, progress=False).metrics
    second = evaluate(base, "circle", config, progress=False).metrics
    for key in ("forget_rate", "forget_rate_ci", "retain_alignment", "fid", "retain_attribute_accuracy", "precision",
                "precision_ci", "manifold_distance", "manifold_distance_ci", "kid", "kid_std"):
        assert first[key] == second[key], key
    lo, hi = first["precision_ci"]
    assert 0 <= lo <= first["precision"] <= hi <= 1
    lo, hi = first["manifold_distance_ci"]
    assert 0 < lo <= first["manifold_distance"] <= hi


def test_base_model_generates_what_it_is_asked_for(base):
    # The shipped model measures forget rate 1.0 and alignment 0.91 on these 32 samples (0.98
    # and 0.92 on 128, docs/results.md); the floors leave room for other CPUs' rounding, far above chance
    # (1/6 for a shape, 1/90 for shape + colour + texture).
    metrics = evaluate(base, "circle", EvalConfig(samples=32, seed=0), progress=False).metrics
    assert metrics["protocol"]["guidance"] == base.guidance == 1.5
    assert metrics["forget_rate"] >= 0.8, metrics
    for attribute in ("shape", "colour", "texture"):
        assert metrics["retain_attribute_accuracy"][attribute] >= 0.8, metrics
    assert metrics["retain_alignment"] >= 0.75, metrics


def test_digits_model_writes_the_digit_it_is_asked_for():
    # The shipped digits model measures AR 0.97 and alignment 0.98 for seven on 128 samples
    # (docs/results.md); the floors leave room for other CPUs' rounding, far above chance (1/10).
    digits = load_model("builtin:digits")
    assert digits.world == "digits" and digits.guidance == 1.5
    metrics = evaluate(digits, "seven", EvalConfig(samples=32, seed=0), progress=False).metrics
    assert metrics["forget_rate"] >= 0.8, metrics
    assert metrics["retain_alignment"] >= 0.8, metrics
    assert metrics["alternative_rate"] <= 0.1, metrics
