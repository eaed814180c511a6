"""The shared fine-tuning step: functional optimizers equal torch.optim step for step, and a
simulated fine-tuning is differentiable through its steps."""

import pytest
import torch

from unrelearn.finetuning import SGD, Adam, FineTuning, fine_tune, functional_optimizer


def _problem():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2)).double()
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)

    def loss(params, step):
        out = torch.func.functional_call(net, params, (x[step % 4 :: 4],))
        return ((out - y[step % 4 :: 4]) ** 2).mean()

    return net, loss


@pytest.mark.parametrize(
    "functional, reference",
    [
        (SGD(0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
        (SGD(0.1, momentum=0.9, weight_decay=0.01), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01)),
        (Adam(0.01), lambda p: torch.optim.Adam(p, lr=0.01)),
        (Adam(0.01, weight_decay=0.1), lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1)),
        (Adam(0.01, weight_decay=0.1, decoupled=True), lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)),
    ],
)
def test_functional_optimizer_equals_torch_optim_step_for_step(functional, reference):
    net, loss = _problem()
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    optimizer = reference(list(net.parameters()))
    state = functional.init(params)
    for step in range(6):
        optimizer.zero_grad()
        loss(dict(net.named_parameters()), step).backward()
        optimizer.step()
        current = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        grads = dict(zip(current, torch.autograd.grad(loss(current, step), list(current.values()))))
        params, state = functional.step({n: p.detach() for n, p in current.items()}, grads, state)
        for name, p in net.named_parameters():
            assert torch.allclose(params[name], p.detach(), rtol=1e-12, atol=1e-14), (step, name)


def test_functional_optimizer_follows_the_fine_tuning_description():
    assert isinstance(functional_optimizer(FineTuning(optimizer="sgd", lr=0.5)), SGD)
    adamw = functional_optimizer(FineTuning(optimizer="adamw", lr=0.5, weight_decay=0.1))
    assert isinstance(adamw, Adam) and adamw.decoupled and adamw.lr == 0.5
    assert functional_optimizer(FineTuning(), lr=1e-3).lr == 1e-3


@pytest.mark.parametrize("optimizer", [SGD(0.3), Adam(0.05)])
@pytest.mark.parametrize("steps", [1, 2])
def test_gradient_through_a_simulated_fine_tuning_equals_finite_differences(optimizer, steps):
    """d/d theta of f(theta_FT(theta)), theta_FT = M optimizer steps, against central differences."""
    net, loss = _problem()
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}

    def outer(params):
        tuned = fine_tune(loss, params, optimizer, steps, create_graph=True).params
        return loss(tuned, 7) + 0.5 * loss(params, 5)

    grads = torch.autograd.grad(outer(theta), list(theta.values()))
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        direction = {n: torch.randn(p.shape, generator=generator, dtype=torch.float64) for n, p in theta.items()}
        h = 1e-5
        plus = {n: (p + h * direction[n]).detach().requires_grad_(True) for n, p in theta.items()}
        minus = {n: (p - h * direction[n]).detach().requires_grad_(True) for n, p in theta.items()}
        numeric = (outer(plus) - outer(minus)) / (2 * h)
        analytic = sum((g * direction[n]).sum() for n, g in zip(theta, grads))
        assert torch.allclose(analytic, numeric.detach(), rtol=1e-6, atol=1e-9), (float(analytic), float(numeric))


def test_first_order_fine_tuning_is_detached_and_equals_the_plain_updates():
    net, loss = _problem()
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    run = fine_tune(loss, theta, SGD(0.2), 3, create_graph=False)
    assert len(run.losses) == 3
    # No graph back to theta: the result is a new leaf.
    assert all(p.grad_fn is None for p in run.params.values())
    optimizer = torch.optim.SGD(list(net.parameters()), lr=0.2)
    for step in range(3):
        optimizer.zero_grad()
        loss(dict(net.named_parameters()), step).backward()
        optimizer.step()
    for name, p in net.named_parameters():
        assert torch.allclose(run.params[name], p.detach(), rtol=1e-12, atol=1e-14)


def test_adam_through_a_parameter_with_zero_gradient_stays_finite():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    unused = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)

    def loss(params, step):
        return (params["x"] ** 2).sum() + 0 * params["unused"].sum()

    tuned = fine_tune(loss, {"x": x, "unused": unused}, Adam(0.1), 2, create_graph=True).params
    grads = torch.autograd.grad(loss(tuned, 0), [x, unused])
    assert all(torch.isfinite(g).all() for g in grads)


def test_a_fine_tuning_step_of_the_unet_is_differentiable_with_math_attention(tiny_model):
    """Second order through a real diffusers UNet: the exact meta-gradient's building block."""
    from unrelearn.model import differentiable_attention

    model = tiny_model
    unet = model.unet
    theta = {n: p for n, p in unet.named_parameters() if ".attn2." in n}
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    context = model.encode_prompts(["a circle", "a ring"])

    def loss(params, step):
        return model.diffusion_loss(x0, context, torch.Generator().manual_seed(step), params=params)

    with differentiable_attention():
        tuned = fine_tune(loss, theta, SGD(0.1), 1, create_graph=True).params
        grads = torch.autograd.grad(loss(tuned, 5), list(theta.values()))
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # functional_call with the unchanged parameters is the module itself
    same = model.predict_noise(x0, torch.tensor([3, 400]), context, params=dict(unet.named_parameters()))
    assert torch.equal(same, model.predict_noise(x0, torch.tensor([3, 400]), context))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_scheduled_fine_tuning_equals_torch_optim_under_diffusers_scheduler(schedule, warmup):
    """The attacker's learning-rate schedule: the functional run (simulated attackers), the
    Trainer's factor (attacks) and torch.optim driven by diffusers' own scheduler agree."""
    from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    from unrelearn.training import TrainConfig

    steps = 8
    tuning = FineTuning(optimizer="adam", lr=0.02, steps=steps, schedule=schedule, warmup_steps=warmup)
    net, loss = _problem()
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    optimizer = torch.optim.Adam(net.parameters(), lr=tuning.lr)
    if schedule == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    config = TrainConfig(steps=steps, lr=tuning.lr, schedule=schedule, warmup_steps=warmup)
    for step in range(steps):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(tuning.lr * config.lr_factor(step), rel=1e-12)
        optimizer.zero_grad()
        loss(dict(net.named_parameters()), step).backward()
        optimizer.step()
        scheduler.step()
    run = fine_tune(loss, start, functional_optimizer(tuning), steps, create_graph=False, lr_factor=tuning.lr_factor)
    for name, p in net.named_parameters():
        assert torch.allclose(run.params[name], p.detach(), rtol=1e-10, atol=1e-12), name
