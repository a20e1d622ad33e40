"""Feature-adapter trainers: CLIP-Adapter, and the RAda head on top of it (the paper's best EFT
setting). CLIP is frozen; the class texts are fixed hand-crafted prompts."""

import logging

from .core.adapters import FeatureAdapter
from .engine import CLIPTrainer, register_trainer
from .core.errors import UserFacingError
from .core.model import CLIPClassifier
from .core.prompts import FixedPrompts, zero_shot_template
from .rada_trainers import RAdaMixin

logger = logging.getLogger(__name__)


class AdapterTrainer(CLIPTrainer):
    """What the adapter trainers share: TRAINER.ADAPTER and the adapter it describes. Subclasses
    set DEFAULT_RATIO and DEFAULT_TEXT, used where the config says None."""

    PREC_NODE = "ADAPTER"
    DEFAULT_RATIO = None
    DEFAULT_TEXT = None

    def check_cfg(self, cfg):
        super().check_cfg(cfg)
        settings = self.adapter_settings(cfg)
        ratio, reduction = settings["ratio"], cfg.TRAINER.ADAPTER.REDUCTION
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise UserFacingError(f"TRAINER.ADAPTER.RATIO is {ratio!r}; it must be a number in (0, 1].")
        if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
            raise UserFacingError(f"TRAINER.ADAPTER.REDUCTION is {reduction!r}; it must be a positive integer.")
        if not isinstance(settings["adapt_text"], bool):
            raise UserFacingError(f"TRAINER.ADAPTER.TEXT is {settings['adapt_text']!r}; it must be True or False.")

    @classmethod
    def adapter_settings(cls, cfg):
        """Residual ratio and adapted features from the config, the trainer's own where it says None."""
        adapter = cfg.TRAINER.ADAPTER
        return {
            "ratio": cls.DEFAULT_RATIO if adapter.RATIO is None else adapter.RATIO,
            "adapt_text": cls.DEFAULT_TEXT if adapter.TEXT is None else adapter.TEXT,
        }

    def build_adapter(self):
        adapter = self.cfg.TRAINER.ADAPTER
        width = self.backbone["embed_dim"]
        if width // adapter.REDUCTION < 1:
            raise UserFacingError(
                f"TRAINER.ADAPTER.REDUCTION {adapter.REDUCTION} leaves no hidden unit for features of width {width}."
            )
        settings = self.adapter_settings(self.cfg)
        logger.info(
            "Adapters on the image%s features: width %d -> %d -> %d, residual ratio %s",
            " and text" if settings["adapt_text"] else "", width, width // adapter.REDUCTION, width, settings["ratio"],
        )
        return FeatureAdapter(width, adapter.REDUCTION, **settings)


@register_trainer
class CLIPAdapter(AdapterTrainer):
    """A residual bottleneck adapter on CLIP's image features, with CoOp's zero-shot prompt of the
    dataset (as CLIP-Adapter's code; TRAINER.ADAPTER.TEXT True adapts the text features too)."""

    DEFAULT_RATIO = 0.2
    DEFAULT_TEXT = False

    def prompt_template(self):
        return zero_shot_template(self.cfg.DATASET.NAME)

    def build_classifier(self, clip_model, classnames):
        prompts = FixedPrompts(classnames, self.prompt_template())
        return CLIPClassifier(clip_model, prompts, adapter=self.build_adapter())

    def trainable_modules(self):
        return {"adapter": self.model.adapter}


@register_trainer
class RAdaAdapter(RAdaMixin, AdapterTrainer):
    """Adapters on the image and text features and the RAda head, trained together, with the RAda
    trainer's hand-crafted prompt."""

    DEFAULT_RATIO = 0.5  # the RAda authors' f + A(f), see trainers/core/adapters.py
    DEFAULT_TEXT = True

    def prompt_template(self):
        return self.cfg.TRAINER.RADA.TEMPLATE or zero_shot_template(self.cfg.DATASET.NAME)

    def build_classifier(self, clip_model, classnames):
        prompts = FixedPrompts(classnames, self.prompt_template())
        return CLIPClassifier(clip_model, prompts, head=self.build_head(), adapter=self.build_adapter())

    def trainable_modules(self):
        return {"adapter": self.model.adapter, "rada_head": self.model.head}
