import pytest
import torch

from unrelearn.errors import UnrelearnError
from unrelearn.training import TrainConfig, Trainer


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def loss_fn(step, generator):
        x = torch.randn(16, 4, generator=generator)
        return ((net(x) - x.sum(1, keepdim=True)) ** 2).mean()

    return net, loss_fn


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, optimizer):
    config = TrainConfig(steps=12, lr=1e-2, optimizer=optimizer, momentum=0.9, ema_decay=0.9, checkpoint_every=5, warmup_steps=3)
    net, loss_fn = _problem()
    straight = Trainer(dict(net.named_parameters()), loss_fn, config, progress=False)
    straight.run()
    straight.copy_ema_to_params()

    def killed_after_step_7(steps_done):
        if steps_done == 7:
            raise KeyboardInterrupt

    interrupted, loss_fn2 = _problem()
    first = Trainer(dict(interrupted.named_parameters()), loss_fn2, config, tmp_path / "ckpt", progress=False,
                    on_step=killed_after_step_7)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        first.run()

    resumed_net, loss_fn3 = _problem(seed=123)  # different init: everything must come from the checkpoint
    resumed = Trainer(dict(resumed_net.named_parameters()), loss_fn3, config, tmp_path / "ckpt", progress=False)
    result = resumed.run()
    resumed.copy_ema_to_params()
    assert result.resumed_from == 5
    for a, b in zip(net.parameters(), resumed_net.parameters()):
        assert torch.allclose(a, b, atol=0, rtol=0)


def test_a_run_paused_off_the_checkpoint_interval_resumes_to_the_uninterrupted_weights(tmp_path):
    config = TrainConfig(steps=12, lr=1e-2, optimizer="adamw", ema_decay=0.9, checkpoint_every=5)
    net, loss_fn = _problem()
    Trainer(dict(net.named_parameters()), loss_fn, config, progress=False).run()

    paused_net, loss_fn2 = _problem()
    paused = Trainer(dict(paused_net.named_parameters()), loss_fn2, config, tmp_path / "ckpt", progress=False)
    result = paused.run(stop_at=7)  # between checkpoints: the pause writes its own
    assert result.steps_done == 7 and len(result.losses) == 7
    assert not torch.allclose(next(net.parameters()), next(paused_net.parameters()))
    again = Trainer(dict(paused_net.named_parameters()), loss_fn2, config, tmp_path / "ckpt", progress=False).run(stop_at=7)
    assert again.resumed_from == 7 and again.steps_done == 7  # pausing again at the same step trains nothing

    resumed_net, loss_fn3 = _problem(seed=123)
    resumed = Trainer(dict(resumed_net.named_parameters()), loss_fn3, config, tmp_path / "ckpt", progress=False)
    assert resumed.run().resumed_from == 7
    for a, b in zip(net.parameters(), resumed_net.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(UnrelearnError, match="checkpoint folder"):
        Trainer(dict(net.named_parameters()), loss_fn, config, progress=False).run(stop_at=3)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path):
    net, loss_fn = _problem()

    def exploding(step, generator):
        loss = loss_fn(step, generator)
        return loss * float("nan") if step == 6 else loss

    trainer = Trainer(dict(net.named_parameters()), exploding, TrainConfig(steps=10, lr=1e-2, checkpoint_every=3),
                      tmp_path / "ckpt", progress=False)  # fmt: skip
    with pytest.raises(UnrelearnError, match=r"blew up at step 6: the loss became nan; the checkpoint of step 6 .* is intact"):
        trainer.run()
    assert (tmp_path / "ckpt" / "params.safetensors").is_file()


def test_bad_configuration_is_rejected():
    with pytest.raises(UnrelearnError, match="option optimizer='rmsprop' must be one of 'adamw', 'adam', 'sgd'"):
        TrainConfig(steps=1, lr=1e-3, optimizer="rmsprop")
    with pytest.raises(UnrelearnError, match="option lr=nan must be a number >= 0"):
        TrainConfig(steps=1, lr=float("nan"))
    with pytest.raises(UnrelearnError, match="parameter selection is empty"):
        Trainer({}, lambda s, g: torch.zeros(()), TrainConfig(steps=1, lr=1e-3))


def test_zero_learning_rate_leaves_weights_unchanged():
    net, loss_fn = _problem()
    before = [p.detach().clone() for p in net.parameters()]
    Trainer(dict(net.named_parameters()), loss_fn, TrainConfig(steps=5, lr=0.0, optimizer="sgd"), progress=False).run()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
