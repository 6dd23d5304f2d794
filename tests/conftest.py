"""Shared fixtures: a tiny tokenizer and tiny saved models, built once per test session (no network)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "What color is the shape? What shape is in the image? Is there a red circle? Does the image contain a blue square?",
    "red green blue yellow teal brown gray black white circle square triangle rectangle yes no",
    "Answer the question using a single word or phrase. The answer is 42. Let's think step by step.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from milora_vlm.model.tiny import train_tiny_tokenizer

    return train_tiny_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny llava-hf checkpoint (model + processor) saved to disk."""
    from milora_vlm.model.tiny import build_tiny_llava

    path = tmp_path_factory.mktemp("tiny_llava")
    model, processor = build_tiny_llava(tiny_tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_causal_lm_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama causal LM + tokenizer saved to disk."""
    from milora_vlm.model.tiny import build_tiny_causal_lm

    path = tmp_path_factory.mktemp("tiny_lm")
    build_tiny_causal_lm(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_sp_model_dir(tmp_path_factory):
    """A Llama-type sentencepiece `tokenizer.model` (BPE, byte fallback, dummy prefix), trained once."""
    from milora_vlm.model.tiny import train_llama_sp_model

    path = tmp_path_factory.mktemp("llama_sp")
    train_llama_sp_model(CORPUS, str(path / "tokenizer.model"))
    return path


@pytest.fixture(scope="session", params=[True, False], ids=["legacy", "nonlegacy"])
def llama_sp_tokenizer(request, llama_sp_model_dir, tmp_path_factory):
    """transformers' LlamaTokenizer on that model with `<image>` and `<pad>` added as llava-hf does, for
    legacy=True and legacy=False (whether text after a special token gets the prefix "▁" again)."""
    import shutil

    from milora_vlm.model.tiny import train_llama_sp_tokenizer

    path = tmp_path_factory.mktemp(f"llama_sp_{request.param}")
    shutil.copy(llama_sp_model_dir / "tokenizer.model", path / "tokenizer.model")
    return train_llama_sp_tokenizer(CORPUS, str(path), legacy=request.param)
