"""Meta-Unlearning as a wrapper: exact meta-gradients against finite differences, the
first-order mode against the exact one where they must agree, and gamma2 = 0 as the base."""

import pytest
import torch
from conftest import interrupted_after_first_checkpoint, tiny_unet
from diffusers import DDPMScheduler

from unrelearn.errors import UnrelearnError
from unrelearn.methods import resolve_method, unlearn
from unrelearn.model import DiffusionModel
from unrelearn.worlds import get_world

WORLD = get_world("shapes")
FAST_ESD = {"steps": 3, "batch_size": 2, "ddim_steps": 4, "lr": 1e-2}
FAST_META = {"inner_batch_size": 2, "inner_lr": 1e-2}


def fresh_model(minilm) -> DiffusionModel:
    return DiffusionModel(tiny_unet(), *minilm, DDPMScheduler(beta_schedule="squaredcos_cap_v2"), max_length=20,
                          info={"world": "shapes"})  # fmt: skip


def test_gamma2_zero_is_the_base_method_bit_for_bit(minilm):
    base, meta = fresh_model(minilm), fresh_model(minilm)
    unlearn(base, "esd-u-1", "circle", overrides=FAST_ESD, progress=False)
    record = unlearn(meta, "meta:esd-u-1", "circle", overrides=FAST_ESD | FAST_META | {"gamma2": 0.0}, progress=False)
    assert record["config"]["gamma2"] == 0.0
    for (name, p), q in zip(base.unet.named_parameters(), meta.unet.parameters()):
        assert torch.equal(p, q), name


def _float64_method(minilm, **options):
    model = fresh_model(minilm)
    model.unet.double()
    encode = model.encode_prompts  # the MiniLM fixture is shared: cast its output, not the encoder
    model.encode_prompts = lambda prompts: encode(prompts).double()
    cls, variant = resolve_method("meta:esd-x-1")
    method = cls(model, WORLD.concept_sets("circle"), cls.Config(**(variant | FAST_ESD | FAST_META | options)), WORLD)
    images = method.images
    method.images = lambda captions, generator: images(captions, generator).double()
    return method


def _meta_loss(method, seed: int) -> dict:
    from unrelearn.defences.meta import meta_terms

    return meta_terms(method, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("inner_optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_exact_meta_gradient_equals_finite_differences(minilm, monkeypatch, inner_optimizer, inner_steps):
    # Adam's first step is lr * g / (|g| + eps): with eps = 1e-8 a central difference of width
    # 1e-6 jumps across that kink for every near-zero gradient entry (measured, M = 1: analytic
    # 0.0451321, difference 0.0597 at h = 1e-6, 0.0451335 at h = 1e-8). A larger eps makes the
    # map smooth at the difference's scale; the graph through Adam's moments and bias
    # corrections is the same.
    from functools import partial

    from unrelearn.defences import meta
    from unrelearn.finetuning import Adam

    monkeypatch.setattr(meta, "Adam", partial(Adam, eps=1e-3))
    method = _float64_method(minilm, inner_steps=inner_steps, inner_optimizer=inner_optimizer, inner_lr=0.05)
    params = method.parameters()
    grads = torch.autograd.grad(_meta_loss(method, 3)["differentiable"], list(params.values()))
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        direction = {n: torch.randn(p.shape, generator=generator, dtype=torch.float64) for n, p in params.items()}
        h = 1e-6
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                for n, p in params.items():
                    p.add_(sign * h * direction[n])
            values.append(float(_meta_loss(method, 3)["differentiable"].detach()))
            with torch.no_grad():
                for n, p in params.items():
                    p.sub_(sign * h * direction[n])
        numeric = (values[0] - values[1]) / (2 * h)
        analytic = float(sum((g * direction[n]).sum() for n, g in zip(params, grads)))
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def _total_gradient(method, seed: int) -> dict[str, torch.Tensor]:
    terms = _meta_loss(method, seed)
    params = method.parameters()
    grads = dict(zip(params, torch.autograd.grad(terms["differentiable"], list(params.values()), allow_unused=True)))
    grads = {n: torch.zeros_like(params[n]) if g is None else g for n, g in grads.items()}
    for name, g in (terms["grads"] or {}).items():
        grads[name] = grads[name] + g
    return grads


def test_first_order_equals_exact_when_the_inner_step_does_not_move(minilm):
    """At inner lr 0, theta_FT = theta: both modes give -grad L_DM(theta; D_FT)."""
    exact = _total_gradient(_float64_method(minilm, inner_lr=0.0, meta_grad="exact"), 5)
    first = _total_gradient(_float64_method(minilm, inner_lr=0.0, meta_grad="first-order"), 5)
    for name in exact:
        assert torch.allclose(exact[name], first[name], rtol=1e-9, atol=1e-12), name
    # ... and they part once the attacker moves: the second-order terms are what first-order drops.
    exact = _total_gradient(_float64_method(minilm, inner_lr=0.5, meta_grad="exact"), 5)
    first = _total_gradient(_float64_method(minilm, inner_lr=0.5, meta_grad="first-order"), 5)
    assert any(not torch.allclose(exact[n], first[n], rtol=1e-6) for n in exact)


@pytest.mark.parametrize("mode", ["exact", "first-order"])
def test_meta_run_logs_the_self_destruction_signal_and_resumes_exactly(minilm, tmp_path, monkeypatch, mode):
    import json

    from safetensors.torch import load_file


    options = FAST_ESD | FAST_META | {"meta_grad": mode, "inner_steps": 2, "checkpoint_every": 1}
    record = unlearn(fresh_model(minilm), "meta:esd-u-1", "circle", out=tmp_path / "a", overrides=options, progress=False)
    for key in ("cos_ft_retain", "inner_first", "inner_last", "meta", "unlearn"):
        assert key in record["final_losses"], key
    assert -1 <= record["final_losses"]["cos_ft_retain"] <= 1
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert [row["step"] for row in run["loss_curve"]] == [0, 1, 2] and "cos_ft_retain" in run["loss_curve"][0]
    assert (tmp_path / "a" / "training.png").read_bytes().startswith(b"\x89PNG")
    with interrupted_after_first_checkpoint(monkeypatch):
        unlearn(fresh_model(minilm), "meta:esd-u-1", "circle", out=tmp_path / "b", overrides=options, progress=False)
    unlearn(fresh_model(minilm), "meta:esd-u-1", "circle", out=tmp_path / "b", overrides=options, progress=False)
    a, b = (load_file(str(tmp_path / n / "unet" / "diffusion_pytorch_model.safetensors")) for n in "ab")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert json.loads((tmp_path / "b" / "run.json").read_text())["resumed_from_step"] == 1


@pytest.mark.parametrize(
    "method, options, fragment",
    [
        ("meta:esd-u-1", {"gamma2": -1}, "gamma2"),
        ("meta:esd-u-1", {"inner_steps": 0}, "inner_steps"),
        ("meta:esd-u-1", {"retain_set": "skin"}, "retain_set"),
        ("meta:esd-u-1", {"meta_grad": "second"}, "meta_grad"),
        ("meta:uce", {"steps": 0}, "steps"),
        ("meta:salun", {}, "masks gradients"),
        ("meta:nope", {}, "unknown method 'nope'"),
        ("antidote:esd-u-1", {}, "unknown defence 'antidote'"),
    ],
)
def test_bad_meta_requests(minilm, method, options, fragment):
    with pytest.raises(UnrelearnError, match=fragment):
        unlearn(fresh_model(minilm), method, "circle", overrides=options, progress=False)


@pytest.mark.parametrize("method", ["meta:uce", "meta:rece"])
def test_closed_form_methods_get_a_meta_second_stage(minilm, method):
    """gamma2 = 0: the stage leaves the closed-form result as it is; gamma2 > 0 moves only its scope."""
    closed, staged = fresh_model(minilm), fresh_model(minilm)
    unlearn(closed, method.split(":")[1], "circle", progress=False)
    record = unlearn(staged, method, "circle", overrides={"steps": 2, "gamma2": 0.0} | FAST_META, progress=False)
    assert record["stats"] and "cos_ft_retain" in record["final_losses"]
    assert all(torch.equal(p, q) for p, q in zip(closed.unet.parameters(), staged.unet.parameters()))

    moved = fresh_model(minilm)
    unlearn(moved, method, "circle", overrides={"steps": 2, "gamma2": 1.0, "lr": 1e-2} | FAST_META, progress=False)
    changed = {n for (n, p), q in zip(moved.unet.named_parameters(), closed.unet.parameters()) if not torch.equal(p, q)}
    assert changed and all(".attn2." in n for n in changed)


def test_gradient_checkpointing_keeps_the_exact_meta_gradient(minilm):
    """Recomputing activations in the backward pass (the memory option for large UNets) must not
    change the exact meta-gradient, whose double backward runs through the checkpoints."""
    plain = _float64_method(minilm, inner_steps=2, inner_lr=0.05, meta_grad="exact")
    checkpointed = _float64_method(minilm, inner_steps=2, inner_lr=0.05, meta_grad="exact")
    checkpointed.model.unet.enable_gradient_checkpointing()
    checkpointed.model.unet.train()
    plain.model.unet.train()
    from unrelearn.model import differentiable_attention

    expected = _total_gradient(plain, 7)
    with differentiable_attention():  # as unlearn() runs a checkpointed exact meta run
        found = _total_gradient(checkpointed, 7)
    assert any(g.abs().max() > 0 for g in expected.values())
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=1e-10, atol=1e-13)


def test_memory_options_of_a_meta_run(minilm):
    """gradient_checkpointing leaves the run's weights as they are without it (up to rounding); bf16 autocast
    trains too (its weights move differently) and both are recorded."""
    runs = {}
    for name, options in {"plain": {}, "checkpointed": {"gradient_checkpointing": True}, "bf16": {"mixed_precision": "bf16"}}.items():
        model = fresh_model(minilm)
        # SGD: an update proportional to the gradient, so rounding stays rounding (Adam turns a
        # near-zero entry's sign into a full step).
        record = unlearn(model, "meta:esd-u-1", "circle", overrides=FAST_ESD | FAST_META | {"optimizer": "sgd"} | options,
                         progress=False)  # fmt: skip
        assert all(torch.isfinite(torch.tensor(row["loss"])) for row in record["loss_curve"])
        assert not model.unet.is_gradient_checkpointing  # switched off again after training
        runs[name] = (record, dict(model.unet.named_parameters()))
    assert runs["checkpointed"][0]["config"]["gradient_checkpointing"] is True
    assert runs["bf16"][0]["config"]["mixed_precision"] == "bf16"
    # Not bit for bit: the checkpointed exact run computes attention with the math kernel
    # throughout (see unlearn()), the plain one outside the inner loop with torch's default.
    for name, p in runs["plain"][1].items():
        torch.testing.assert_close(runs["checkpointed"][1][name], p, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(runs["bf16"][1][n], p) for n, p in runs["plain"][1].items())
