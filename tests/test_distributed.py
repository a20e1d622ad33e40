"""Data-parallel training and evaluation (trainers/runs/distributed.py): 2 processes on the CPU (gloo)
compute what 1 process computes on the same samples.

The two-process checks start 2 processes once (torch.multiprocessing, gloo, the environment torchrun
would set) and build the real trainers in each; the single-process reference is built here.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import requires_dassl
from tests.train_harness import FAST_OPTIONS, REPO
from trainers.errors import UserFacingError
from trainers.runs import distributed
from trainers.runs.distributed import GlobalBatchSampler, ShardSampler, interleave_shards

WORLD = 2
GLOBAL_BATCH = 16
EVALUATED_IMAGES = 9  # not divisible by WORLD: the shards differ in size
# trainer, config, options: large plain SGD steps, so that the updated parameters tell the gradients
# apart (an Adam step hardly depends on the gradient's scale; the gradients are compared as well).
SGD = ["OPTIM.NAME", "sgd", "OPTIM.LR", "0.5"]
CASES = {
    "RAdaCoOp": ("vit_b16_ep50_ctxv1", ["OPTIM.WARMUP_EPOCH", "0", *SGD]),
    "RAdaFT": ("vit_b16_ep10", ["TRAINER.RADA.ALPHA", "0.1", "TRAINER.FT.HEAD_LR", "0.5", *SGD]),
    "FLYP": ("vit_b16_ep10", SGD),
    # MaPLe's prompts reach CLIP through forward pre-hooks, outside any module DDP could wrap.
    "RAdaMaPLe": ("vit_b16_c2_ep5_batch4_2ctx", ["TRAINER.MAPLE.PROMPT_DEPTH", "2", "OPTIM.WARMUP_EPOCH", "0", *SGD]),
}


# ---- without processes ----------------------------------------------------------------------------
def global_batches(size, batch, world, epoch, seed=1):
    """Per step, the concatenation of the processes' shares (world processes)."""
    shares = []
    for rank in range(world):
        sampler = GlobalBatchSampler(size, batch, rank, world, seed)
        sampler.set_epoch(epoch)
        indices = list(sampler)
        assert len(indices) == len(sampler)
        per_process = len(indices) // sampler.steps
        shares.append([indices[i : i + per_process] for i in range(0, len(indices), per_process)])
    return [sum((shares[rank][step] for rank in range(world)), []) for step in range(len(shares[0]))]


def test_global_batches_do_not_depend_on_the_number_of_processes():
    for epoch in (0, 3):
        one = global_batches(37, 8, 1, epoch)
        assert len(one) == 37 // 8 and all(len(batch) == 8 for batch in one)
        assert global_batches(37, 8, 2, epoch) == one == global_batches(37, 8, 4, epoch)
        seen = sum(one, [])
        assert len(set(seen)) == len(seen)  # no sample twice in an epoch
    assert global_batches(37, 8, 2, 0) != global_batches(37, 8, 2, 1)  # reshuffled per epoch
    assert global_batches(37, 8, 2, 1) == global_batches(37, 8, 2, 1)  # fixed by seed and epoch


def test_a_dataset_smaller_than_a_batch_is_one_batch_split_evenly():
    (batch,) = global_batches(7, 16, 2, 0)
    assert len(batch) == 6 and len(set(batch)) == 6
    (batch,) = global_batches(7, 16, 1, 0)
    assert sorted(batch) == list(range(7))
    with pytest.raises(UserFacingError, match="fewer than the 3 processes"):
        GlobalBatchSampler(2, 16, 0, 3)


def test_the_global_batch_must_split_evenly():
    assert distributed.per_process_batch(16, 2) == 8
    with pytest.raises(UserFacingError, match="BATCH_SIZE 30 is the global batch.*multiple of 4"):
        distributed.per_process_batch(30, 4)


def test_shards_partition_the_images_in_order():
    shards = [torch.tensor(list(ShardSampler(7, rank, 2))) for rank in range(2)]
    assert [len(ShardSampler(7, rank, 2)) for rank in range(2)] == [4, 3]
    assert interleave_shards(shards).tolist() == list(range(7))


def test_a_single_process_is_left_alone():
    loader = torch.utils.data.DataLoader(list(range(10)), batch_size=4, shuffle=True)
    assert distributed.distributed_train_loader(loader, 4, 1) is loader and distributed.sharded_loader(loader) is loader
    assert distributed.data_parallel({"m": torch.nn.Linear(2, 2)}) is None
    features = torch.randn(3, 2)
    assert distributed.gather_batch(features) is features and distributed.sum_over_processes(3, 4) == (3, 4)


# ---- two processes --------------------------------------------------------------------------------
def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fixed_batch(classes):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(GLOBAL_BATCH, 3, 224, 224, generator=generator), torch.arange(GLOBAL_BATCH) % classes


def build_trainer(trainer_name, data_root, clip_path, output_dir):
    from dassl.engine import build_trainer as dassl_build_trainer
    from dassl.utils import set_random_seed

    import datasets.dassl_glue  # noqa: F401
    import trainers.register  # noqa: F401
    from train import parse_args, setup_cfg

    config, options = CASES[trainer_name]
    args = parse_args([
        "--root", data_root, "--seed", "1", "--trainer", trainer_name, "--output-dir", output_dir,
        "--dataset-config-file", os.path.join(REPO, "configs", "datasets", "synthetic_shapes.yaml"),
        "--config-file", os.path.join(REPO, "configs", "trainers", trainer_name, f"{config}.yaml"),
        *FAST_OPTIONS, "MODEL.BACKBONE.NAME", str(clip_path), "DATASET.SUBSAMPLE_CLASSES", "base", *options,
    ])
    cfg = setup_cfg(args)
    set_random_seed(cfg.SEED)
    trainer = dassl_build_trainer(cfg)
    # An evaluation set of an odd size: the first images of the test set, read like the test set.
    test_set = trainer.test_loader.dataset
    subset = torch.utils.data.Subset(test_set, range(EVALUATED_IMAGES))
    trainer.test_loader = distributed.sharded_loader(torch.utils.data.DataLoader(subset, batch_size=4))
    return trainer


def one_step_and_evaluation(trainer, rank=0, world=1):
    """Trains one step on this process's share of the fixed batch, then evaluates."""
    images, labels = fixed_batch(trainer.num_classes)
    share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    trainer.wrap_data_parallel()
    trainer.set_model_mode("train")
    trainer.epoch, trainer.batch_idx, trainer.num_batches = 0, 0, 1
    before = {name: p.detach().clone() for name, p in _trained_parameters(trainer)}
    summary = trainer.forward_backward({"img": images[share], "label": labels[share]})
    result = {
        "loss": summary["loss"],
        "grads": {name: p.grad.detach().clone() for name, p in _trained_parameters(trainer)},
        "steps": {name: p.detach() - before[name] for name, p in _trained_parameters(trainer)},
    }
    result["accuracy"] = trainer.test()
    evaluator = getattr(trainer.evaluator, "evaluator", trainer.evaluator)
    result["predictions"] = list(evaluator._y_pred)
    return result


def _trained_parameters(trainer):
    for module_name, module in trainer._models.items():
        for name, parameter in module.named_parameters():
            if parameter.requires_grad:
                yield f"{module_name}.{name}", parameter


def _worker(rank, port, data_root, clip_path, workdir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), RADA_DIST_TIMEOUT_S="120")
    torch.set_num_threads(1)
    distributed.join_process_group(use_cuda=False)
    results = {"sharded": _sharded_classification()}
    for name in CASES:
        trainer = build_trainer(name, data_root, clip_path, os.path.join(workdir, f"{name}-rank{rank}"))
        results[name] = one_step_and_evaluation(trainer, rank, WORLD)
    torch.save(results, os.path.join(workdir, f"rank{rank}.pt"))


def _classification_evaluator():
    from dassl.config import get_cfg_default
    from dassl.evaluation import build_evaluator

    return build_evaluator(get_cfg_default(), lab2cname={k: str(k) for k in range(3)})


def classification_inputs():
    """7 images of 3 classes, with logits that do not depend on how they are batched."""
    logits = torch.tensor([[3, 1, 0], [0, 2, 1], [1, 0, 2], [0, 3, 1], [2, 2.5, 0], [1, 0, 0], [0, 0, 1]]).float()
    return logits, torch.tensor([0, 1, 1, 1, 0, 0, 2])


def _sharded_classification():
    logits, labels = classification_inputs()
    evaluator = distributed.sharded_evaluator(_classification_evaluator())
    shard = list(ShardSampler(len(labels), distributed.rank(), WORLD))
    for start in range(0, len(shard), 2):  # batches of 2
        rows = shard[start : start + 2]
        evaluator.process(logits[rows], labels[rows])
    results = evaluator.evaluate()
    return {"results": dict(results), "predictions": list(evaluator.evaluator._y_pred)}


@pytest.fixture(scope="module")
def two_processes(synthetic_data_root, tiny_clip_path, tmp_path_factory):
    """The results of each of the 2 processes, and those of one process on the same samples."""
    workdir = str(tmp_path_factory.mktemp("ddp"))
    single = {}
    for name in CASES:  # first, so that the few-shot cache is written before the processes start
        single[name] = one_step_and_evaluation(build_trainer(name, synthetic_data_root, tiny_clip_path,
                                                             os.path.join(workdir, f"{name}-single")))
    mp.spawn(_worker, args=(free_port(), synthetic_data_root, str(tiny_clip_path), workdir), nprocs=WORLD)
    ranks = [torch.load(os.path.join(workdir, f"rank{rank}.pt"), weights_only=False) for rank in range(WORLD)]
    return single, ranks


def assert_same_tensors(actual, expected):
    """Equal up to float32 rounding: sums taken in another order (over two half batches, then
    across the processes) differ by a few units in the last place of the tensor's largest entries."""
    assert actual.keys() == expected.keys()
    for name in expected:
        error = (actual[name] - expected[name]).abs().max()
        assert error <= 1e-4 * expected[name].abs().max() + 1e-12, f"{name}: off by {error:.3g}"



@requires_dassl
@pytest.mark.parametrize("trainer", list(CASES))
def test_two_processes_take_the_step_of_one_on_the_global_batch(trainer, two_processes):
    single, ranks = two_processes
    expected = single[trainer]
    for result in (results[trainer] for results in ranks):
        assert_same_tensors(result["grads"], expected["grads"])  # all-reduced: the global batch's gradient
        assert_same_tensors(result["steps"], expected["steps"])
        assert any(step.abs().max() > 1e-4 for step in result["steps"].values())
    losses = [results[trainer]["loss"] for results in ranks]
    if trainer == "FLYP":  # the contrastive loss of the gathered global batch, the same in both processes
        assert losses == pytest.approx([expected["loss"]] * WORLD, rel=1e-5)
    else:  # the mean over equal halves
        assert sum(losses) / WORLD == pytest.approx(expected["loss"], rel=1e-5)


@requires_dassl
@pytest.mark.parametrize("trainer", list(CASES))
def test_sharded_evaluation_counts_every_image_once(trainer, two_processes):
    single, ranks = two_processes
    expected = single[trainer]
    assert len(expected["predictions"]) == EVALUATED_IMAGES
    assert ranks[0][trainer]["predictions"] == expected["predictions"]  # gathered in dataset order on process 0
    assert [results[trainer]["accuracy"] for results in ranks] == [expected["accuracy"]] * WORLD


@requires_dassl
def test_sharded_classification_equals_single_process(two_processes):
    _, ranks = two_processes
    logits, labels = classification_inputs()
    evaluator = _classification_evaluator()
    evaluator.process(logits, labels)
    expected = dict(evaluator.evaluate())
    for results in ranks:
        assert results["sharded"]["results"] == expected
    assert ranks[0]["sharded"]["predictions"] == logits.argmax(dim=1).tolist()
