"""Run by tests/test_distributed.py under torchrun: a Trainer on a toy problem in one of several
processes; each process writes the weights it ends with."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from unrelearn.training import Processes, TrainConfig, Trainer


def toy_problem():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)

    def loss_fn(step, generator):
        x = torch.randn(4, 3, generator=generator)
        return ((layer(x) - x[:, :2].flip(1)) ** 2).mean()

    return layer, loss_fn


if __name__ == "__main__":
    out = Path(sys.argv[1])
    layer, loss_fn = toy_problem()
    config = TrainConfig(steps=3, lr=0.1, optimizer="sgd", grad_clip=None, seed=5)
    Trainer(dict(layer.named_parameters()), loss_fn, config, progress=False).run()
    save_file({k: v.detach().contiguous() for k, v in layer.state_dict().items()}, str(out / f"rank{Processes().rank}.safetensors"))
