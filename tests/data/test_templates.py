import pytest

from milora_vlm.data.templates import (
    IGNORE_INDEX,
    SkipSample,
    encode_conversation,
    get_template,
    template_names,
)

CONV = [
    {"from": "human", "value": "<image>\nWhat color is the shape?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "What shape is in the image?"},
    {"from": "gpt", "value": "circle"},
]
END = {"vicuna_v1": "</s>", "alpaca": "</s>", "llama3": "<|eot_id|>", "chatml": "<|im_end|>", "plain": "\n"}


@pytest.mark.parametrize("name", ["vicuna_v1", "llama3", "chatml", "plain", "alpaca"])
def test_exactly_assistant_tokens_are_labelled(tiny_tokenizer, name):
    enc = encode_conversation(tiny_tokenizer, name, CONV, image_token_id=4, num_image_tokens=5)
    assert len(enc.input_ids) == len(enc.labels)
    # Every labelled token is the input token at that position (no shifted or foreign labels).
    assert all(lab in (IGNORE_INDEX, tok) for lab, tok in zip(enc.labels, enc.input_ids))
    target = tiny_tokenizer.decode([lab for lab in enc.labels if lab != IGNORE_INDEX])
    lead = " " if name == "vicuna_v1" else ""
    assert target == f"{lead}red{END[name]}{lead}circle{END[name]}"
    assert enc.input_ids.count(4) == 5 and enc.num_images == 1
    # The labelled spans are exactly the answers: the text in front of each is a prompt.
    prompt_text = tiny_tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE_INDEX])
    assert "red" not in prompt_text and "circle" not in prompt_text


def test_generation_prompt_is_training_prefix(tiny_tokenizer):
    for name in template_names():
        full = encode_conversation(tiny_tokenizer, name, CONV[:2], image_token_id=4, num_image_tokens=3)
        prompt = encode_conversation(
            tiny_tokenizer, name, CONV[:1], image_token_id=4, num_image_tokens=3, add_generation_prompt=True
        )
        assert full.input_ids[: len(prompt.input_ids)] == prompt.input_ids, name
        first_label = next(i for i, lab in enumerate(full.labels) if lab != IGNORE_INDEX)
        assert first_label == len(prompt.input_ids), name


@pytest.mark.parametrize(
    "conv,reason",
    [
        ([], "empty_conversation"),
        ([{"from": "human", "value": "hi"}], "no_answer"),
        ([{"from": "gpt", "value": "hi"}], "roles_not_alternating"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "roles_not_alternating"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "  "}], "empty_answer"),
        ([{"from": "robot", "value": "a"}], "bad_role"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}], "bad_value"),
        ([{"from": "human", "value": "<image> a"}, {"from": "gpt", "value": "x"}], "image_token_without_image"),
    ],
)
def test_bad_conversations_raise_with_reason(tiny_tokenizer, conv, reason):
    with pytest.raises(SkipSample) as e:
        encode_conversation(tiny_tokenizer, "vicuna_v1", conv)
    assert e.value.reason == reason


def test_truncation_never_cuts_image_and_never_leaves_no_answer(tiny_tokenizer):
    conv = CONV[:2]
    full = encode_conversation(tiny_tokenizer, "vicuna_v1", conv, image_token_id=4, num_image_tokens=20)
    with pytest.raises(SkipSample) as e:
        encode_conversation(tiny_tokenizer, "vicuna_v1", conv, image_token_id=4, num_image_tokens=20, max_length=10)
    assert e.value.reason == "image_truncated"
    first_label = next(i for i, lab in enumerate(full.labels) if lab != IGNORE_INDEX)
    with pytest.raises(SkipSample) as e:
        encode_conversation(
            tiny_tokenizer, "vicuna_v1", conv, image_token_id=4, num_image_tokens=20, max_length=first_label
        )
    assert e.value.reason == "answer_truncated"
    cut = encode_conversation(
        tiny_tokenizer, "vicuna_v1", conv, image_token_id=4, num_image_tokens=20, max_length=first_label + 1
    )
    assert len(cut.input_ids) == first_label + 1 and cut.labels[-1] != IGNORE_INDEX


def test_system_turn_overrides_default(tiny_tokenizer):
    conv = [{"from": "system", "value": "Be brief."}] + CONV[:2]
    enc = encode_conversation(tiny_tokenizer, "chatml", conv, image_token_id=4, num_image_tokens=1)
    assert tiny_tokenizer.decode(enc.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_unknown_template_names_known_ones():
    with pytest.raises(ValueError, match="vicuna_v1"):
        get_template("vicuna")
