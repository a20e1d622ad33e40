"""Feature-adapter trainers: CLIP-Adapter, and the RAda head on top of it (the paper's best EFT
setting). CLIP is frozen; the class texts are fixed hand-crafted prompts."""

from .engine import CLIPTrainer, register_trainer
from .model.compositions import COMPOSITIONS


@register_trainer
class CLIPAdapter(CLIPTrainer):
    """A residual bottleneck adapter on CLIP's image features, with CoOp's zero-shot prompt of the
    dataset (as CLIP-Adapter's code; TRAINER.ADAPTER.TEXT True adapts the text features too)."""

    composition = COMPOSITIONS["CLIPAdapter"]


@register_trainer
class RAdaAdapter(CLIPTrainer):
    """Adapters on the image and text features and the RAda head, trained together, with the RAda
    trainer's hand-crafted prompt (its configs set the RAda authors' ratio and text adapter)."""

    composition = COMPOSITIONS["RAdaAdapter"]
