import json

import torch

from unrelearn.base import BaseTrainingConfig, checkpoint_folder, train_base
from unrelearn.model import DiffusionModel


def test_train_base_writes_an_oracle_model_with_its_run_record(tmp_path):
    out = tmp_path / "oracle"
    config = BaseTrainingConfig(steps=3, batch_size=4, checkpoint_every=1, exclude="circle", warmup_steps=1)
    train_base(out, config, progress=False)
    loaded = DiffusionModel.load(out)
    assert loaded.world == "shapes" and loaded.info["excluded_concept"] == "circle"
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["exclude"] == "circle" and run["config"]["seed"] == 0 and "torch" in run["versions"]
    assert not checkpoint_folder(out).exists()


def test_train_base_is_reproducible(tmp_path):
    config = BaseTrainingConfig(steps=2, batch_size=4, warmup_steps=1)
    a = train_base(tmp_path / "a", config, progress=False).unet.state_dict()
    b = train_base(tmp_path / "b", config, progress=False).unet.state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_warm_start_from_another_model(tmp_path):
    first = train_base(tmp_path / "first", BaseTrainingConfig(steps=1, batch_size=2, warmup_steps=1), progress=False)
    config = BaseTrainingConfig(steps=1, batch_size=2, warmup_steps=1, lr=0.0, init=str(tmp_path / "first"), seed=5)
    second = train_base(tmp_path / "second", config, progress=False)
    assert second.info["initialised_from"] == str(tmp_path / "first")
    assert all(torch.equal(a, b) for a, b in zip(first.unet.parameters(), second.unet.parameters()))
