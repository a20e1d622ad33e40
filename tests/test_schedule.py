import io
import math

import pytest
import torch
from yacs.config import CfgNode as CN

from trainers.runs.schedule import build_lr_scheduler


def optim_cfg(**overrides):
    cfg = CN()
    cfg.LR, cfg.MAX_EPOCH, cfg.LR_SCHEDULER = 0.002, 5, "cosine"
    cfg.WARMUP_EPOCH, cfg.WARMUP_TYPE, cfg.WARMUP_CONS_LR, cfg.WARMUP_MIN_LR = 1, "constant", 1e-5, 1e-5
    cfg.STEPSIZE, cfg.GAMMA = (-1,), 0.1
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def rates(cfg, epochs=None):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.LR)
    scheduler = build_lr_scheduler(optimizer, cfg)
    seen = []
    for _ in range(epochs or cfg.MAX_EPOCH):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def dassl_cosine(cfg, epoch):
    """Dassl's schedule: warm-up epochs, then cosine counted from the end of warm-up over MAX_EPOCH."""
    if epoch < cfg.WARMUP_EPOCH:
        if cfg.WARMUP_TYPE == "constant":
            return cfg.WARMUP_CONS_LR
        return cfg.WARMUP_MIN_LR if epoch == 0 else cfg.LR * epoch / cfg.WARMUP_EPOCH
    return cfg.LR * (1 + math.cos(math.pi * (epoch - cfg.WARMUP_EPOCH) / cfg.MAX_EPOCH)) / 2


@pytest.mark.parametrize("overrides", [
    {},  # every shipped CoOp/MaPLe config: 1 constant warm-up epoch
    {"MAX_EPOCH": 50},
    {"MAX_EPOCH": 10, "WARMUP_EPOCH": 3, "WARMUP_TYPE": "linear"},
    {"LR": 5e-6, "WARMUP_CONS_LR": 1e-5},  # warm-up rate above the base rate
])
def test_warmup_cosine_follows_dassls_schedule_epoch_by_epoch(overrides):
    cfg = optim_cfg(**overrides)
    expected = [dassl_cosine(cfg, e) for e in range(cfg.MAX_EPOCH)]
    assert rates(cfg) == pytest.approx(expected, rel=1e-12, abs=0)


def test_without_warmup_and_step_schedules():
    assert rates(optim_cfg(WARMUP_EPOCH=0)) == pytest.approx(
        [0.002 * (1 + math.cos(math.pi * e / 5)) / 2 for e in range(5)])
    assert rates(optim_cfg(LR_SCHEDULER="single_step", STEPSIZE=(2,), WARMUP_EPOCH=0)) == pytest.approx(
        [0.002, 0.002, 0.0002, 0.0002, 0.00002])
    with pytest.raises(ValueError, match="cosine"):
        rates(optim_cfg(LR_SCHEDULER="plateau"))


def test_state_survives_a_weights_only_round_trip_and_resumes_the_same_schedule():
    cfg = optim_cfg(MAX_EPOCH=6)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=cfg.LR, momentum=0.9)
    scheduler = build_lr_scheduler(optimizer, cfg)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.LR, momentum=0.9)
    resumed = build_lr_scheduler(resumed_optimizer, cfg)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["scheduler"])
    rest = []
    for _ in range(3):
        rest.append(resumed_optimizer.param_groups[0]["lr"])
        resumed_optimizer.step()
        resumed.step()
    assert rest == pytest.approx(rates(cfg)[3:], rel=1e-12)
