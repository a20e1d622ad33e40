"""The RAda head as the method spec states it, every K x K attention matrix built whole.

The reference for the tests and the baseline of `bench/head.py`.
"""

import math

import torch


def dense_reference(head, image_features, text_features, scale):
    """The method spec written out literally: every K x K attention matrix is built whole, per image.

    text_features: (K, D) shared by the batch, or (B, K, D), each image's own class features.
    """
    batch, dim = image_features.shape
    if text_features.dim() == 2:
        text_features = text_features[None, :, :].expand(batch, -1, -1)
    num_classes = text_features.shape[1]
    heads, head_dim = head.num_heads, dim // head.num_heads
    rational = image_features[:, None, :] * text_features
    queries = [
        math.sqrt(scale) * image_features[:, None, :].expand(batch, num_classes, dim),
        math.sqrt(scale) * text_features,
        scale * rational,
    ]
    key_value = scale * rational

    def project(layer, x):
        return x @ layer.weight.t() + layer.bias

    def split(x):
        return x.reshape(batch, num_classes, heads, head_dim).transpose(1, 2)

    key = split(project(head.k_proj, key_value))
    value = split(project(head.v_proj, key_value))
    attention = 0
    for layer, query in zip((head.q_proj1, head.q_proj2, head.q_proj3), queries, strict=False):
        scores = split(project(layer, query)) @ key.transpose(-1, -2) / math.sqrt(head_dim)
        flat = torch.softmax(scores.reshape(batch, heads, -1) / head.temperature, dim=-1)
        attention = attention + flat.reshape(batch, heads, num_classes, num_classes) * num_classes
    mixed = (attention / 3) @ value
    mixed = mixed.transpose(1, 2).reshape(batch, num_classes, dim)
    mask = torch.relu(1 + project(head.out_proj, mixed))
    return scale * (mask * rational).sum(-1), mask
