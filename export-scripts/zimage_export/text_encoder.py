"""Export wrapper for the Qwen3 text encoder: returns transformers' `hidden_states[-2]`.

`hidden_states[-2]` is the output of decoder layer n-2 (0-based), before the final norm. So the
wrapper keeps the embedding table and the first n-1 decoder layers only: the last layer, the
final norm and the LM head are pruned (for Qwen3-4B that drops 0.1 B of 4.0 B parameters and,
with tied embeddings, avoids a second copy of the vocabulary matrix).

The attention mask is built like transformers' create_causal_mask for right padding: causal,
and padded keys are hidden. Padded query rows still see the real tokens before them, so every
position (not only the real ones) matches transformers.
"""

import torch
from torch import nn


class TextEncoderExport(nn.Module):
    """Inputs: input_ids [B,S] int64, attention_mask [B,S] int64 (1 = real). Output: [B,S,D] float32."""

    def __init__(self, causal_lm: nn.Module):
        super().__init__()
        base = causal_lm.model  # Qwen3Model inside Qwen3ForCausalLM
        n_layers = len(base.layers)
        if n_layers < 2:
            # (with one, hidden_states[-2] would be the token embedding alone, and the exported
            # graph would have no use for its attention_mask input)
            raise ValueError(f"the text encoder has {n_layers} decoder layer(s): Z-Image reads hidden_states[-2] "
                             "(the second-to-last layer's output), which needs at least 2")
        self.embed_tokens = base.embed_tokens
        self.rotary_emb = base.rotary_emb
        self.layers = nn.ModuleList(base.layers[: n_layers - 1])
        for layer_type in getattr(base.config, "layer_types", None) or []:
            if layer_type != "full_attention":
                raise ValueError(f"unsupported attention layer type {layer_type!r}")

    def forward(self, input_ids, attention_mask):
        seq = input_ids.shape[1]
        hidden = self.embed_tokens(input_ids)
        position_ids = torch.arange(seq, device=input_ids.device)[None, :]
        position_embeddings = self.rotary_emb(hidden, position_ids)
        idx = torch.arange(seq, device=input_ids.device)
        causal = idx[None, :] <= idx[:, None]  # [S_q, S_k]
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # [B, 1, S, S]
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings, position_ids=position_ids)
        return hidden.float()
