"""Tiny models and a tokenizer trained on the fly.

Nothing can be downloaded in tests or in the embedded demo, so these builders make real transformers
models (Llama-style LM, CLIP-style ViT, HF LLaVA) from small configs, a real byte-level BPE tokenizer trained on
the caller's text, and a Llama-type sentencepiece tokenizer (what LLaVA-1.5 / Vicuna ship) trained in well under a
second. Everything they return saves and loads with plain `from_pretrained`.
"""

from __future__ import annotations

import io
import os
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.tokenization_utils_base import AddedToken

from .projectors import PROJECTORS

IMAGE_TOKEN = "<image>"
# Chat markers of the templates in milora_vlm.data.templates; registered as special tokens so that each is
# one id, as in the real llama3 / chatml tokenizers.
CHAT_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
]
_BASE_CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "USER: ASSISTANT: ### Instruction: ### Response: Below is an instruction that describes a task.",
    "0 1 2 3 4 5 6 7 8 9 yes no true false the answer is",
]


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 512, add_prefix_space: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (any text encodes; nothing is ever <unk>) on `texts`."""
    tok = Tokenizer(models.BPE())
    # add_prefix_space=True encodes a word the same at the start of a text piece as inside a sentence (as
    # LLaMA's sentencepiece does with its leading "▁"): an answer "circle" is then the token a caption's "a red
    # circle" ends with, rather than a second token the model has never produced.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN, *CHAT_SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_BASE_CORPUS) + list(texts), trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=[IMAGE_TOKEN, *CHAT_SPECIAL_TOKENS],
    )
    fast.padding_side = "right"
    return fast


def train_llama_sp_model(texts: Iterable[str], path: str, vocab_size: int = 600, model_type: str = "bpe") -> str:
    """Train a sentencepiece model with LLaMA's settings and write it to `path` (a `tokenizer.model`).

    The settings that shape the token stream are LLaMA-1/2's (and so Vicuna's and llava-1.5's): BPE, byte
    fallback (256 <0x..> pieces, nothing is <unk>), a dummy prefix "▁" on each encoded text, whitespace kept as
    is, digits split, no normalisation, ids 0/1/2 = <unk>/<s>/</s>. Byte fallback takes 259 ids, so
    `vocab_size` must leave room for merges.
    """
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(_BASE_CORPUS) + list(texts)),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,  # a tiny corpus may not support vocab_size merges
        num_threads=1,
        minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def train_llama_sp_tokenizer(texts: Iterable[str], directory: str, legacy: bool = True, vocab_size: int = 600):
    """A Llama-type sentencepiece tokenizer as llava-hf ships it: transformers' LlamaTokenizer loaded from a
    `tokenizer.model`, with `<image>` added as a special token and `<pad>` as the pad token (llava-hf's order).

    `legacy` is the tokenizer flag that decides whether the text after a special token gets sentencepiece's
    dummy prefix "▁" again (True, as LLaMA-1/2's slow tokenizer did) or not (False). In transformers 5,
    LlamaTokenizer and LlamaTokenizerFast are the same tokenizers-backed class, converted from the
    sentencepiece model. The tokenizer is saved to and loaded from `directory`, so it is the from_pretrained one.
    """
    from transformers import LlamaTokenizer

    os.makedirs(directory, exist_ok=True)
    model_file = os.path.join(directory, "tokenizer.model")
    if not os.path.exists(model_file):
        train_llama_sp_model(texts, model_file, vocab_size=vocab_size)
    tok = LlamaTokenizer.from_pretrained(directory, legacy=legacy)
    tok.add_tokens(AddedToken(IMAGE_TOKEN, special=True, normalized=False), special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.padding_side = "right"
    return tok


def tiny_llama_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, **kw) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=kw.pop("intermediate_size", 2 * hidden),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kw.pop("num_key_value_heads", heads),
        max_position_embeddings=kw.pop("max_position_embeddings", 512),
        tie_word_embeddings=kw.pop("tie_word_embeddings", False),
        **kw,
    )


def build_tiny_causal_lm(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = tiny_llama_config(len(tokenizer), **kw)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


def tiny_vision_config(image_size: int = 32, patch_size: int = 8, hidden: int = 64, layers: int = 2) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden,
    )


def tiny_image_processor(image_size: int = 32) -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )


def build_tiny_llava(
    tokenizer: PreTrainedTokenizerFast,
    image_size: int = 32,
    patch_size: int = 8,
    text_hidden: int = 64,
    text_layers: int = 2,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    projector: str = "mlp2x_gelu",
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    seed: int = 0,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A tiny HF LLaVA and its processor (tokenizer + CLIP image processor), llava-hf format.

    `projector`: "mlp2x_gelu" (LLaVA-1.5) or "linear" (stored as HF's two-layer projector with an identity
    activation, i.e. a linear map; llava-hf has no single-layer projector class).
    """
    torch.manual_seed(seed)
    text_cfg = tiny_llama_config(len(tokenizer), hidden=text_hidden, layers=text_layers)
    vision_cfg = tiny_vision_config(image_size, patch_size, vision_hidden, vision_layers)
    num_patches = (image_size // patch_size) ** 2
    image_seq_length = num_patches if vision_feature_select_strategy == "default" else num_patches + 1
    cfg = LlavaConfig(
        vision_config=vision_cfg,
        text_config=text_cfg,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act=PROJECTORS[projector].hidden_act,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        image_seq_length=image_seq_length,
    )
    cfg.text_config.bos_token_id = tokenizer.bos_token_id
    cfg.text_config.eos_token_id = tokenizer.eos_token_id
    cfg.text_config.pad_token_id = tokenizer.pad_token_id
    model = LlavaForConditionalGeneration(cfg)
    processor = LlavaProcessor(
        image_processor=tiny_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS token
    )
    return model, processor
