"""Conversation templates and the one label-masking routine.

A template renders a conversation as a list of text pieces, each marked as target (trained on) or not.
`encode_conversation` tokenizes the text between two `<image>`s in one call, as LLaVA's `tokenizer_image_token`
does, so the token stream is the reference's token for token, also for sentencepiece tokenizers that put a
prefix "▁" on every separately tokenised string. The label mask comes from the same call: a token is a target
when its characters (the tokenizer's offsets) overlap an assistant piece, so the mask follows the token stream
by construction, with no per-round length arithmetic (the source of LLaVA's "tokenization mismatch" warnings,
after which LLaVA trains nothing on the sample). Generation prompts are built by the same code, so training
and inference see identical token sequences. Training, evaluation and data validation all go through this file.

Which reference each template equals (pinned token for token by tests/data/test_template_fidelity.py):
vicuna_v1: LLaVA-1.5's conv_vicuna_v1 + preprocess_v1 (training) and model_vqa_loader (generation);
plain: LLaVA's conv_llava_plain + preprocess_plain; llama3 / chatml: the tokenizer's own chat template
(Meta-Llama-3-Instruct's, ChatML's); alpaca: LLM-Adapters' generate_and_tokenize_prompt with the
Alpaca / MetaMath prompt layout.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Sequence

from milora_vlm.registry import Registry

from .skips import SkipSample

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"

HUMAN_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant"}


@dataclass(frozen=True)
class Template:
    """How one conversation becomes text.

    system:       default system prompt ("" for none); a `system` turn in the data overrides it.
    system_format: how a non-empty system prompt is written, `{system}` substituted (e.g. "{system} " for
                  vicuna, ChatML's "<|im_start|>system\n{system}<|im_end|>\n"); no system prompt writes nothing.
    prefix:       text before everything, `{system}` substituted with the formatted system prompt.
    user:         a human turn, `{content}` substituted; includes the assistant header that follows it.
    assistant:    an assistant turn, `{content}` substituted; the loss is on this piece.
    after_assistant: text after an assistant turn that is *not* trained (e.g. chatml's newline); after the
                  last turn too when `after_last` (ChatML's template ends every message with it).
    add_bos:      start with the tokenizer's BOS token.
    keep_user_text: False for `plain` (LLaVA stage 1): the human turn becomes only its <image>.
    strip_content: strip the whitespace around each turn's text (Llama-3's chat template does).
    """

    name: str
    system: str = ""
    system_format: str = "{system}"
    prefix: str = ""
    user: str = "{content}"
    assistant: str = "{content}{eos}"
    after_assistant: str = ""
    after_last: bool = False
    add_bos: bool = True
    keep_user_text: bool = True
    strip_content: bool = False
    stop_strings: tuple[str, ...] = field(default_factory=tuple)


    def system_text(self, system: str) -> str:
        """The system prompt as this template writes it ("" when there is none)."""
        if not system:
            return ""
        return self.system_format.format(system=system.strip() if self.strip_content else system)


TEMPLATES: Registry[Template] = Registry("template")


def register_template(t: Template) -> Template:
    return TEMPLATES.register(t.name, t)


def get_template(name: str) -> Template:
    return TEMPLATES[name]


def template_names() -> list[str]:
    return sorted(TEMPLATES)


# LLaVA's conv_vicuna_v1, which LLaVA-1.5 trains (--version v1) and evaluates (--conv-mode vicuna_v1) with.
_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

# LLaVA-1.5 conv_vicuna_v1: "SYS USER: q ASSISTANT: a</s>USER: ..."
register_template(
    Template("vicuna_v1", system=_VICUNA_SYSTEM, system_format="{system} ", prefix="{system}",
             user="USER: {content} ASSISTANT:", assistant=" {content}{eos}")
)
# LLaMA-3 instruct format; <|begin_of_text|> is the BOS of real LLaMA-3 tokenizers.
register_template(
    Template(
        "llama3",
        system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        prefix="<|begin_of_text|>{system}",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant="{content}<|eot_id|>",
        add_bos=False,
        strip_content=True,
        stop_strings=("<|eot_id|>",),
    )
)
register_template(
    Template(
        "chatml",
        system_format="<|im_start|>system\n{system}<|im_end|>\n",
        prefix="{system}",
        user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        assistant="{content}<|im_end|>",
        after_assistant="\n",
        after_last=True,
        add_bos=False,
        stop_strings=("<|im_end|>",),
    )
)
# LLaVA stage-1 projector pretraining: "<s><image>caption\n", loss on the caption.
register_template(Template("plain", user="{content}", assistant="{content}\n", keep_user_text=False))
# LLM-Adapters / MetaMath prompt (the paper's commonsense and math settings).
register_template(
    Template("alpaca", system=_ALPACA_SYSTEM, system_format="{system}\n\n", prefix="{system}",
             user="### Instruction:\n{content}\n\n### Response:\n", assistant="{content}{eos}", after_assistant="\n\n")
)


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
    prefix = template.prefix.format(system=template.system_text(system))
    if prefix:
        pieces.append((prefix, False))
    expect = "human"
    for i, turn in enumerate(turns):
        role = _role(turn, i)
        value = turn.get("value", turn.get("content"))
        if not isinstance(value, str):
            raise SkipSample("bad_value", f"turn {i} has no string 'value'")
        if template.strip_content:
            value = value.strip()
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
            if template.after_assistant and (template.after_last or i < len(turns) - 1):
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


def image_to_front(conversations: Sequence[dict]) -> list[dict]:
    """LLaVA's preprocess_multimodal: a turn holding `<image>` becomes "<image>\\n" + its text without it, stripped.

    Unlike LLaVA, a turn with two `<image>`s is left as it is (LLaVA would silently make them one), so that
    the placeholder count check still sees it.
    """
    out = []
    for turn in conversations:
        value = turn.get("value") if isinstance(turn, dict) else None
        if isinstance(value, str) and value.count(IMAGE_PLACEHOLDER) == 1:
            turn = {**turn, "value": (IMAGE_PLACEHOLDER + "\n" + value.replace(IMAGE_PLACEHOLDER, "").strip()).strip()}
        out.append(turn)
    return out


def drop_leading_assistant(conversations: Sequence[dict]) -> list[dict]:
    """LLaVA's preprocess_v1: an assistant turn before any question is dropped (after a system turn, if any)."""
    def role(turn) -> str:
        r = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        return r.lower() if isinstance(r, str) else ""

    turns = list(conversations)
    start = 1 if turns and role(turns[0]) == "system" else 0
    if len(turns) > start + 1 and role(turns[start]) in ASSISTANT_ROLES:
        return turns[:start] + turns[start + 1 :]
    return turns


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_images: int
    target_tokens_cut: int = 0  # answer tokens (EOS included) that truncation to max_length removed (of the text
    # tokenised: a conversation cut before tokenising, _cut_to_budget, counts only those)


TOO_LONG_POLICIES = ("truncate", "drop")


def _target_flags(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of `text` (one tokenizer call) and, per token, whether it holds characters of a target span.

    A fast tokenizer's offsets say which characters each token covers. A tokenizer without offsets is
    tokenised again up to each span boundary: the tokens the two calls share lie before the boundary.
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        flags = [
            any((s < te and e > ts) if e > s else ts <= s < te for ts, te in spans) for s, e in enc["offset_mapping"]
        ]
        return list(enc["input_ids"]), flags
    ids = tokenizer(text, add_special_tokens=False).input_ids

    def tokens_before(b: int, straddle_counts: bool) -> int:
        head = tokenizer(text[:b], add_special_tokens=False).input_ids
        n = 0
        while n < min(len(head), len(ids)) and head[n] == ids[n]:
            n += 1
        # head not a prefix of ids: token n holds characters from both sides of b.
        return n + 1 if straddle_counts and n < len(head) else n

    flags = [False] * len(ids)
    for ts, te in spans:
        first = tokens_before(ts, False) if ts > 0 else 0
        last = tokens_before(te, True) if te < len(text) else len(ids)
        for k in range(first, last):
            flags[k] = True
    return ids, flags


_MAX_TOKEN_CHARS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# Normalisers can shorten text before it is tokenised (NFC composes up to three characters into one): margin.
NORMALISER_MARGIN = 4


def max_chars_per_token(tokenizer) -> int:
    """An upper bound on how many characters of text one token of `tokenizer` covers: its longest vocabulary
    entry (a byte-fallback entry like <0x0A> overstates, which is safe), times NORMALISER_MARGIN."""
    try:
        return _MAX_TOKEN_CHARS[tokenizer]
    except (KeyError, TypeError):
        pass
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1) * NORMALISER_MARGIN
    try:
        _MAX_TOKEN_CHARS[tokenizer] = longest
    except TypeError:  # not weak-referenceable: computed again next time
        pass
    return longest


def _cut_to_budget(chunks: list[tuple[str, list[tuple[int, int]]]], budget: int, too_long: str, max_length: int):
    """The chunks cut to `budget` characters: text beyond it lies beyond max_length tokens whatever it holds, so
    it is not tokenised (a multi-megabyte turn would otherwise take gigabytes in the tokenizer). Written by hand:
    tokenizers truncate by tokens only after encoding the whole text."""
    total = sum(len(text) for text, _ in chunks)
    if total <= budget:
        return chunks
    if too_long == "drop":
        raise SkipSample("too_long", f"{total} characters: more than max length {max_length} tokens with this "
                                     "tokenizer")
    kept, used = [], 0
    for k, (text, spans) in enumerate(chunks):
        if used + len(text) > budget:
            if k + 1 < len(chunks):  # an <image> after the cut: its tokens would end beyond max_length
                raise SkipSample("image_truncated", f"an image placeholder after character {budget} lies beyond "
                                                    f"model_max_length {max_length} tokens")
            keep = budget - used
            kept.append((text[:keep], [(a, min(b, keep)) for a, b in spans if a < keep]))
            return kept
        kept.append((text, spans))
        used += len(text)
    return kept


def encode_conversation(
    tokenizer,
    template: Template | str,
    conversations: Sequence[dict],
    image_token_id: int | None = None,
    num_image_tokens: int = 0,
    max_length: int | None = None,
    add_generation_prompt: bool = False,
    too_long: str = "truncate",
    answer_prefix: str = "",
) -> Encoded:
    """Token ids and labels (IGNORE_INDEX outside assistant pieces) for one conversation.

    The text between `<image>`s is tokenised in one call each (LLaVA's tokenizer_image_token), and each
    `<image>` becomes `num_image_tokens` copies of `image_token_id` (what HF LLaVA expects); the labels are
    the tokens that hold assistant text (`_target_flags`).
    A sample longer than `max_length` is cut there (too_long="truncate", LLaVA's behaviour) or skipped
    (too_long="drop", SkipSample "too_long"). Truncation never cuts through image tokens and never leaves a
    sample without a target: both raise SkipSample, which the caller counts.
    `answer_prefix` (generation prompts only) is text the answer starts with, tokenised with the prompt.
    """
    if isinstance(template, str):
        template = get_template(template)
    if too_long not in TOO_LONG_POLICIES:
        raise ValueError(f"too_long must be one of {TOO_LONG_POLICIES}, got {too_long!r}")
    pieces = render_pieces(template, conversations, tokenizer.eos_token or "", add_generation_prompt)
    if answer_prefix:
        if not add_generation_prompt:
            raise ValueError("answer_prefix is for generation prompts (add_generation_prompt=True)")
        pieces.append((answer_prefix, False))
    # Cut the pieces at each <image> into chunks of text, remembering the target spans within each chunk.
    chunks: list[tuple[str, list[tuple[int, int]]]] = [("", [])]
    for text, is_target in pieces:
        for j, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if j > 0:
                chunks.append(("", []))
            chunk_text, spans = chunks[-1]
            if is_target and part:
                spans.append((len(chunk_text), len(chunk_text) + len(part)))
            chunks[-1] = (chunk_text + part, spans)
    if max_length is not None:
        chunks = _cut_to_budget(chunks, (max_length + 1) * max_chars_per_token(tokenizer), too_long, max_length)
    ids: list[int] = []
    labels: list[int] = []
    if template.add_bos and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    image_ends: list[int] = []
    target_tokens_cut = 0
    for k, (text, spans) in enumerate(chunks):
        if k > 0:
            if image_token_id is None or num_image_tokens <= 0:
                raise SkipSample("image_token_without_image", "text has <image> but the sample has no image")
            ids.extend([image_token_id] * num_image_tokens)
            labels.extend([IGNORE_INDEX] * num_image_tokens)
            image_ends.append(len(ids))
        if text:
            chunk_ids, flags = _target_flags(tokenizer, text, spans)
            ids.extend(chunk_ids)
            labels.extend(t if f else IGNORE_INDEX for t, f in zip(chunk_ids, flags))
    if max_length is not None and len(ids) > max_length:
        if too_long == "drop":
            raise SkipSample("too_long", f"{len(ids)} tokens > max length {max_length}")
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
