"""LLaVA's modality- and length-grouped sampler, seeded per epoch (so a resumed run sees the same order).

Written here because neither transformers nor accelerate groups by modality. Indices come out in "megabatches" of
world_size x batch_size records of one modality; accelerate deals consecutive batches of the stream to the ranks,
so in one step every rank trains on image records or every rank on text-only records, each rank getting a batch
of similar lengths. Leftovers of both modalities form one mixed megabatch at the end.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


def _split_even(indices: list[int], lengths: list[int], chunks: int) -> list[list[int]]:
    """Deal indices (longest first) to `chunks` groups of equal count, each to the group with the least total length."""
    if len(indices) % chunks:
        return [indices[i::chunks] for i in range(chunks)]
    per_chunk = len(indices) // chunks
    groups: list[list[int]] = [[] for _ in range(chunks)]
    totals = [0] * chunks
    for i in indices:
        g = min((k for k in range(chunks) if len(groups[k]) < per_chunk), key=lambda k: totals[k])
        groups[g].append(i)
        totals[g] += lengths[i]
    return groups


def _length_grouped(lengths: list[int], batch_size: int, world_size: int, generator: torch.Generator) -> list[int]:
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    size = batch_size * world_size
    out = []
    for start in range(0, len(perm), size):
        mega = sorted(perm[start : start + size], key=lambda i: lengths[i], reverse=True)
        for group in _split_even(mega, lengths, world_size):
            out.extend(group)
    return out


def modality_length_grouped_indices(lengths: list[int], batch_size: int, world_size: int, generator: torch.Generator) -> list[int]:
    """`lengths`: > 0 for image records, < 0 for text-only ones (absolute value = estimated length)."""
    if all(n > 0 for n in lengths) or all(n < 0 for n in lengths):
        return _length_grouped([abs(n) for n in lengths], batch_size, world_size, generator)
    mm = [i for i, n in enumerate(lengths) if n > 0]
    text = [i for i, n in enumerate(lengths) if n < 0]
    size = batch_size * world_size
    megabatches = []
    for subset in (mm, text):
        order = _length_grouped([abs(lengths[i]) for i in subset], batch_size, world_size, generator)
        ordered = [subset[k] for k in order]
        megabatches.append([ordered[s : s + size] for s in range(0, len(ordered), size)])
    leftovers = megabatches[0][-1] + megabatches[1][-1]
    full = megabatches[0][:-1] + megabatches[1][:-1]
    full = [full[k] for k in torch.randperm(len(full), generator=generator).tolist()]
    if leftovers:
        full.append(sorted(leftovers))
    return [i for mega in full for i in mega]


class ModalityLengthGroupedSampler(Sampler[int]):
    def __init__(self, lengths: list[int], batch_size: int, world_size: int, seed: int):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, g))
