"""Runs of the RAda authors' code load unchanged (--eval-only --model-dir): their Dassl trainers save
the whole model (frozen CLIP included, the head under `mha.`) under the registered name `RAda`.
The checkpoints here are laid out as their trainer writes them, with Dassl's own save_checkpoint."""

import os
from types import SimpleNamespace

import clip
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.conftest import requires_dassl
from tests.dense_rada import dense_reference
from tests.train_harness import TrainRun
from trainers.model.backbones.openai_loader import load_clip
from trainers.model.classifier import CLIPClassifier
from trainers.model.prompts import FixedPrompts
from trainers.model.rada_head import RAdaHead
from trainers.runs.checkpoint import (
    authors_run_folder,
    frozen_differences,
    load_weights,
    module_part,
    read_checkpoint,
    write_checkpoint,
)

pytestmark = requires_dassl
CLASSES = ["red circle", "blue square", "green triangle"]
TEMPLATE = "a photo of a {}."


class AuthorsShapedModel(nn.Module):
    """The attributes of the authors' RAda model, hence the keys of its state dict: image_encoder.*,
    text_encoder.{transformer, positional_embedding, ln_final, text_projection}, ln_final.*,
    logit_scale and the head under mha.*"""

    def __init__(self, clip_model, head):
        super().__init__()
        self.image_encoder = clip_model.visual
        self.text_encoder = nn.Module()
        for name in ("transformer", "positional_embedding", "ln_final", "text_projection"):
            setattr(self.text_encoder, name, getattr(clip_model, name))
        self.ln_final = clip_model.ln_final
        self.logit_scale = nn.Parameter(clip_model.logit_scale.detach().clone())
        self.mha = head


def write_authors_run(clip_model, run_dir, epoch=2):
    from dassl.utils import save_checkpoint

    torch.manual_seed(3)
    head = RAdaHead(clip_model.text_projection.shape[1], num_heads=8)
    for parameter in head.parameters():
        nn.init.normal_(parameter, std=0.3)  # a trained-looking head: the mask is far from 1
    model = AuthorsShapedModel(clip_model, head)
    optimizer = torch.optim.Adam(head.parameters())
    save_checkpoint({"state_dict": model.state_dict(), "epoch": epoch, "optimizer": optimizer.state_dict(),
                     "scheduler": None}, save_dir=os.path.join(run_dir, "RAda"), model_name=f"model.pth.tar-{epoch}")
    return os.path.join(run_dir, "RAda", f"model.pth.tar-{epoch}"), model


def test_authors_head_gives_the_authors_predictions(clip_model, images, tmp_path):
    path, authors = write_authors_run(clip_model, str(tmp_path / "authors"))
    whole = read_checkpoint(path)["state_dict"]
    part, sources = module_part(whole, "rada_head", path)
    assert sources == ["mha.*"] and set(part) == set(RAdaHead(32).state_dict())

    ours = CLIPClassifier(clip_model, FixedPrompts(CLASSES, TEMPLATE), head=RAdaHead(32, num_heads=8)).eval()
    load_weights(ours.head, part, path)
    with torch.no_grad():
        logits = ours(images).logits
        # The authors' model, computed from their state dict by the method's formula.
        image_features = F.normalize(authors.image_encoder(images), dim=-1)
        tokens = clip.tokenize([TEMPLATE.format(name) for name in CLASSES])
        text_features = F.normalize(clip_model.encode_text(tokens), dim=-1)
        layers = {name: SimpleNamespace(weight=whole[f"mha.{name}.weight"], bias=whole[f"mha.{name}.bias"])
                  for name in ("q_proj1", "q_proj2", "q_proj3", "k_proj", "v_proj", "out_proj")}
        reference, mask = dense_reference(SimpleNamespace(num_heads=8, temperature=1.0, **layers),
                                          image_features, text_features, whole["logit_scale"].exp().item())
    assert not torch.allclose(mask, torch.ones_like(mask))
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-4)
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))
    # The frozen CLIP of their checkpoint is checked against the loaded backbone.
    assert frozen_differences(ours.state_dict(), whole, ["mha."]) == []
    whole["image_encoder.conv1.weight"] = whole["image_encoder.conv1.weight"] + 1
    assert frozen_differences(ours.state_dict(), whole, ["mha."]) == ["image_encoder.conv1.weight"]


@pytest.mark.e2e
def test_eval_only_loads_an_authors_run_and_refuses_a_run_of_other_modules(synthetic_data_root, tiny_clip_path,
                                                                           tmp_path):
    clip_model = load_clip(str(tiny_clip_path)).float()
    authors_dir = str(tmp_path / "authors")
    path, _ = write_authors_run(clip_model, authors_dir)
    run = TrainRun("RAda", "vit_b16_ep5", synthetic_data_root, tiny_clip_path, tmp_path)
    result = run.evaluate(model_dir=authors_dir, subsample="all")
    assert result.returncode == 0 and "Traceback" not in result.output, result.output[-3000:]
    assert f"Load {path} (mha.* of the RAda authors' whole model) to rada_head (epoch=2)" in result.log
    assert "frozen CLIP tensors differ" not in result.log and result.accuracy is not None

    # A RAdaCoOp run (prompt_learner and rada_head) given to RAda would lose its context.
    coop_dir = tmp_path / "radacoop"
    for name, module in (("prompt_learner", nn.Linear(2, 2)), ("rada_head", RAdaHead(32, num_heads=8))):
        write_checkpoint({"state_dict": module.state_dict(), "epoch": 1, "trainer": "RAdaCoOp"},
                         coop_dir / name, "model.pth.tar-1")
    refused = run.evaluate(model_dir=str(coop_dir), subsample="all")
    assert refused.returncode == 2 and "Traceback" not in refused.output
    assert "also holds trained prompt_learner, which RAda does not have" in refused.output


class AuthorsBottleneck(nn.Module):
    """Their adapter: fc = Linear (no bias), ReLU, Linear (no bias), ReLU."""

    def __init__(self, width, reduction=4):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(width, width // reduction, bias=False), nn.ReLU(),
                                nn.Linear(width // reduction, width, bias=False), nn.ReLU())


def test_authors_adapter_run_gives_the_authors_adapted_features(clip_model, images, tmp_path):
    """Their LP/ whole model (the adapter variants): frozen CLIP, fixed blend weights alpha and beta,
    adapter_image / adapter_text and, with the head, mha. Ours takes the adapters' trained values."""
    from dassl.utils import save_checkpoint

    from trainers.model.adapters import FeatureAdapter

    width = clip_model.text_projection.shape[1]
    torch.manual_seed(4)
    authors = AuthorsShapedModel(clip_model, RAdaHead(width, num_heads=8))
    authors.alpha, authors.beta = nn.Parameter(torch.tensor(0.5)), nn.Parameter(torch.tensor(0.5))
    authors.adapter_image, authors.adapter_text = AuthorsBottleneck(width), AuthorsBottleneck(width)
    save_checkpoint({"state_dict": authors.state_dict(), "epoch": 5, "optimizer": None, "scheduler": None},
                    save_dir=str(tmp_path / "LP"), model_name="model.pth.tar-5")
    path = str(tmp_path / "LP" / "model.pth.tar-5")
    whole = read_checkpoint(path)["state_dict"]

    ours = FeatureAdapter(width, ratio=0.5)
    part, sources = module_part(whole, "adapter", path)
    assert sources == ["adapter_image.*", "adapter_text.*"]
    load_weights(ours, part, path)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, whole[key]), key
    with torch.no_grad():
        image_features = clip_model.encode_image(images)
        adapted, _ = ours(image_features, image_features)
        # Their blend with alpha 0.5: the same direction as ours once normalised.
        theirs = 0.5 * authors.adapter_image.fc(image_features) + 0.5 * image_features
    torch.testing.assert_close(F.normalize(adapted, dim=-1), F.normalize(theirs, dim=-1))


@pytest.mark.parametrize("folder", ["RAda", "LP", "MultiModalPromptLearner"])
def test_adapter_and_maple_runs_map_their_parts(folder, tmp_path):
    (tmp_path / folder).mkdir()
    assert authors_run_folder(str(tmp_path), ["adapter", "rada_head"]) == str(tmp_path / folder)
    (tmp_path / "rada_head").mkdir()  # a run of ours: loaded as such
    assert authors_run_folder(str(tmp_path), ["adapter", "rada_head"]) is None
    whole = {"mha.k_proj.weight": torch.ones(2, 2), "adapter_image.fc.0.weight": torch.zeros(1, 2),
             "prompt_learner.ctx": torch.zeros(2, 2), "image_encoder.conv1.weight": torch.zeros(1)}
    assert module_part(whole, "adapter", folder)[0] == {"adapter_image.fc.0.weight": whole["adapter_image.fc.0.weight"]}
    assert module_part(whole, "prompt_learner", folder)[0] == {"ctx": whole["prompt_learner.ctx"]}
    assert module_part(whole, "rada_head", folder)[0] == {"k_proj.weight": whole["mha.k_proj.weight"]}
