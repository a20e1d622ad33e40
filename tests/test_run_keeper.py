"""The run keeper (trainers/runs/run_keeper.py) on its own: what a resume restores, including the state
a method adds, and what it refuses."""

import logging

import pytest
import torch
from torch import nn

from trainers.errors import UserFacingError
from trainers.runs.run_keeper import RunKeeper


class RunningMean:
    """A method's state that spans epochs (as prompt averaging over epochs is)."""

    def __init__(self):
        self.total, self.count = torch.zeros(4), 0

    def add(self, value):
        self.total += value
        self.count += 1

    def state_dict(self):
        return {"total": self.total.clone(), "count": self.count}

    def load_state_dict(self, state):
        self.total, self.count = state["total"].clone(), state["count"]


def keeper(run_dir, config=None, seed=0):
    torch.manual_seed(seed)
    module = nn.Linear(4, 4)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    kept = RunKeeper(run_dir=str(run_dir), trainer="Tiny", backbone={"name": "tiny"}, config=config or {"OPTIM.LR": 0.1},
                     modules={"layer": module}, optimizers={"layer": optimizer}, schedulers={"layer": scheduler},
                     scaler=scaler, random_loaders={}, model=module)
    mean = RunningMean()
    kept.add_state("running_mean", mean)
    return kept, module, optimizer, mean


def train_epoch(module, optimizer, mean):
    loss = module(torch.randn(8, 4)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    mean.add(module.weight.detach().sum(dim=0))


def test_a_resume_restores_modules_optimisers_random_streams_and_added_state(tmp_path):
    uninterrupted, module, optimizer, mean = keeper(tmp_path / "a")
    for epoch in range(3):
        train_epoch(module, optimizer, mean)
        uninterrupted.end_of_epoch(epoch, val_result=float(epoch))
    expected = (module.weight.detach().clone(), mean.total.clone(), mean.count)

    interrupted, module, optimizer, mean = keeper(tmp_path / "b")
    for epoch in range(2):
        train_epoch(module, optimizer, mean)
        interrupted.end_of_epoch(epoch, val_result=float(epoch))
    resumed, module, optimizer, mean = keeper(tmp_path / "b", seed=7)  # a new process: other initial weights
    assert resumed.resume(str(tmp_path / "b")) == 2
    assert mean.count == 2 and resumed.best_result == 1.0
    train_epoch(module, optimizer, mean)
    assert torch.equal(module.weight, expected[0]) and torch.equal(mean.total, expected[1]) and mean.count == expected[2]


def test_a_set_without_the_added_state_resumes_with_a_warning(tmp_path, caplog):
    older, module, optimizer, mean = keeper(tmp_path)
    older._states.clear()  # an earlier version's trainer, which kept no such state
    train_epoch(module, optimizer, mean)
    older.end_of_epoch(0)
    resumed, _, _, mean = keeper(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert resumed.resume(str(tmp_path)) == 1
    assert mean.count == 0 and "has no running_mean" in caplog.text


def test_a_resume_with_other_settings_is_refused(tmp_path):
    first, module, optimizer, mean = keeper(tmp_path)
    train_epoch(module, optimizer, mean)
    first.end_of_epoch(0)
    second, *_ = keeper(tmp_path, config={"OPTIM.LR": 0.2})
    with pytest.raises(UserFacingError, match=r"holds a run made with other settings \(OPTIM.LR: was 0.1, now 0.2\)"):
        second.resume(str(tmp_path))
