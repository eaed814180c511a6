"""ResAlign's hypergradient against exact oracles (finite differences, direct solves, a proximal
point known in closed form), its solves reported and never hidden, and beta = 0 as the base."""

import re

import pytest
import torch
from conftest import interrupted_after_first_checkpoint, tiny_unet
from diffusers import DDPMScheduler

from unrelearn.defences.implicit import HessianOperator, richardson_solve
from unrelearn.errors import UnrelearnError
from unrelearn.methods import unlearn
from unrelearn.model import DiffusionModel, differentiable_attention

FAST_RESILIENCE = {"configs_per_step": 2, "ft_steps": [2, 3], "ft_data_size": 8, "harm_batch_size": 2,
                   "ft_batch_size": 2, "solve_iterations": 3}  # fmt: skip
FAST_ESD = {"steps": 3, "batch_size": 2, "ddim_steps": 4, "lr": 1e-2}


def fresh_model(minilm) -> DiffusionModel:
    return DiffusionModel(tiny_unet(), *minilm, DDPMScheduler(beta_schedule="squaredcos_cap_v2"), max_length=20,
                          info={"world": "shapes"})  # fmt: skip


def _flat(params: dict) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


def _quadratic(eigenvalues: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric matrix with the given spectrum, and the centre of ``0.5 (t - c)^T A (t - c)``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    return a, torch.randn(len(eigenvalues), generator=g, dtype=torch.float64)


def _quadratic_hessian(a: torch.Tensor, c: torch.Tensor, at: torch.Tensor) -> HessianOperator:
    return HessianOperator(lambda p: 0.5 * (p["t"] - c) @ a @ (p["t"] - c), {"t": at})


def test_hessian_vector_product_equals_finite_differences_of_gradients_on_the_unet(minilm):
    model = fresh_model(minilm)
    model.unet.double()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    context = model.encode_prompts(["a red circle", "a blue square"]).double()
    params = {n: p.detach() for n, p in model.unet.named_parameters() if ".attn2." in n or "conv_in" in n}

    def loss(p):
        return model.diffusion_loss(x0, context, torch.Generator().manual_seed(1), params=p)

    def gradient(p):
        leaves = {n: v.detach().requires_grad_(True) for n, v in p.items()}
        return _flat(dict(zip(leaves, torch.autograd.grad(loss(leaves), list(leaves.values())))))

    v = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()}
    with differentiable_attention():
        hv = _flat(HessianOperator(loss, params)(v))
        eps = 1e-5
        plus = gradient({n: p + eps * v[n] for n, p in params.items()})
        minus = gradient({n: p - eps * v[n] for n, p in params.items()})
    finite = (plus - minus) / (2 * eps)
    assert hv.norm() > 0
    assert float((hv - finite).norm() / finite.norm()) < 1e-6  # a wrong product is off by O(1)


def test_richardson_solve_equals_a_direct_solve_on_a_quadratic():
    a, c = _quadratic([0.1, 1.0, 3.0, 5.0, 8.0])
    gamma = 0.1  # gamma * lambda_max = 0.8 < 1: plain Richardson converges
    b = {"t": torch.randn(5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)}
    solve = richardson_solve(_quadratic_hessian(a, c, c), b, gamma, iterations=200, tolerance=1e-10)
    direct = torch.linalg.solve(torch.eye(5, dtype=torch.float64) + gamma * a, b["t"])
    assert solve.converged and solve.dampings == 0
    assert torch.allclose(solve.x["t"], direct, rtol=1e-9)
    assert solve.residuals[0] > solve.residuals[-1]  # the first iterate is b itself


def test_a_growing_residual_damps_the_step_and_still_converges():
    a, c = _quadratic([0.5, 2.0, 30.0])
    gamma = 0.1  # gamma * lambda_max = 3: the plain iteration diverges
    b = {"t": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}
    plain = richardson_solve(_quadratic_hessian(a, c, c), b, gamma, iterations=1, tolerance=0.1)
    assert plain.dampings == 1 and plain.residual == plain.residuals[0]  # the overshooting step is undone
    solve = richardson_solve(_quadratic_hessian(a, c, c), b, gamma, iterations=300, tolerance=1e-8)
    direct = torch.linalg.solve(torch.eye(3, dtype=torch.float64) + gamma * a, b["t"])
    assert solve.converged and solve.dampings >= 1 and solve.step_size < 1
    assert torch.allclose(solve.x["t"], direct, rtol=1e-6)


def test_an_indefinite_system_is_reported_as_unconverged_not_replaced():
    a, c = _quadratic([-50.0, 1.0, 2.0])
    gamma = 0.1  # 1 + gamma * lambda = -4 < 0: no step size makes Richardson converge
    b = {"t": torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)}
    solve = richardson_solve(_quadratic_hessian(a, c, c), b, gamma, iterations=20, tolerance=0.1)
    assert not solve.converged
    assert solve.residual > 0.1


def test_richardson_solve_equals_a_direct_solve_on_a_tiny_network():
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
    inputs, targets = torch.randn(32, 8, generator=g, dtype=torch.float64), torch.randn(32, 4, generator=g, dtype=torch.float64)
    params = {n: p.detach() for n, p in net.named_parameters()}
    shapes = {n: p.shape for n, p in params.items()}

    def loss(p):
        return ((torch.func.functional_call(net, p, (inputs,)) - targets) ** 2).mean()

    def unflatten(flat):
        out, i = {}, 0
        for n, shape in shapes.items():
            out[n] = flat[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return out

    dense = torch.autograd.functional.hessian(lambda flat: loss(unflatten(flat)), _flat(params))
    assert dense.shape[0] == 212
    gamma = 0.5 / float(torch.linalg.eigvalsh(dense).abs().max())
    b = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    solve = richardson_solve(HessianOperator(loss, params), b, gamma, iterations=80, tolerance=1e-10)
    direct = torch.linalg.solve(torch.eye(dense.shape[0], dtype=torch.float64) + gamma * dense, _flat(b))
    assert solve.converged
    assert torch.allclose(_flat(solve.x), direct, rtol=1e-8, atol=1e-12)


def test_hypergradient_equals_finite_differences_through_a_closed_form_proximal_point():
    """L_FT quadratic: theta_FT*(theta) = (I + gamma A)^-1 (theta + gamma A c) exactly, so the
    implicit hypergradient of a nonlinear L_harm(theta_FT*) can be checked against a finite
    difference of the composed function."""
    a, c = _quadratic([0.2, 1.0, 2.5, 4.0])
    gamma = 0.15
    eye = torch.eye(4, dtype=torch.float64)

    def proximal_point(theta):
        return torch.linalg.solve(eye + gamma * a, theta + gamma * a @ c)

    def harm(t):
        return torch.sin(t).sum() + 0.3 * (t**3).sum()

    theta = torch.tensor([0.3, -0.7, 1.1, 0.2], dtype=torch.float64)
    at_ft = proximal_point(theta).requires_grad_(True)
    b = {"t": torch.autograd.grad(harm(at_ft), at_ft)[0]}
    solve = richardson_solve(_quadratic_hessian(a, c, at_ft.detach()), b, gamma, iterations=100, tolerance=1e-12)
    for seed in range(3):
        direction = torch.randn(4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        eps = 1e-6
        finite = (harm(proximal_point(theta + eps * direction)) - harm(proximal_point(theta - eps * direction))) / (2 * eps)
        assert float(solve.x["t"] @ direction) == pytest.approx(float(finite), rel=1e-7)


def test_beta_zero_is_the_base_method_bit_for_bit(minilm):
    base, wrapped = fresh_model(minilm), fresh_model(minilm)
    unlearn(base, "esd-u-1", "circle", overrides=FAST_ESD, progress=False)
    unlearn(wrapped, "resalign:esd-u-1", "circle", overrides=FAST_ESD | FAST_RESILIENCE | {"beta": 0.0}, progress=False)
    for (name, p), q in zip(base.unet.named_parameters(), wrapped.unet.parameters()):
        assert torch.equal(p, q), name


def test_harm_method_without_fine_tuning_cancels_to_the_base_method(minilm):
    """harm=method: L_harm is ESD's own loss on one draw. A simulated fine-tuning at lr 0 leaves
    theta_FT* = theta and, with no Richardson iteration, the hypergradient is grad L_harm(theta),
    so beta [L_harm(theta_FT*) - L_harm(theta)] contributes nothing (up to rounding: the two
    halves are differentiated apart). SGD keeps that rounding from being amplified."""
    sgd = FAST_ESD | {"optimizer": "sgd", "lr": 1e-1}
    base, wrapped, moved = fresh_model(minilm), fresh_model(minilm), fresh_model(minilm)
    initial = [p.detach().clone() for p in base.unet.parameters()]
    unlearn(base, "esd-u-1", "circle", overrides=sgd, progress=False)
    no_fine_tuning = FAST_RESILIENCE | {"harm": "method", "ft_lrs": [0.0], "solve_iterations": 0, "beta": 0.8}
    record = unlearn(wrapped, "resalign:esd-u-1", "circle", overrides=sgd | no_fine_tuning, progress=False)
    assert record["solves"]["attempted"] == 3 * FAST_RESILIENCE["configs_per_step"]
    assert record["final_losses"]["harm"] > 0  # L_harm is ESD's loss itself, minimized, not its negative
    largest_step = max((p - q).abs().max() for p, q in zip(base.unet.parameters(), initial))
    assert largest_step > 1e-3
    for (name, p), q in zip(base.unet.named_parameters(), wrapped.unet.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)
    # With fine-tuning the term acts: the weights differ from ESD-u-1's.
    unlearn(moved, "resalign:esd-u-1", "circle", overrides=sgd | no_fine_tuning | {"ft_lrs": [1e-1]}, progress=False)
    assert max((p - q).abs().max() for p, q in zip(base.unet.parameters(), moved.unet.parameters())) > 1e-4


def test_resilience_after_ft_adds_beta_times_the_hypergradient_without_the_theta_half(minilm):
    """Without fine-tuning (lr 0, no Richardson iteration) the hypergradient is grad L_harm(theta):
    "difference" cancels it (ESD-u-1, test above) and "after_ft" keeps it, so one SGD step moves
    the weights away from ESD-u-1's by exactly beta times one fixed vector."""
    one_step = FAST_ESD | {"optimizer": "sgd", "lr": 1e-1, "steps": 1}
    no_fine_tuning = FAST_RESILIENCE | {"harm": "method", "ft_lrs": [0.0], "solve_iterations": 0}
    base = fresh_model(minilm)
    unlearn(base, "esd-u-1", "circle", overrides=one_step, progress=False)
    moved = {}
    for beta in (0.4, 0.8):
        model = fresh_model(minilm)
        record = unlearn(model, "resalign:esd-u-1", "circle", progress=False,
                         overrides=one_step | no_fine_tuning | {"beta": beta, "resilience": "after_ft"})  # fmt: skip
        assert record["final_losses"]["resilience"] == pytest.approx(beta * record["final_losses"]["harm_after_ft"])
        moved[beta] = [q - p for p, q in zip(base.unet.parameters(), model.unet.parameters())]
    assert max(d.abs().max() for d in moved[0.4]) > 1e-4
    for half, full in zip(moved[0.4], moved[0.8]):
        torch.testing.assert_close(full, 2 * half, rtol=0, atol=1e-6)


def test_closed_form_stage_with_beta_and_alpha_zero_is_the_edit_bit_for_bit(minilm):
    base, wrapped = fresh_model(minilm), fresh_model(minilm)
    unlearn(base, "uce", "circle", progress=False)
    record = unlearn(wrapped, "resalign:uce", "circle", overrides={"steps": 2, "beta": 0.0, "alpha": 0.0} | FAST_RESILIENCE,
                     progress=False)  # fmt: skip
    assert record["stats"]  # the edit's statistics are kept
    for (name, p), q in zip(base.unet.named_parameters(), wrapped.unet.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    ("method", "own"),
    [("resalign", {}), ("resalign", {"parametrization": "scope", "scope": "x"}), ("resalign:esd-u-1", {}), ("resalign:uce", {})],
)
def test_every_shape_trains_and_reports_its_solves(minilm, method, own):
    options = FAST_RESILIENCE | own | {"ft_modes": ["full", "lora"], "configs_per_step": 3}
    options |= {"steps": 2} if method != "resalign:esd-u-1" else FAST_ESD | {"steps": 2}
    model = fresh_model(minilm)
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    record = unlearn(model, method, "circle", overrides=options, progress=False)
    assert record["solves"] == {"attempted": 6, "failed": 0}
    last = record["loss_curve"][-1]
    for key in ("harm", "harm_after_ft", "solve_residual", "solve_dampings", "solves_failed", "hypergrad_norm"):
        assert key in last, key
    assert last["hypergrad_norm"] > 0
    assert any(not torch.equal(before[n], p) for n, p in model.unet.named_parameters())


def test_a_run_whose_solves_mostly_fail_stops_with_a_clear_error(minilm):
    options = FAST_RESILIENCE | {"steps": 4, "configs_per_step": 5, "ft_steps": [1], "gamma": 1e6, "solve_iterations": 1,
                                 "ft_lrs": [1e-2]}  # fmt: skip
    with pytest.raises(UnrelearnError, match=r"hypergradient solves did not reach residual 0\.1.*lower gamma") as stopped:
        unlearn(fresh_model(minilm), "resalign", "circle", overrides=options | {"batch_size": 2}, progress=False)
    # The residuals it saw are in the message: a stopped run leaves no log to read them from.
    low, high, median, halved = re.search(r"residuals (\S+) to (\S+), median (\S+); step size halved (\d+) times",
                                          str(stopped.value)).groups()  # fmt: skip
    assert 0.1 < float(low) <= float(median) <= float(high) and int(halved) >= 1


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("resalign", {"ft_lrs": []}, "option ft_lrs is empty"),
        ("resalign", {"ft_modes": ["qlora"]}, "ft_modes"),
        ("resalign", {"solve_tolerance": 0}, "solve_tolerance"),
        ("resalign", {"ft_data": ["nonsense"]}, "unknown attack data 'nonsense'"),
        ("resalign:salun", {}, "masks gradients"),
        ("resalign:resalign", {}, "already has the resilience term"),
        ("resalign", {"harm": "method"}, "harm=method needs a wrapped method"),
        ("resalign:uce", {"harm": "method"}, "harm=method needs a wrapped method"),
        ("resalign:esd-u-1", {"harm": "esd"}, "harm"),
    ],
)
def test_bad_requests_end_with_one_clear_line(minilm, method, options, message):
    with pytest.raises(UnrelearnError, match=message):
        unlearn(fresh_model(minilm), method, "circle", overrides=FAST_RESILIENCE | {"steps": 1} | options, progress=False)


def test_lora_parametrization_trains_an_adapter_and_saves_a_plain_merged_unet(minilm, tmp_path):
    model = fresh_model(minilm)
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    options = FAST_RESILIENCE | {"steps": 2, "batch_size": 2, "lr": 1e-2, "parametrization": "lora", "ft_modes": ["full", "lora"]}
    record = unlearn(model, "resalign", "circle", out=tmp_path / "r", overrides=options, progress=False)
    assert record["trained_parameters"] < sum(p.numel() for p in before.values()) / 4
    saved = DiffusionModel.load(tmp_path / "r")
    names = [n for n, _ in saved.unet.named_parameters()]
    assert names == list(before) and not any("lora" in n for n in names)
    after = dict(saved.unet.named_parameters())
    changed = {n for n in names if not torch.equal(before[n], after[n])}
    assert changed and all(n.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")) for n in changed)


def test_lora_parametrization_resumes_bit_for_bit(minilm, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    options = FAST_RESILIENCE | {"steps": 4, "batch_size": 2, "lr": 1e-2, "parametrization": "lora", "checkpoint_every": 2}
    unlearn(fresh_model(minilm), "resalign", "circle", out=tmp_path / "straight", overrides=options, progress=False)
    with interrupted_after_first_checkpoint(monkeypatch):
        unlearn(fresh_model(minilm), "resalign", "circle", out=tmp_path / "resumed", overrides=options, progress=False)
    record = unlearn(fresh_model(minilm), "resalign", "circle", out=tmp_path / "resumed", overrides=options, progress=False)
    assert record["resumed_from_step"] == 2
    weights = [load_file(str(tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors")) for name in ("straight", "resumed")]
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
