"""Forgetting (MiLoRA paper, analysis section): how far a finetuned model's predictions moved from its base's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from milora_vlm.data.templates import IGNORE_INDEX


@dataclass
class Forgetting:
    ce: float  # forgetting_ce's figure
    agreement: float  # fraction of scored positions where the finetuned greedy token is the base's
    positions: int  # how many positions were scored


@torch.no_grad()
def forgetting_stats(finetuned: nn.Module, base: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> Forgetting:
    """How far the finetuned model's predictions moved from the base model's on held-out old-task text.

    Definition (the MiLoRA paper's "cross-entropy against the base model's predictions"): at every scored
    position t, the target is the base model's greedy next token argmax_v p_base(v | x_<=t), and `ce` is the
    finetuned model's cross-entropy -log p_ft(target | x_<=t), averaged over all scored positions of all
    batches (token-weighted). Scored positions: those whose next token is an answer token (labels[t+1] !=
    -100) when the batch has `labels`, else every position whose next token is attended (attention_mask[t+1]
    = 1). `ce` is 0 only if the finetuned model puts all its mass on the base's prediction; it mixes
    agreement with confidence (a finetuned model surer of the base's own answer scores lower than the base
    itself), so `agreement`, the share of positions where both greedy tokens are equal, is reported with it.

    Batches are model inputs (input_ids, attention_mask, pixel_values, ...) plus optional labels; both
    models must be on the batches' device and in eval mode (this function does not move or switch them).
    """
    total, agree, count = 0.0, 0, 0
    for batch in tqdm(batches, desc="forgetting CE", unit="batch", leave=False):
        labels = batch.get("labels")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if labels is not None:
            mask = labels[:, 1:] != IGNORE_INDEX
        elif "attention_mask" in batch:
            mask = batch["attention_mask"][:, 1:].bool()
        else:
            mask = torch.ones_like(batch["input_ids"][:, 1:], dtype=torch.bool)
        target = base(**inputs).logits[:, :-1].argmax(-1)
        logits = finetuned(**inputs).logits[:, :-1].float()
        if logits.shape[:2] != mask.shape:
            raise ValueError(f"logits cover {tuple(logits.shape[:2])} positions but the mask {tuple(mask.shape)}")
        total += float(torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum"))
        agree += int((logits[mask].argmax(-1) == target[mask]).sum())
        count += int(mask.sum())
    if count == 0:
        raise ValueError("forgetting_ce: no scored position in the batches (all labels are -100?)")
    return Forgetting(total / count, agree / count, count)


def forgetting_ce(finetuned: nn.Module, base: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """The MiLoRA paper's forgetting figure (lower = closer to the base); see `forgetting_stats`."""
    return forgetting_stats(finetuned, base, batches).ce
