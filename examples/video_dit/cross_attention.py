"""Dense core_attention for text cross-attention (queries: video tokens, keys: caption tokens).

megatron_dsv's SDPADotProductAttention is a self-attention core (it requires query and
key of one length), and Megatron's local DotProductAttention needs CUDA (its dropout
runs under the CUDA RNG tracker), so the example brings this small CPU-capable one.
It has Megatron's core_attention constructor and forward signature.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class TextCrossCoreAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, k_channels: Optional[int] = None,
                 v_channels: Optional[int] = None, cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.no_mask, AttnMaskType.padding):
            raise NotImplementedError(f"TextCrossCoreAttention: attn_mask_type={attn_mask_type.name} unsupported")
        if (config.attention_dropout if attention_dropout is None else attention_dropout):
            raise NotImplementedError("TextCrossCoreAttention has no attention dropout; set attention_dropout=0")
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("TextCrossCoreAttention supports no mask, bias or packed sequences")
        sq, b, h, d = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        out = F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, h * d)
