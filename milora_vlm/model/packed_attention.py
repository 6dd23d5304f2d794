"""sdpa attention that runs each packed sample on its own, for padding-free batches without flash-attention.

transformers confines packed samples (position_ids restarting at 0 within a row, no attention mask) by a row x row
mask: correct, but sdpa then computes every score of the row, masked or not, and cannot use its causal kernel, so a
packed row of n samples costs about n times its useful attention work. flash-attention avoids that with its
variable-length kernel, which needs CUDA. This registers the same idea for sdpa: one causal sdpa call per sample of
the row, which costs what the samples alone would. Any batch that is not packed (padded training, evaluation,
generation) goes to transformers' own sdpa unchanged. Written here because transformers has no variable-length
sdpa and torch's flex_attention has no backward on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

PACKED_SDPA = "milora_packed_sdpa"


def packed_sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                  position_ids=None, **kwargs):
    """query [B, H, L, D], key / value [B, Hkv, L, D] -> ([B, L, H, D], None), as transformers' attention functions."""
    length = query.shape[2]
    # packed rows (milora_vlm.data.collator) start at position 0 and restart at 0 for each sample
    packed = (position_ids is not None and length > 1 and key.shape[2] == length
              and bool((position_ids[:, 0] == 0).all()) and bool((position_ids[:, 1:] == 0).any()))
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = torch.empty_like(query)
    for row, positions in enumerate(position_ids.expand(query.shape[0], -1).tolist()):
        starts = [i for i, p in enumerate(positions) if p == 0] + [length]  # starts[0] == 0
        for s, e in zip(starts, starts[1:]):  # the row's trailing padding is a segment too (its labels are ignored)
            out[row, :, s:e] = F.scaled_dot_product_attention(
                query[row : row + 1, :, s:e], key[row : row + 1, :, s:e], value[row : row + 1, :, s:e],
                dropout_p=dropout, scale=scaling, is_causal=True,
            )[0]
    return out.transpose(1, 2).contiguous(), None


def use_packed_sdpa(model: torch.nn.Module) -> bool:
    """Switch the language model of `model` from sdpa to the per-sample sdpa above; returns whether it did (not
    for eager, which stays mask-based, nor for flash-attention, whose own kernel is variable-length)."""
    config = model.config.get_text_config()
    if config._attn_implementation != "sdpa":
        return config._attn_implementation == PACKED_SDPA
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention_forward)
    # masks as for sdpa, for the batches that are not packed
    AttentionMaskInterface.register(PACKED_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    config._attn_implementation = PACKED_SDPA
    return True
