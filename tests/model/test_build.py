"""Composing a LLaVA from saved parts, loading it, and declaring what trains."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionModel,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from milora_vlm.config import ConfigError, ModelSection, build_recipe
from milora_vlm.model.build import compose_llava
from milora_vlm.model.load import load_for_training
from milora_vlm.model.tiny import build_tiny_causal_lm, tiny_image_processor, tiny_vision_config
from milora_vlm.model.trainable import apply_trainable, language_model_regex
from milora_vlm.train.trainer import optimizer_groups
from tests.helpers import REPO


def plain_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer *without* an <image> token (like Vicuna's), so composing must add it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["what shape is this? a red circle"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    tok = plain_tokenizer()
    lm = build_tiny_causal_lm(tok)
    lm.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    clip = CLIPVisionModel(tiny_vision_config(image_size=32, patch_size=8))
    clip.save_pretrained(root / "clip")
    tiny_image_processor(32).save_pretrained(root / "clip")
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                  num_attention_heads=4, image_size=32, patch_size=8))
    siglip.save_pretrained(root / "siglip")
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "siglip")
    return root, lm, clip, siglip, len(tok)


def test_compose_clip_llava_keeps_the_parts_and_adds_the_image_token(parts, tmp_path):
    root, lm, clip, _, vocab = parts
    out = compose_llava(str(root / "lm"), str(root / "clip"), str(tmp_path / "llava"), projector="mlp2x_gelu")
    loaded = load_for_training(ModelSection(kind="llava", path=out), torch.float32)
    model = loaded.model
    assert isinstance(model, LlavaForConditionalGeneration)
    assert loaded.num_image_tokens == 16  # (32 / 8)^2 patches, CLS dropped by the "default" strategy
    assert loaded.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id == vocab
    assert model.get_input_embeddings().weight.shape[0] == vocab + 1
    torch.testing.assert_close(model.model.language_model.layers[0].self_attn.q_proj.weight,
                               lm.model.layers[0].self_attn.q_proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.get_input_embeddings().weight[:vocab], lm.model.embed_tokens.weight, rtol=0, atol=0)
    tower, original = model.model.vision_tower.state_dict(), clip.state_dict()
    assert tower.keys() == original.keys()
    for key in original:
        torch.testing.assert_close(tower[key], original[key], rtol=0, atol=0)
    assert model.config.projector_hidden_act == "gelu" and model.config.vision_feature_layer == -2
    enc = loaded.processing_class(text="<image>\nwhat shape", images=[Image.new("RGB", (40, 30))], return_tensors="pt")
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 16
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[:2] == enc["input_ids"].shape and torch.isfinite(logits).all()


def test_compose_siglip_needs_the_full_strategy(parts, tmp_path):
    root, *_ = parts
    with pytest.raises(ValueError, match="no CLS token"):
        compose_llava(str(root / "lm"), str(root / "siglip"), str(tmp_path / "a"))
    out = compose_llava(str(root / "lm"), str(root / "siglip"), str(tmp_path / "b"), projector="linear",
                        vision_feature_select_strategy="full")
    loaded = load_for_training(ModelSection(kind="llava", path=out), torch.float32)
    assert loaded.num_image_tokens == 16 and loaded.model.config.projector_hidden_act == "linear"
    enc = loaded.processing_class(text="<image>", images=[Image.new("RGB", (32, 32))], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(loaded.model(**enc).logits).all()


def test_llava_stage1_linear_projector_weights(parts, tmp_path):
    """LLaVA's mm_projector.bin of a linear projector: linear_1 takes it, linear_2 becomes the identity."""
    root, *_ = parts
    w, b = torch.randn(64, 64), torch.randn(64)
    torch.save({"model.mm_projector.weight": w, "model.mm_projector.bias": b}, tmp_path / "mm_projector.bin")
    out = compose_llava(str(root / "lm"), str(root / "clip"), str(tmp_path / "llava"), projector="linear",
                        projector_weights=str(tmp_path / "mm_projector.bin"))
    proj = load_for_training(ModelSection(kind="llava", path=out), torch.float32).model.model.multi_modal_projector
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(proj(x), x @ w.T + b)
    torch.save({"model.mm_projector.0.weight": torch.randn(5, 5)}, tmp_path / "bad.bin")
    with pytest.raises(ValueError, match="does not fit"):
        compose_llava(str(root / "lm"), str(root / "clip"), str(tmp_path / "bad"), projector_weights=str(tmp_path / "bad.bin"))


def test_build_llava_script(parts, tmp_path):
    root, *_ = parts
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "build_llava.py"), "--language-model", str(root / "lm"),
                           "--vision-tower", str(root / "clip"), "--output", str(out), "--projector", "linear"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").exists() and (out / "processor_config.json").exists()
    assert LlavaForConditionalGeneration.from_pretrained(out).config.projector_hidden_act == "linear"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "build_llava.py"), "--language-model", str(root / "lm"),
                           "--vision-tower", str(root / "lm"), "--output", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "CLIP and SigLIP" in proc.stderr


def test_load_model_refuses_a_non_llava_checkpoint(tiny_causal_lm_dir):
    with pytest.raises(ValueError, match="not llava-hf"):
        load_for_training(ModelSection(kind="llava", path=str(tiny_causal_lm_dir)), torch.float32)


# ---- what trains ---------------------------------------------------------------------------------------------

def recipe_for(path, tmp_path, **sections):
    train = tmp_path / "t.jsonl"
    train.write_text("{}\n")
    raw = {
        "model": {"kind": "llava", "path": str(path)},
        "data": {"train_file": str(train)},
        "adapter": {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "trainable": {"projector": "full"},
        "training": {"output_dir": str(tmp_path / "out")},
    }
    raw.update(sections)
    return build_recipe(raw)


def trainable_names(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_adapter_only_on_the_language_model_and_projector_in_modules_to_save(tiny_llava_dir, tmp_path):
    recipe = recipe_for(tiny_llava_dir, tmp_path)
    model = apply_trainable(load_for_training(recipe.model, torch.float32).model, recipe)
    names = trainable_names(model)
    lora = [n for n in names if "lora_" in n]
    assert lora and all("language_model" in n for n in lora)
    assert not any("vision_tower" in n for n in names)
    assert any("multi_modal_projector.modules_to_save" in n for n in names)
    assert model.peft_config["default"].modules_to_save == ["multi_modal_projector"]
    wrapped = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_projector_milora_and_frozen(tiny_llava_dir, tmp_path):
    recipe = recipe_for(tiny_llava_dir, tmp_path, trainable={"projector": "milora"})
    names = trainable_names(apply_trainable(load_for_training(recipe.model, torch.float32).model, recipe))
    assert any("multi_modal_projector.linear_1.lora_A" in n for n in names)
    assert any("multi_modal_projector.linear_2.lora_B" in n for n in names)
    recipe = recipe_for(tiny_llava_dir, tmp_path, trainable={"projector": "frozen"})
    names = trainable_names(apply_trainable(load_for_training(recipe.model, torch.float32).model, recipe))
    assert names and not any("multi_modal_projector" in n for n in names)


def test_no_adapter_runs_train_the_declared_modules(tiny_llava_dir, tmp_path):
    recipe = recipe_for(tiny_llava_dir, tmp_path, adapter=None)
    names = trainable_names(apply_trainable(load_for_training(recipe.model, torch.float32).model, recipe))
    assert names and all("multi_modal_projector" in n for n in names)
    recipe = recipe_for(tiny_llava_dir, tmp_path, adapter=None, trainable={"language_model": "full"})
    names = trainable_names(apply_trainable(load_for_training(recipe.model, torch.float32).model, recipe))
    assert any("language_model.layers.0" in n for n in names) and "lm_head.weight" in names
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in names)


def test_checks_that_need_the_model(tiny_llava_dir, tmp_path):
    recipe = recipe_for(tiny_llava_dir, tmp_path, adapter={"r": 100, "target_modules": ["q_proj"]})
    with pytest.raises(ConfigError, match=r"adapter.r 100 .*64x64.*adapter.r <= 64"):
        apply_trainable(load_for_training(recipe.model, torch.float32).model, recipe)
    recipe = recipe_for(tiny_llava_dir, tmp_path, adapter={"r": 4, "target_modules": r".*\.(q_proj|v_proj)"})
    with pytest.raises(ConfigError, match="vision tower"):
        apply_trainable(load_for_training(recipe.model, torch.float32).model, recipe)
    recipe = recipe_for(tiny_llava_dir, tmp_path, adapter={"r": 4, "target_modules": ["qproj"]})
    with pytest.raises(ConfigError, match="matches no Linear module.*q_proj"):
        apply_trainable(load_for_training(recipe.model, torch.float32).model, recipe)


def test_language_model_regex():
    import re

    pat = language_model_regex(["q_proj", "up_proj"], include_projector=False)
    assert re.fullmatch(pat, "model.language_model.layers.3.self_attn.q_proj")
    assert re.fullmatch(pat, "model.language_model.layers.3.mlp.up_proj")
    assert not re.fullmatch(pat, "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")
    assert not re.fullmatch(pat, "model.multi_modal_projector.linear_1")
    assert re.fullmatch(language_model_regex(["q_proj"], True), "model.multi_modal_projector.linear_2")


def test_projector_learning_rate_groups(tiny_llava_dir, tmp_path):
    recipe = recipe_for(tiny_llava_dir, tmp_path)
    model = apply_trainable(load_for_training(recipe.model, torch.float32).model, recipe)
    decay = {n for n, _ in model.named_parameters() if not n.endswith("bias")}
    groups = optimizer_groups(model, decay, lr=2e-4, projector_lr=2e-5, weight_decay=0.1)
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    for n, p in named.items():
        if not p.requires_grad:
            assert id(p) not in by_id
            continue
        g = by_id[id(p)]
        assert g["lr"] == (2e-5 if "multi_modal_projector" in n else 2e-4)
        assert g["weight_decay"] == (0.1 if n in decay else 0.0)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in named.values())
