"""CLIP's text tower applied to prompt embeddings (token embeddings that may be learned)."""

import torch
from torch import nn


class TextEncoder(nn.Module):
    """Maps prompt embeddings (N, L, W) to text features (N, E).

    The features are read at each prompt's end-of-text token, the highest token id in the
    tokenised prompt, exactly as `CLIP.encode_text` does for token ids.
    """

    def __init__(self, clip_model):
        super().__init__()
        self.token_embedding = clip_model.token_embedding
        self.transformer = clip_model.transformer
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection

    @property
    def dtype(self):
        return self.text_projection.dtype

    def forward(self, prompt_embeddings, tokenized_prompts):
        x = prompt_embeddings.to(self.dtype) + self.positional_embedding.to(self.dtype)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # the blocks take (L, N, W)
        x = self.ln_final(x).to(self.dtype)
        end_of_text = tokenized_prompts.argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), end_of_text] @ self.text_projection

    def encode_tokens(self, tokenized_prompts):
        """Features of fixed prompts given as token ids (N, L): CLIP.encode_text."""
        return self(self.token_embedding(tokenized_prompts), tokenized_prompts)
