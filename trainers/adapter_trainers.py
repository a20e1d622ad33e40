"""Feature-adapter trainers: CLIP-Adapter, and the RAda head on top of it (the paper's best EFT
setting). CLIP is frozen; the class texts are fixed hand-crafted prompts."""

import logging

from .engine import CLIPTrainer, register_trainer
from .errors import UserFacingError
from .model.adapters import FeatureAdapter
from .model.classifier import CLIPClassifier
from .model.prompts import FixedPrompts, zero_shot_template
from .rada_trainers import RAdaMixin

logger = logging.getLogger(__name__)


class AdapterTrainer(CLIPTrainer):
    """What the adapter trainers share: TRAINER.ADAPTER and the adapter it describes."""

    PREC_NODE = "ADAPTER"

    def build_adapter(self):
        adapter = self.cfg.TRAINER.ADAPTER
        width = self.backbone["embed_dim"]
        if width // adapter.REDUCTION < 1:
            raise UserFacingError(
                f"TRAINER.ADAPTER.REDUCTION {adapter.REDUCTION} leaves no hidden unit for features of width {width}."
            )
        logger.info(
            "Adapters on the image%s features: width %d -> %d -> %d, residual ratio %s",
            " and text" if adapter.TEXT else "", width, width // adapter.REDUCTION, width, adapter.RATIO,
        )
        return FeatureAdapter(width, adapter.REDUCTION, ratio=adapter.RATIO, adapt_text=adapter.TEXT)


@register_trainer
class CLIPAdapter(AdapterTrainer):
    """A residual bottleneck adapter on CLIP's image features, with CoOp's zero-shot prompt of the
    dataset (as CLIP-Adapter's code; TRAINER.ADAPTER.TEXT True adapts the text features too)."""

    def prompt_template(self):
        return zero_shot_template(self.cfg.DATASET.NAME)

    def build_classifier(self, backbone, classnames):
        prompts = FixedPrompts(classnames, self.prompt_template())
        return CLIPClassifier(backbone, prompts, adapter=self.build_adapter())

    def trainable_modules(self):
        return {"adapter": self.model.adapter}


@register_trainer
class RAdaAdapter(RAdaMixin, AdapterTrainer):
    """Adapters on the image and text features and the RAda head, trained together, with the RAda
    trainer's hand-crafted prompt (its configs set the RAda authors' ratio and text adapter)."""

    def prompt_template(self):
        return self.cfg.TRAINER.RADA.TEMPLATE or zero_shot_template(self.cfg.DATASET.NAME)

    def build_classifier(self, backbone, classnames):
        prompts = FixedPrompts(classnames, self.prompt_template())
        return CLIPClassifier(backbone, prompts, head=self.build_head(), adapter=self.build_adapter())

    def trainable_modules(self):
        return {"adapter": self.model.adapter, "rada_head": self.model.head}
