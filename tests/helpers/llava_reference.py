"""A small re-implementation of the reference preprocessing the templates must equal, for the tests.

Written from what the reference code does, not copied:
- LLaVA-1.5 (haotian-liu/LLaVA): conversation.py (conv_vicuna_v1, SeparatorStyle.TWO; conv_llava_plain),
  train/train.py (preprocess_multimodal, preprocess_v1, preprocess_plain, LazySupervisedDataset),
  mm_utils.py (tokenizer_image_token), eval/model_vqa_loader.py (the generation prompt), and the model's
  prepare_inputs_labels_for_multimodal, which puts the image features (labels IGNORE) where the -200 id was.
- LLM-Adapters finetune.py (generate_and_tokenize_prompt with train_on_inputs=False, add_eos_token) with the
  Alpaca / MetaMath prompt layout.
Each function keeps the reference's algorithm, quirks included: whole-prompt tokenisation, the mask as
round lengths from separately tokenised strings ("- 2" for BOS and the trailing "▁"), the "- 1" for
non-legacy tokenizers after the first round, and "tokenization mismatch" = the whole sample masked.
"""

from __future__ import annotations

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id, replaced by the image features inside the model
IMAGE = "<image>"
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


class BosTokenizer:
    """The tokenizer as LLaVA calls it: `tokenizer(text).input_ids` starts with BOS (LLaMA's do; the project's
    byte-level toy tokenizer adds no special tokens itself, so BOS is put in front here)."""

    def __init__(self, tok):
        self.tok = tok
        self.bos_token_id = tok.bos_token_id
        self.eos_token_id = tok.eos_token_id
        self.legacy = getattr(tok, "legacy", True)

    def ids(self, text: str) -> list[int]:
        ids = list(self.tok(text).input_ids)
        if not ids or ids[0] != self.bos_token_id:
            ids = [self.bos_token_id] + list(self.tok(text, add_special_tokens=False).input_ids)
        return ids


# --- conversation.py
def vicuna_v1_prompt(messages: list[tuple[str, str | None]], system: str = VICUNA_V1_SYSTEM) -> str:
    """SeparatorStyle.TWO with sep " " and sep2 "</s>"; a None message is the open slot for generation."""
    seps = [" ", "</s>"]
    out = system + seps[0]
    for i, (role, msg) in enumerate(messages):
        out += f"{role}: {msg}{seps[i % 2]}" if msg else f"{role}:"
    return out


# --- mm_utils.py
def tokenizer_image_token(prompt: str, tok: BosTokenizer) -> list[int]:
    chunks = [tok.ids(c) for c in prompt.split(IMAGE)]
    out: list[int] = []
    skip = 0
    if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id:
        out.append(chunks[0][0])
        skip = 1  # every chunk's own BOS is dropped; the first chunk's was kept above
    for k, chunk in enumerate(chunks):
        if k:
            out.append(IMAGE_TOKEN_INDEX)
        out.extend(chunk[skip:])
    return out


# --- train.py
def preprocess_multimodal(conversations: list[dict]) -> list[dict]:
    out = []
    for turn in conversations:
        value = turn["value"]
        if IMAGE in value:
            value = (IMAGE + "\n" + value.replace(IMAGE, "").strip()).strip()
        out.append({**turn, "value": value})
    return out


def preprocess_v1(conversations: list[dict], tok: BosTokenizer, has_image: bool, measured: bool = False):
    """input_ids, labels and whether LLaVA reports a tokenization mismatch (it then masks everything).

    measured=True is the mask LLaVA means, for tokenizers where its "- 1" guess is wrong: each round's
    length is measured in the token stream (up to its "</s>"), and the instruction shrinks by the same number
    of tokens (the difference is at the round's start, where the stream has no prefix "▁" after "</s>").
    """
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    source = conversations[1:] if roles[conversations[0]["from"]] != "USER" else conversations
    messages = []
    for j, turn in enumerate(source):
        assert roles[turn["from"]] == ("USER", "ASSISTANT")[j % 2]
        messages.append((roles[turn["from"]], turn["value"]))
    prompt = vicuna_v1_prompt(messages)
    encode = (lambda s: tokenizer_image_token(s, tok)) if has_image else tok.ids
    input_ids = encode(prompt)
    labels = list(input_ids)
    sep = " ASSISTANT: "
    cur = 1
    labels[:cur] = [IGNORE_INDEX] * cur
    for i, rnd in enumerate(prompt.split("</s>")):
        if rnd == "":
            break
        parts = rnd.split(sep)
        if len(parts) != 2:
            break
        round_len = len(encode(rnd))
        instruction_len = len(encode(parts[0] + sep)) - 2
        if measured:
            delta = round_len - (input_ids.index(tok.eos_token_id, cur) - cur + 1)
            round_len -= delta
            instruction_len -= delta
        elif i != 0 and not tok.legacy:  # LLaVA: "not tokenizer.legacy and tokenizers >= 0.14"
            round_len -= 1
            instruction_len -= 1
        labels[cur : cur + instruction_len] = [IGNORE_INDEX] * len(labels[cur : cur + instruction_len])
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
    mismatch = cur != len(input_ids)
    if mismatch:
        labels = [IGNORE_INDEX] * len(labels)
    return input_ids, labels, mismatch


def preprocess_plain(conversations: list[dict], tok: BosTokenizer):
    assert len(conversations) == 2 and IMAGE in conversations[0]["value"]
    input_ids = tokenizer_image_token(IMAGE + conversations[1]["value"] + "\n", tok)
    n_prompt = len(tokenizer_image_token(IMAGE, tok))
    labels = [IGNORE_INDEX] * n_prompt + input_ids[n_prompt:]
    return input_ids, labels


def expand_image(input_ids: list[int], labels: list[int], image_token_id: int, n: int):
    """What the model does with the -200 placeholder: n image features, never trained on."""
    ids_out, labels_out = [], []
    for t, lab in zip(input_ids, labels):
        if t == IMAGE_TOKEN_INDEX:
            ids_out += [image_token_id] * n
            labels_out += [IGNORE_INDEX] * n
        else:
            ids_out.append(t)
            labels_out.append(lab)
    return ids_out, labels_out


# --- eval/model_vqa_loader.py
def vqa_prompt_ids(question: str, tok: BosTokenizer, with_image: bool) -> list[int]:
    qs = IMAGE + "\n" + question if with_image else question
    prompt = vicuna_v1_prompt([("USER", qs), ("ASSISTANT", None)])
    return tokenizer_image_token(prompt, tok)


# --- LLM-Adapters finetune.py, Alpaca / MetaMath prompt layout
def alpaca_prompt(instruction: str, output: str = "") -> str:
    return f"{ALPACA_SYSTEM}\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}"


def llm_adapters_sample(instruction: str, output: str, tok: BosTokenizer):
    full = tok.ids(alpaca_prompt(instruction, output))
    if full[-1] != tok.eos_token_id:
        full.append(tok.eos_token_id)
    n_user = len(tok.ids(alpaca_prompt(instruction)))
    return full, [IGNORE_INDEX] * n_user + full[n_user:]


# --- chat templates as the model repositories ship them
LLAMA3_CHAT_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's tokenizer_config.json
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chat_template_sample(tok, messages: list[dict], end_token: str):
    """input_ids from apply_chat_template, and the labels a chat template implies: each assistant message's
    tokens from where the generation prompt ends up to its end-of-turn token."""

    def ids(msgs, gen):
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        return list(tok(text, add_special_tokens=False).input_ids)

    input_ids = ids(messages, False)
    labels = [IGNORE_INDEX] * len(input_ids)
    end_id = tok.convert_tokens_to_ids(end_token)
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(ids(messages[:k], True))
            stop = input_ids.index(end_id, start) + 1
            labels[start:stop] = input_ids[start:stop]
    return input_ids, labels
