import pytest
import torch
from torch import nn

from trainers.errors import CheckpointError
from trainers.model.rada_head import RAdaHead
from trainers.runs.checkpoint import (
    find_checkpoint,
    latest_checkpoint,
    latest_checkpoint_set,
    load_weights,
    prune_checkpoints,
    read_checkpoint,
    write_checkpoint,
    write_checkpoint_set,
)

VIT = {"embed_dim": 512, "text_width": 512, "vision_width": 768, "vision": "ViT", "image_size": 224}
RN50 = {"embed_dim": 1024, "text_width": 512, "vision_width": 64, "vision": "ResNet", "image_size": 224}


def payload(module, epoch, backbone=VIT):
    return {"state_dict": module.state_dict(), "epoch": epoch, "optimizer": None, "scheduler": None,
            "val_result": None, "backbone": backbone}


def test_written_checkpoints_load_with_weights_only(tmp_path):
    head = RAdaHead(16, num_heads=4)
    optimizer = torch.optim.Adam(head.parameters())
    head(torch.randn(2, 16), torch.randn(3, 16), 10.0)[0].sum().backward()
    optimizer.step()
    state = payload(head, 1) | {"optimizer": optimizer.state_dict()}
    path = write_checkpoint(state, tmp_path / "rada_head", "model.pth.tar-1")
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["state_dict"]["q_proj1.weight"], head.q_proj1.weight)
    assert loaded["optimizer"]["state"][0]["step"] == 1


def test_latest_and_best_and_epoch_lookup(tmp_path):
    head = RAdaHead(16, num_heads=4)
    folder = tmp_path / "rada_head"
    write_checkpoint(payload(head, 1), folder, "model.pth.tar-1")
    write_checkpoint(payload(head, 2), folder, "model.pth.tar-2")
    assert latest_checkpoint(folder).endswith("model.pth.tar-2")
    assert find_checkpoint(folder).endswith("model.pth.tar-2")
    assert find_checkpoint(folder, epoch=1).endswith("model.pth.tar-1")
    write_checkpoint(payload(head, 2), folder, "model-best.pth.tar")
    assert find_checkpoint(folder).endswith("model-best.pth.tar")
    with pytest.raises(CheckpointError, match="epoch 7.*model.pth.tar-1, model.pth.tar-2"):
        find_checkpoint(folder, epoch=7)


def test_missing_model_dir_says_what_it_must_contain(tmp_path):
    with pytest.raises(CheckpointError, match="--model-dir must be the output folder") as error:
        find_checkpoint(tmp_path / "run" / "rada_head")
    assert "does not exist" in str(error.value)


def test_checkpoint_of_another_backbone_is_refused(tmp_path):
    path = write_checkpoint(payload(RAdaHead(16, num_heads=4), 1, backbone=RN50), tmp_path / "h", "model.pth.tar-1")
    with pytest.raises(CheckpointError, match="another backbone.*ResNet.*ViT"):
        read_checkpoint(path, VIT)


def test_foreign_keys_and_class_dependent_buffers(tmp_path):
    source = RAdaHead(16, num_heads=4)
    nn.init.normal_(source.out_proj.weight)
    # The authors' checkpoints keep the head under "mha." inside a whole model.
    state = {f"mha.{key}": value for key, value in source.state_dict().items()}
    state["prompt_learner.token_prefix"] = torch.zeros(5, 1, 16)
    target = RAdaHead(16, num_heads=4)
    load_weights(target, state, "authors.pth")
    assert torch.equal(target.out_proj.weight, source.out_proj.weight)


def test_weights_of_another_width_are_refused_with_the_reason():
    with pytest.raises(CheckpointError, match=r"shape \(16, 16\).*\(32, 32\)"):
        load_weights(RAdaHead(32, num_heads=4), RAdaHead(16, num_heads=4).state_dict(), "x.pth")
    with pytest.raises(CheckpointError, match="lacks weights"):
        load_weights(RAdaHead(16, num_heads=4), {"ctx": torch.zeros(4, 16)}, "coop.pth")


def test_corrupt_file(tmp_path):
    path = tmp_path / "model.pth.tar-1"
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_checkpoint(str(path))


@pytest.mark.parametrize("pointer_text", ["", "\x00\x17garbage\n", "model.pth.tar-9\n"])
def test_garbled_pointer_falls_back_to_the_newest_checkpoint(pointer_text, tmp_path, caplog):
    folder = tmp_path / "rada_head"
    for epoch in (1, 2):
        write_checkpoint({"state_dict": {}, "epoch": epoch}, folder, f"model.pth.tar-{epoch}")
    (folder / "checkpoint").write_text(pointer_text)
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(folder).endswith("model.pth.tar-2")
    assert "using the newest checkpoint there, model.pth.tar-2" in caplog.text
    (folder / "model.pth.tar-1").unlink()
    (folder / "model.pth.tar-2").unlink()
    with pytest.raises(CheckpointError, match="holds no model.pth.tar"):
        latest_checkpoint(folder)


def test_a_set_lacking_a_module_is_never_resumed_from(tmp_path):
    heads = {"prompt_learner": RAdaHead(16, num_heads=4), "rada_head": RAdaHead(16, num_heads=4)}
    write_checkpoint_set(tmp_path, 1, {n: payload(m, 1) for n, m in heads.items()}, {"random_state": {}})
    # Killed between the two modules' saves of epoch 2: one file written, no marker.
    write_checkpoint(payload(heads["prompt_learner"], 2), tmp_path / "prompt_learner", "model.pth.tar-2")
    marker, paths = latest_checkpoint_set(tmp_path, list(heads))
    assert marker["epoch"] == 1 and all(p.endswith("model.pth.tar-1") for p in paths.values())
    # Killed after the marker of epoch 2 but a module file went missing: that set is skipped too.
    write_checkpoint_set(tmp_path, 2, {n: payload(m, 2) for n, m in heads.items()}, {"random_state": {}})
    (tmp_path / "rada_head" / "model.pth.tar-2").unlink()
    assert latest_checkpoint_set(tmp_path, list(heads))[0]["epoch"] == 1
    assert latest_checkpoint_set(tmp_path / "elsewhere", list(heads)) is None


def test_prune_keeps_the_last_epoch_and_the_multiples_of_the_frequency(tmp_path):
    head = RAdaHead(16, num_heads=4)
    for epoch in (1, 2, 3):
        write_checkpoint_set(tmp_path, epoch, {"rada_head": payload(head, epoch)}, {"random_state": {}})
        prune_checkpoints(tmp_path, ["rada_head"], epoch, freq=2)
    assert sorted(p.name for p in (tmp_path / "rada_head").glob("model.pth.tar-*")) == ["model.pth.tar-2",
                                                                                        "model.pth.tar-3"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint_set*")) == ["checkpoint_set.pth.tar-2",
                                                                       "checkpoint_set.pth.tar-3"]
