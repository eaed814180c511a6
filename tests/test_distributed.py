"""Data-parallel runs (``torchrun`` / ``accelerate launch``): two CPU processes (gloo) against
the single-process run of the averaged loss they stand for."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from distributed_worker import toy_problem
from safetensors.torch import load_file

from unrelearn.training import TrainConfig, Trainer, step_generator

TESTS = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               f"--master_port={_free_port()}", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)


def test_two_processes_train_the_mean_of_their_batches(tmp_path):
    done = _torchrun(str(TESTS / "distributed_worker.py"), str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # one update, applied everywhere

    layer, loss_fn = toy_problem()

    def both(step, _generator):  # what two processes average: their two batches
        return sum(loss_fn(step, step_generator(5, step, rank)) for rank in (0, 1)) / 2

    config = TrainConfig(steps=3, lr=0.1, optimizer="sgd", grad_clip=None, seed=5)
    Trainer(dict(layer.named_parameters()), both, config, progress=False).run()
    for name, value in layer.state_dict().items():
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-6, atol=1e-7)
    single, loss_fn = toy_problem()
    Trainer(dict(single.named_parameters()), loss_fn, config, progress=False).run()
    assert not torch.allclose(single.weight, ranks[0]["weight"])  # the second process's batch counted


def test_unlearn_command_in_two_processes(tiny_model, tmp_path):
    folder = tiny_model.save(tmp_path / "model")
    out = tmp_path / "unlearned"
    done = _torchrun("-m", "unrelearn.cli", "unlearn", str(folder), "-m", "esd-u-1", "-c", "circle", "--out", str(out),
                     "--steps", "2", "-o", "ddim_steps=3", "-o", "batch_size=2", "--device", "cpu")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["processes"] == 2 and len(record["loss_curve"]) == 2
    assert not (tmp_path / "unlearned.checkpoint").exists()
