"""CoCoOp: conditional prompt learning (Zhou et al., CVPR 2022), a conditional prompt source.

CoOp's learned context c_1 .. c_n is shifted, per image, by a bias computed from that image: with
f^ the L2-normalised image feature, pi = meta_net(f^) and every context token becomes c_i + pi.
Each image thus gets its own prompts "[SOS] c_1+pi .. c_n+pi <class>. [EOS]" for the K classes and
its own class text features: forward(text_encoder, image_features) returns (B, K, E), which the
classifier (with or without the RAda head) compares with that image's feature only.

The meta-net is Linear(vis_dim, vis_dim // 16) -> ReLU -> Linear(vis_dim // 16, ctx_dim), vis_dim
the image feature width and ctx_dim the text token width. Parameter names are CoCoOp's (`ctx`,
`meta_net.linear1.*`, `meta_net.linear2.*`), so the prompt learners of CoCoOp's released
checkpoints load into this one. CoCoOp converts the meta-net to fp16 under PREC fp16; here its
weights stay float32 master weights and it computes in the image features' dtype, which is fp16
under that precision too.

Every image costs K text-encoder sequences, in training and at test: this is CoCoOp's price.
"""

import logging

import torch
from torch import nn
from torch.nn import functional as F

from .backbones import as_backbone
from .prompts import LearnedContext, context_words, initial_context

logger = logging.getLogger(__name__)


class MetaNet(nn.Module):
    """CoCoOp's meta-net: image feature (B, vis_dim) -> context bias (B, ctx_dim), computed in the
    dtype of its input from float32 weights."""

    def __init__(self, vis_dim, ctx_dim):
        super().__init__()
        self.linear1 = nn.Linear(vis_dim, vis_dim // 16)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(vis_dim // 16, ctx_dim)

    def forward(self, image_features):
        dtype = image_features.dtype
        hidden = self.relu(F.linear(image_features, self.linear1.weight.to(dtype), self.linear1.bias.to(dtype)))
        return F.linear(hidden, self.linear2.weight.to(dtype), self.linear2.bias.to(dtype))


class CoCoOpPromptLearner(LearnedContext):
    """CoCoOp's prompts: one learned context shared by the classes, shifted per image by the
    meta-net's bias; see the module docstring. With CTX_INIT words the context is their token
    embeddings and their number sets its length (n_ctx is then ignored), as in CoCoOp."""

    conditional = True

    def __init__(self, backbone, classnames, n_ctx=16, ctx_init=""):
        backbone = as_backbone(backbone)
        ctx_dim = backbone.text_encoder.token_embedding.weight.shape[1]
        ctx_init = context_words(ctx_init)
        if ctx_init:
            n_ctx = len(ctx_init.split(" "))
        ctx, prefix_text = initial_context(backbone, ctx_init, n_ctx, (n_ctx, ctx_dim))
        super().__init__(backbone, classnames, ctx, prefix_text)
        vis_dim = backbone.embed_dim
        self.meta_net = MetaNet(vis_dim, ctx_dim)
        logger.info("CoCoOp context: %d tokens, initialised as %r; meta-net %d -> %d -> %d",
                    n_ctx, prefix_text, vis_dim, vis_dim // 16, ctx_dim)

    def image_contexts(self, image_features):
        """Each image's context (B, n, W): the learned context plus the meta-net's bias of the
        normalised image feature, the same bias on every context token."""
        bias = self.meta_net(F.normalize(image_features, dim=-1))
        return self.ctx.unsqueeze(0) + bias.unsqueeze(1)

    def forward(self, text_encoder, image_features):
        """Per-image class text features (B, K, E) of image features (B, E)."""
        # One text-encoder call per image, as CoCoOp: at most K sequences in memory at once, where
        # the whole batch at test (100 images) would be 100 x K.
        return torch.stack([
            text_encoder(self.prompt_embeddings(ctx=ctx), self.tokenized_prompts)
            for ctx in self.image_contexts(image_features)
        ])


def cocoop_prompt_learner(cfg, backbone, classnames):
    """The CoCoOpPromptLearner that TRAINER.COCOOP describes."""
    cocoop = cfg.TRAINER.COCOOP
    return CoCoOpPromptLearner(backbone, classnames, n_ctx=cocoop.N_CTX, ctx_init=cocoop.CTX_INIT)
