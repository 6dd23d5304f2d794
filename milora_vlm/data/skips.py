"""What a skipped sample is, and the one table of reasons for skipping it.

Data preparation (data_prep/*, milora_vlm.data.validation: records dropped from OUT.jsonl, counted in its report),
training (milora_vlm.data.dataset: records passed over, counted by milora_vlm.train.skips as `skipped/<reason>`)
and evaluation (questions skipped by eval/generate.py) all raise `SkipSample(reason, detail)` with a reason from
`REASONS`, so the data_prep report and the training counters name a bad record the same way. An unregistered
reason is a programming error and fails at once (and tests/data/test_skips.py checks every reason raised in the code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# reason -> one-line meaning. Order: data_prep judges a record by the first drop reason it meets, in this order
# (cheap checks first, image decoding last); the training-only and converter-only reasons follow.
REASONS: dict[str, str] = {
    # reading the file
    "malformed_json": "the line (JSONL) or element (JSON array) cannot be read as JSON, or holds what milora_vlm.jsontext "
                      "refuses (nesting too deep, a duplicate key, a lone surrogate, a line over 64 MiB)",
    "not_an_object": "the record (or a converter's input entry) is not a JSON object",
    "not_utf8": "the record's text holds a byte that is not UTF-8",
    "malformed_record": "training: the record cannot be read (malformed JSON, not UTF-8 or not an object)",
    # the conversation's structure
    "bad_conversations": "`conversations` missing, not a list, or empty",
    "bad_turn": "a turn that is not an object",
    "bad_role": "a turn's `from` missing, not a string or unknown (a system turn only first)",
    "bad_value": "a turn's `value` missing or not a string",
    "empty_conversation": "no turns, or only a system turn",
    "roles_not_alternating": "the turns after an optional leading system turn are not human, gpt, human, ...",
    "no_question": "a generation prompt that does not end with a human turn",
    "no_answer": "no answer to train on (a single human turn; a converter's question without a non-empty answer)",
    "empty_question": "a human turn that is empty or whitespace",
    "empty_answer": "an assistant turn that is empty or whitespace",
    # the image field and its placeholders
    "bad_image_field": "`image` is not one non-empty path string (multi-image lists are not supported; no NUL character)",
    "image_without_vision_model": "training: a record with an image, for a model without a vision tower",
    "image_token_in_answer": "`<image>` inside an assistant turn",
    "image_placeholder_count": "an image and more than one `<image>` (which one is it?)",
    "image_token_without_image": "`<image>` in a record without an image",
    # length
    "too_long": "more tokens than the maximum length (data.too_long: drop, or data_prep's --max-length)",
    "image_truncated": "the maximum length cuts through the image tokens",
    "answer_truncated": "no answer token left within the maximum length",
    # the image file
    "image_outside_folder": "the image path resolves outside the image folder (../, absolute, symlink out)",
    "missing_image": "the image file does not exist",
    "corrupt_image": "the image file does not decode fully",
    "image_too_large": "the image declares more pixels than the limit (max_image_pixels; not decoded)",
    # data_prep only
    "duplicate_record": "same id and same content as an earlier record",
    # the format converters (data_prep/vqa_to_conversations.py, the text converters): a field missing or invalid
    "no_annotation": "a VQAv2 question without an entry in the annotations file",
    "bad_choices": "ScienceQA: `choices` is not a list of 2 to 26 strings",
    "bad_answer": "field `answer` missing, empty or not a valid answer (ScienceQA: not one of the choices' indices)",
    "bad_image": "field `image` missing or not a string",
    "bad_image_id": "field `image_id` missing or of the wrong type",
    "bad_imageId": "GQA: field `imageId` missing or not a string",
    "bad_question": "field `question` missing, empty or not a string",
    "bad_question_id": "field `question_id` missing or not an integer",
    "bad_hint": "ScienceQA: field `hint` not a string",
    "bad_instruction": "field `instruction` missing, empty or not a string",
    "bad_input": "field `input` not a string",
    "bad_output": "field `output` missing, empty or not a string",
    "bad_query": "MetaMathQA: field `query` missing, empty or not a string",
    "bad_response": "MetaMathQA: field `response` missing, empty or not a string",
}

# Records kept but changed. data_prep's repairs (written to OUT.jsonl as repaired):
REPAIRS: dict[str, str] = {
    "missing_id": 'no id, null or "": id becomes "auto-<line or index>"',
    "id_not_string": 'an integer id becomes its decimal string; any other type becomes "auto-<position>"',
    "leading_assistant_turn": "an assistant turn before the first question is removed (as LLaVA's preprocessing), "
                              "when turns remain",
    "trailing_human_turn": "a last human turn without an answer is removed, when an exchange remains",
    "null_image": '"image": null is removed (a text-only record)',
    "missing_image_token": 'an image but no `<image>`: "<image>\\n" is prepended to the first human turn (as LLaVA)',
    "image_token_misplaced": "the one `<image>` is not in the first human turn: moved to the front of it",
    "duplicate_id": 'same id as an earlier record, different content: renamed "<id>_dup<k>" (smallest free k)',
}
# ... and training's notes (trained on, counted as `changed/<reason>`, not skips):
NOTES: dict[str, str] = {
    "answer_truncated": "the maximum length cut the answer (its end and EOS lost); the rest is trained on",
}


def check_reason(reason: str, table: dict[str, str] = REASONS) -> str:
    """`reason` itself when `table` has it; ValueError otherwise (a new reason belongs in the table first)."""
    if reason not in table:
        raise ValueError(f"unregistered skip reason {reason!r}: add it with its meaning to milora_vlm.data.skips")
    return reason


class SkipSample(ValueError):
    """A sample that cannot be used; `reason` is a key of REASONS (stable, for counting), `detail` says why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = check_reason(reason)
        self.detail = detail


@dataclass(frozen=True)
class SkipRecord:
    """One record that was not trained on (or, as a note, was trained on changed), located in its file."""

    reason: str  # a key of REASONS (a skip) or NOTES (a note)
    detail: str
    where: str  # "file:line 12" / "file:index 3"
    record_id: Optional[str] = None

    def __post_init__(self):
        check_reason(self.reason, REASONS if self.reason in REASONS else NOTES)

    def describe(self) -> str:
        rid = f" (id {self.record_id})" if self.record_id is not None else ""
        return f"{self.where}{rid}: {self.reason}: {self.detail}"
