"""Conversation templates and the one label-masking routine.

A template renders a conversation as a list of text pieces, each marked as target (trained on) or not.
`encode_conversation` tokenizes the pieces *separately* and concatenates the ids, so the label mask is
exact by construction (no re-tokenisation or offset arithmetic, the source of LLaVA's "tokenization
mismatch" warnings), and generation prompts are built by the same code, so training and inference see
identical token sequences. Training, evaluation and data validation all go through this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"

HUMAN_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant"}


class SkipSample(ValueError):
    """A sample that cannot be trained on; `reason` is a short stable key for counting, `detail` says why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Template:
    """How one conversation becomes text.

    system:       default system prompt ("" for none); a `system` turn in the data overrides it.
    prefix:       text before everything, `{system}` substituted (e.g. "{system} " for vicuna).
    user:         a human turn, `{content}` substituted; includes the assistant header that follows it.
    assistant:    an assistant turn, `{content}` substituted; the loss is on this piece.
    after_assistant: text after an assistant turn that is *not* trained (e.g. chatml's newline).
    add_bos:      start with the tokenizer's BOS token.
    keep_user_text: False for `plain` (LLaVA stage 1): the human turn becomes only its <image>.
    """

    name: str
    system: str = ""
    prefix: str = ""
    user: str = "{content}"
    assistant: str = "{content}{eos}"
    after_assistant: str = ""
    add_bos: bool = True
    keep_user_text: bool = True
    stop_strings: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: dict[str, Template] = {}


def register_template(t: Template) -> Template:
    if t.name in _REGISTRY:
        raise ValueError(f"template {t.name!r} is already registered")
    _REGISTRY[t.name] = t
    return t


def get_template(name: str) -> Template:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; known: {sorted(_REGISTRY)}") from None


def template_names() -> list[str]:
    return sorted(_REGISTRY)


_VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

# LLaVA-1.5 conv_vicuna_v1: "SYS USER: q ASSISTANT: a</s>USER: ..."
register_template(
    Template("vicuna_v1", system=_VICUNA_SYSTEM, prefix="{system} ", user="USER: {content} ASSISTANT:",
             assistant=" {content}{eos}")
)
# LLaMA-3 instruct format; <|begin_of_text|> is the BOS of real LLaMA-3 tokenizers.
register_template(
    Template(
        "llama3",
        prefix="<|begin_of_text|>{system_block}",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant="{content}<|eot_id|>",
        add_bos=False,
        stop_strings=("<|eot_id|>",),
    )
)
register_template(
    Template(
        "chatml",
        prefix="{system_block}",
        user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        assistant="{content}<|im_end|>",
        after_assistant="\n",
        add_bos=False,
        stop_strings=("<|im_end|>",),
    )
)
# LLaVA stage-1 projector pretraining: "<image>caption\n", loss on the caption.
register_template(Template("plain", user="{content}", assistant="{content}\n", add_bos=False, keep_user_text=False))
# LLM-Adapters / MetaMath prompt (the paper's commonsense and math settings).
register_template(
    Template("alpaca", system=_ALPACA_SYSTEM, prefix="{system}\n\n", user="### Instruction:\n{content}\n\n### Response:\n",
             assistant="{content}{eos}", after_assistant="\n\n")
)

_SYSTEM_BLOCKS: dict[str, Callable[[str], str]] = {
    "llama3": lambda s: f"<|start_header_id|>system<|end_header_id|>\n\n{s}<|eot_id|>" if s else "",
    "chatml": lambda s: f"<|im_start|>system\n{s}<|im_end|>\n" if s else "",
}


def _role(turn: dict, idx: int) -> str:
    role = turn.get("from", turn.get("role"))
    if not isinstance(role, str):
        raise SkipSample("bad_role", f"turn {idx} has no string 'from'")
    return role.lower()


def render_pieces(
    template: Template,
    conversations: Sequence[dict],
    eos_token: str,
    add_generation_prompt: bool = False,
) -> list[tuple[str, bool]]:
    """Render `conversations` ([{from, value}, ...]) as [(text, is_target), ...].

    With add_generation_prompt the conversation must end with a human turn, and the result is the prompt
    that the model continues (all pieces non-target).
    """
    turns = list(conversations)
    system = template.system
    if turns and _role(turns[0], 0) == "system":
        system = str(turns[0].get("value", ""))
        turns = turns[1:]
    if not turns:
        raise SkipSample("empty_conversation", "no turns")
    pieces: list[tuple[str, bool]] = []
    block = _SYSTEM_BLOCKS.get(template.name, lambda s: "")(system)
    prefix = template.prefix.format(system=system, system_block=block) if template.prefix else ""
    if template.prefix.startswith("{system}") and not system:
        prefix = ""
    if prefix:
        pieces.append((prefix, False))
    expect = "human"
    for i, turn in enumerate(turns):
        role = _role(turn, i)
        value = turn.get("value", turn.get("content"))
        if not isinstance(value, str):
            raise SkipSample("bad_value", f"turn {i} has no string 'value'")
        if role in HUMAN_ROLES:
            if expect != "human":
                raise SkipSample("roles_not_alternating", f"turn {i} is a second human turn in a row")
            if not template.keep_user_text:
                value = IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in value else ""
            pieces.append((template.user.format(content=value), False))
            expect = "gpt"
        elif role in ASSISTANT_ROLES:
            if expect != "gpt":
                raise SkipSample("roles_not_alternating", f"turn {i} is an assistant turn without a human turn before it")
            if not value.strip():
                raise SkipSample("empty_answer", f"turn {i} is an empty assistant turn")
            pieces.append((template.assistant.format(content=value, eos=eos_token), True))
            if template.after_assistant and i < len(turns) - 1:
                pieces.append((template.after_assistant, False))
            expect = "human"
        else:
            raise SkipSample("bad_role", f"turn {i} has unknown role {role!r}")
    if add_generation_prompt:
        if expect != "gpt":
            raise SkipSample("no_question", "a generation prompt must end with a human turn")
    elif expect != "human":
        raise SkipSample("no_answer", "the last turn is not the assistant's")
    return pieces


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_images: int
    target_tokens_cut: int = 0  # answer tokens (EOS included) that truncation to max_length removed


def encode_conversation(
    tokenizer,
    template: Template | str,
    conversations: Sequence[dict],
    image_token_id: int | None = None,
    num_image_tokens: int = 0,
    max_length: int | None = None,
    add_generation_prompt: bool = False,
) -> Encoded:
    """Token ids and labels (IGNORE_INDEX outside assistant pieces) for one conversation.

    Each `<image>` in the text becomes `num_image_tokens` copies of `image_token_id` (what HF LLaVA expects).
    Truncation to `max_length` never cuts through image tokens and never leaves a sample without a target:
    both raise SkipSample, which the caller counts.
    """
    if isinstance(template, str):
        template = get_template(template)
    pieces = render_pieces(template, conversations, tokenizer.eos_token or "", add_generation_prompt)
    ids: list[int] = []
    labels: list[int] = []
    if template.add_bos and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    image_ends: list[int] = []
    target_tokens_cut = 0
    for text, is_target in pieces:
        parts = text.split(IMAGE_PLACEHOLDER)
        for j, part in enumerate(parts):
            if j > 0:
                if image_token_id is None or num_image_tokens <= 0:
                    raise SkipSample("image_token_without_image", "text has <image> but the sample has no image")
                ids.extend([image_token_id] * num_image_tokens)
                labels.extend([IGNORE_INDEX] * num_image_tokens)
                image_ends.append(len(ids))
            if part:
                piece_ids = tokenizer(part, add_special_tokens=False).input_ids
                ids.extend(piece_ids)
                labels.extend(piece_ids if is_target else [IGNORE_INDEX] * len(piece_ids))
    if max_length is not None and len(ids) > max_length:
        if image_ends and image_ends[-1] > max_length:
            raise SkipSample(
                "image_truncated",
                f"image tokens end at position {image_ends[-1]} > model_max_length {max_length}",
            )
        target_tokens_cut = sum(lab != IGNORE_INDEX for lab in labels[max_length:])
        ids, labels = ids[:max_length], labels[:max_length]
    if not add_generation_prompt and all(lab == IGNORE_INDEX for lab in labels):
        raise SkipSample("answer_truncated", f"no answer token left within model_max_length {max_length}")
    return Encoded(ids, labels, len(image_ends), target_tokens_cut)
