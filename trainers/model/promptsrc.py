"""PromptSRC's pieces (spec: /work/shared/docs/prompt-methods.md section 2): IVLP's prompts
regularised by the frozen, unprompted CLIP and averaged over epochs with Gaussian weights.

- Teacher text features: for each class, the mean over the 60 ImageNet templates
  (TEMPLATE_SETS["promptsrc_imagenet"]) of the frozen text tower's UN-normalised features, then
  L2-normalised.
- Loss: CE + KL(teacher || student) summed and divided by B*K + TEXT_LOSS_WEIGHT * L1(prompted text
  features, teacher text features) + IMAGE_LOSS_WEIGHT * L1(prompted image features, teacher image
  features), L1 being the mean absolute difference over all elements (features L2-normalised).
- Gaussian prompt aggregation (GPA): the trained tensors after epoch a (1..N) weighted by the
  Gaussian pdf N(a; GPA_MEAN, GPA_STD) normalised to sum 1; the weighted sum replaces the trained
  tensors after the last epoch.

No Dassl here: the trainers are in trainers/promptsrc_trainers.py.
"""

import math

import torch
from torch.nn import functional as F

from .prompts import TEMPLATE_SETS, fill_template

TEACHER_TEMPLATES = "promptsrc_imagenet"


@torch.no_grad()
def teacher_text_features(text_encoder, classnames, templates=TEMPLATE_SETS[TEACHER_TEMPLATES]):
    """(K, E) float32: normalize(mean over templates of the unnormalised class features)."""
    device = text_encoder.token_embedding.weight.device
    total = 0.0
    for template in templates:  # a template at a time bounds memory
        tokens = text_encoder.tokenizer(fill_template(template, classnames)).to(device)
        total = total + text_encoder.encode_tokens(tokens).float()
    return F.normalize(total / len(templates), dim=-1)


def teacher_logits(logit_scale, teacher_image_features, teacher_text_features):
    """The frozen CLIP's logits s * f_zs . e^T of normalised features."""
    return logit_scale.exp().float() * teacher_image_features.float() @ teacher_text_features.float().t()


def distillation_kl(logits, teacher_logits):
    """KL(softmax(teacher) || softmax(student)) summed over the batch and classes, divided by B*K."""
    return F.kl_div(F.log_softmax(logits.float(), dim=-1), F.log_softmax(teacher_logits.float(), dim=-1),
                    reduction="sum", log_target=True) / logits.numel()


def feature_l1(features, teacher_features):
    """Mean absolute difference over all elements."""
    return F.l1_loss(features.float(), teacher_features.float(), reduction="mean")


def promptsrc_loss(logits, labels, teacher_logits, image_features, teacher_image_features, text_features,
                   teacher_text_features, text_weight, image_weight):
    """PromptSRC's objective: CE + KL to the teacher + weighted L1 on text and on image features."""
    return (F.cross_entropy(logits, labels) + distillation_kl(logits, teacher_logits)
            + text_weight * feature_l1(text_features, teacher_text_features)
            + image_weight * feature_l1(image_features, teacher_image_features))


def gaussian_weights(epochs, mean, std):
    """GPA's weight of each epoch 1..epochs: the Gaussian pdf N(a; mean, std), normalised to sum 1."""
    density = [math.exp(-((epoch - mean) ** 2) / (2 * std ** 2)) / (std * math.sqrt(2 * math.pi))
               for epoch in range(1, epochs + 1)]
    total = sum(density)
    if total == 0:
        raise ValueError(f"GPA_MEAN {mean} and GPA_STD {std} give every one of the {epochs} epochs weight 0")
    return [value / total for value in density]


class PromptAverage:
    """GPA's running sum over epochs of weight(epoch) * trained tensors, kept on the CPU in float32.

    `weights[e]` is epoch e's weight (0-based). state_dict / load_state_dict give a checkpoint the
    sum and the epochs it holds, so that a resumed run continues the very same sum.
    """

    def __init__(self, weights):
        self.weights = list(weights)
        self.total = {}
        self.epochs = []

    def add(self, epoch, tensors):
        """Adds weight(epoch) * each tensor of {name: tensor} (epoch 0-based, each epoch once)."""
        if epoch in self.epochs:
            raise ValueError(f"epoch {epoch + 1} is in the prompt average already")
        weight = self.weights[epoch]
        for name, tensor in tensors.items():
            term = tensor.detach().float().cpu() * weight
            self.total[name] = self.total[name] + term if name in self.total else term
        self.epochs.append(epoch)

    def state_dict(self):
        return {"weights": list(self.weights), "total": {name: t.clone() for name, t in self.total.items()},
                "epochs": list(self.epochs)}

    def load_state_dict(self, state):
        self.weights = list(state["weights"])
        self.total = {name: t.clone().float().cpu() for name, t in state["total"].items()}
        self.epochs = list(state["epochs"])
