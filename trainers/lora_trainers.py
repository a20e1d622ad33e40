"""CLIP-LoRA and RAdaLoRA: low-rank updates of the attention projections of both towers
(trainers/model/lora.py), alone or trained together with the RAda head, on frozen CLIP with the
fixed prompt "a photo of a {}." (TRAINER.LORA.TEMPLATE). They need no prompt embeddings, so they
run on every backbone whose towers have attention blocks.

CLIP-LoRA's recipe, as the configs set it: AdamW (lr 2e-4, betas (0.9, 0.999), weight decay 0.01)
over the LoRA matrices (and the head), batch 32, N_ITERS x shots optimiser steps (500 x 16 = 8,000)
and a cosine from OPTIM.LR down to TRAINER.LORA.MIN_LR (1e-6) stepped after every optimiser step,
without warm-up. CLIP-LoRA stops mid-epoch at exactly N_ITERS x shots steps; here the run is
rounded up to whole epochs (fewer than one epoch's batches more) and the cosine spans them all.
"""

import logging
import math

from dassl.optim import build_optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR

from .engine import CLIPTrainer, register_trainer
from .errors import UserFacingError
from .model.compositions import COMPOSITIONS

logger = logging.getLogger(__name__)


class LoRATrainer(CLIPTrainer):
    """What CLIPLoRA and RAdaLoRA share: the length of the run in optimiser steps and the per-step schedule."""

    PER_STEP_SCHEDULE = "decays the learning rate with a cosine over its optimiser steps, without warm-up"

    def check_cfg(self, cfg):
        super().check_cfg(cfg)
        if cfg.TRAINER.LORA.N_ITERS > 0 and cfg.DATASET.NUM_SHOTS < 1:
            raise UserFacingError(
                f"TRAINER.LORA.N_ITERS {cfg.TRAINER.LORA.N_ITERS} counts steps per shot, and DATASET.NUM_SHOTS is "
                f"{cfg.DATASET.NUM_SHOTS} (every image): set TRAINER.LORA.N_ITERS 0 and OPTIM.MAX_EPOCH instead."
            )

    def build_data_loader(self):
        """Also sets the number of epochs from TRAINER.LORA.N_ITERS, which needs the batches per epoch."""
        super().build_data_loader()
        iterations = self.cfg.TRAINER.LORA.N_ITERS * self.cfg.DATASET.NUM_SHOTS
        if iterations <= 0:
            return
        batches = len(self.train_loader_x)
        epochs = math.ceil(iterations / batches)
        logger.info("TRAINER.LORA.N_ITERS %d x %d shots = %d optimiser steps: %d epochs of %d batches (%d steps; "
                    "OPTIM.MAX_EPOCH %d is replaced)", self.cfg.TRAINER.LORA.N_ITERS, self.cfg.DATASET.NUM_SHOTS,
                    iterations, epochs, batches, epochs * batches, self.cfg.OPTIM.MAX_EPOCH)
        cfg = self.cfg.clone()  # the run's records name the epochs it trains
        cfg.defrost()
        cfg.OPTIM.MAX_EPOCH = epochs
        cfg.freeze()
        self.cfg = cfg
        self.max_epoch = epochs

    def build_optimization(self, name, module):
        params = [p for p in module.parameters() if p.requires_grad]
        optim = build_optimizer(None, self.cfg.OPTIM, param_groups=params)
        total_steps = self.max_epoch * len(self.train_loader_x)
        return optim, CosineAnnealingLR(optim, T_max=total_steps, eta_min=self.cfg.TRAINER.LORA.MIN_LR)


@register_trainer
class CLIPLoRA(LoRATrainer):
    """CLIP-LoRA: the low-rank updates alone, trained with cross-entropy on CLIP's logits."""

    composition = COMPOSITIONS["CLIPLoRA"]


@register_trainer
class RAdaLoRA(LoRATrainer):
    """The low-rank updates and the RAda head, trained together (one optimiser each, the same recipe)."""

    composition = COMPOSITIONS["RAdaLoRA"]
