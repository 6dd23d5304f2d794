"""The project's one target matcher agrees with what PEFT wraps, and the distributed helpers' one-process answers."""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from milora_vlm import dist
from milora_vlm.milora.targets import matches_target
from milora_vlm.model.tiny import build_tiny_llava


@pytest.mark.parametrize("targets", [
    ["q_proj", "v_proj"],
    ["language_model.layers.0.self_attn.k_proj", "up_proj"],
    r".*language_model.*\.(q_proj|o_proj)",
    r"q_proj",  # a regex must match the whole path: hits nothing
])
def test_matches_target_is_what_peft_wraps(tiny_tokenizer, targets):
    model, _ = build_tiny_llava(tiny_tokenizer)
    names = [n for n, _ in model.named_modules() if n]
    ours = {n for n in names if matches_target(targets, n)}
    if not ours:
        with pytest.raises(ValueError):  # PEFT refuses a config that matches nothing
            get_peft_model(model, LoraConfig(r=2, target_modules=targets))
        return
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
    wrapped = {n for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    assert ours == wrapped
    assert any("vision_tower" in n for n in ours) == (isinstance(targets, list) and "q_proj" in targets)


def test_distributed_helpers_without_a_process_group(monkeypatch):
    assert not dist.is_initialized()
    assert (dist.rank(), dist.world_size()) == (0, 1)
    dist.barrier()  # a no-op, not an error
    assert dist.gather_object({"a": 1}) == [{"a": 1}]
    assert dist.any_rank(True) and not dist.any_rank(False)
    assert dist.all_ranks(True) and not dist.all_ranks(False)
    assert dist.mean_over_ranks(2.5) == 2.5
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist.launcher_rank_and_world() == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert dist.launcher_rank_and_world() == (3, 4)
