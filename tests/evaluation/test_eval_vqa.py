"""VQAv2 / VizWiz / TextVQA scoring: every normalisation rule and the 10-annotator accuracy, worked by hand."""


import pytest

from milora_vlm.evaluation.answer_processing import (
    CONTRACTIONS,
    VIZWIZ_CONTRACTIONS,
    evalai_normalize,
    process_digit_article,
    process_punctuation,
)
from milora_vlm.evaluation.inputs import EvalInputError
from milora_vlm.evaluation.vqa import (
    llava_textvqa_question,
    score_textvqa,
    score_vizwiz,
    score_vqav2,
    textvqa_accuracy,
    vizwiz_accuracy,
    vqa_accuracy,
)
from tests.helpers.files import write_json as _write, write_jsonl as _jsonl


@pytest.mark.parametrize(
    "text,expected",
    [
        ("yes.", "yes"),  # a period not followed by a digit goes
        ("3.5", "3.5"),  # a decimal point stays
        ("t-shirt", "t shirt"),  # a mark touching no space becomes a space
        ("red - blue", "red  blue"),  # a mark touching a space is deleted
        ("a, b", "a b"),
        ("hello,world", "hello world"),
        ("1,000", "1000"),  # a digit,digit comma anywhere: every mark is deleted
        ("1,000 t-shirts", "1000 tshirts"),
        ("don't", "don't"),  # the apostrophe is not in the evaluator's list
        ("why?!", "why  "),
    ],
)
def test_process_punctuation(text, expected):
    assert process_punctuation(text) == expected


def test_period_strip_removes_at_most_32_periods():
    # The reference passes re.UNICODE (32) as re.sub's count.
    text = ".".join(["x"] * 40)  # 39 periods, none followed by a digit
    assert process_punctuation(text).count(".") == 39 - 32


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Two Dogs", "2 dogs"),
        ("the cat", "cat"),
        ("an apple a day", "apple day"),
        ("none", "0"),
        ("ten", "10"),
        ("dont know", "don't know"),
        ("isnt it", "isn't it"),
        ("Im", "im"),  # capitalised keys of the table can never match: words are lower-cased first
        ("  spaced   out ", "spaced out"),
    ],
)
def test_process_digit_article(text, expected):
    assert process_digit_article(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Coca-Cola", "coca cola"),
        ("What?", "what"),
        ("Stop's", "stop 's"),
        ("1,000", "1000"),
        ("Two.", "2"),
    ],
)
def test_evalai_normalize(text, expected):
    assert evalai_normalize(text) == expected


@pytest.mark.parametrize("matches,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_ten_annotator_accuracy(matches, expected):
    # Worked by hand for 2 of 10: leaving out one of the 2 leaves 1 match (1/3), one of the other 8 leaves 2
    # (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    answers = ["red"] * matches + ["blue"] * (10 - matches)
    if matches == 10:
        answers = ["red"] * 10
    assert vqa_accuracy("red", answers) == pytest.approx(expected)


def test_official_vqa_normalises_only_when_humans_disagree():
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0  # unanimous: no normalisation at all
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0  # but whitespace is always cleaned
    assert vqa_accuracy("t shirt", ["t-shirt"] * 10) == 0.0
    assert vqa_accuracy("T-Shirt.", ["t-shirt"] * 9 + ["shirt"]) == 1.0  # disagreement: both normalised
    assert vqa_accuracy("two", ["2"] * 5 + ["3"] * 5) == 1.0


def test_vizwiz_normalises_prediction_only():
    assert vizwiz_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert vizwiz_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0  # the human answers stay raw: a quirk kept


@pytest.mark.parametrize(
    "prediction,humans,expected",
    [
        # The VizWiz API's contraction table writes "isnt" -> "isn\u2019t" (typographic apostrophe): no human
        # "isn't" matches it there, while VQA's table would give 100.
        ("isnt", ["isn't"] * 10, 0.0),
        ("isnt", ["isn\u2019t"] * 10, 1.0),
        ("isn't", ["isn't"] * 10, 1.0),  # an apostrophe the model wrote itself is left alone
        # the entries it kept with an ASCII apostrophe
        ("cant", ["can't"] * 10, 1.0),
        ("weve", ["we've"] * 10, 1.0),
        ("dont", ["don't"] * 10, 0.0),
        ("dont", ["don\u2019t"] * 10, 1.0),
        ("twas", ["\u2019twas"] * 10, 1.0),
        ("Somebody\u2019d", ["somebodyd"] * 10, 1.0),  # the table's own typo, as in VQA's
    ],
)
def test_vizwiz_contraction_table_quirks(prediction, humans, expected):
    assert vizwiz_accuracy(prediction, humans) == expected


def test_vizwiz_table_differs_from_vqas_only_in_apostrophes():
    assert VIZWIZ_CONTRACTIONS["couldn'tve"] == "couldn\u2019t\u2019ve"  # ASCII key kept, value retyped
    assert "couldnt\u2019ve" in VIZWIZ_CONTRACTIONS and "couldnt've" not in VIZWIZ_CONTRACTIONS
    assert {k.replace("\u2019", "'"): v.replace("\u2019", "'") for k, v in VIZWIZ_CONTRACTIONS.items()} == CONTRACTIONS
    assert process_digit_article("isnt") == "isn't"  # VQA's table unchanged


def test_textvqa_normalises_both():
    assert textvqa_accuracy("Coca-Cola", ["coca cola"] * 10) == 1.0
    assert textvqa_accuracy("coca cola", ["Coca-Cola"] * 3 + ["pepsi"] * 7) == pytest.approx(0.9)


def _vqa_ann(qid, answers, answer_type, question_type="what color"):
    return {
        "question_id": qid, "image_id": 1, "answer_type": answer_type, "question_type": question_type,
        "multiple_choice_answer": max(set(answers), key=answers.count),
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
    }


@pytest.fixture
def vqav2_files(tmp_path):
    anns = [
        _vqa_ann(1, ["yes"] * 10, "yes/no", "is the"),
        _vqa_ann(2, ["2"] * 6 + ["two"] * 2 + ["3"] * 2, "number", "how many"),
        _vqa_ann(3, ["red"] * 2 + ["blue"] * 8, "other"),
    ]
    ann = _write(tmp_path / "ann.json", {"annotations": anns})
    ques = _write(tmp_path / "q.json", {"questions": [{"question_id": a["question_id"], "image_id": 1, "question": "?"}
                                                      for a in anns]})
    return ann, ques, anns


def test_vqav2_gold_answers_score_100(tmp_path, vqav2_files):
    ann, ques, anns = vqav2_files
    preds = _write(tmp_path / "p.json", [{"question_id": a["question_id"], "answer": a["multiple_choice_answer"]} for a in anns])
    r = score_vqav2(preds, ann, ques).to_dict()
    assert r["score"] == 100.0
    assert r["metrics"]["per_answer_type"] == {"number": 100.0, "other": 100.0, "yes/no": 100.0}
    assert r["counts"]["missing"] == 0


def test_vqav2_raw_generations_get_llavas_conversion(tmp_path, vqav2_files):
    ann, ques, _ = vqav2_files
    rows = [{"question_id": 1, "prompt": "q", "text": "Yes", "model_id": "m"},
            {"question_id": 2, "prompt": "q", "text": "Two.", "model_id": "m"},
            {"question_id": 3, "prompt": "q", "text": "Red", "model_id": "m"}]
    raw = _jsonl(tmp_path / "answers.jsonl", rows)
    r = score_vqav2(raw, ann, ques).to_dict()
    # yes -> 1.0; "two" normalised to "2": 8 of 10 -> 1.0; "red": 2 of 10 -> 0.6
    assert r["score"] == pytest.approx(100 * (1 + 1 + 0.6) / 3)
    assert r["metrics"]["answer_processing"] == "evalai"
    # The official result format is scored as the server would: "Yes" against ten "yes" is wrong.
    official = _write(tmp_path / "p.json", [{"question_id": 1, "answer": "Yes"}])
    r = score_vqav2(official, ann).to_dict()
    assert r["score"] == 0.0 and r["counts"]["missing"] == 2 and r["metrics"]["answer_processing"] == "none"


def test_vqav2_mismatched_question_file_is_an_error(tmp_path, vqav2_files):
    ann, _, _ = vqav2_files
    ques = _write(tmp_path / "q2.json", {"questions": [{"question_id": 1}]})
    preds = _write(tmp_path / "p.json", [{"question_id": 1, "answer": "yes"}])
    with pytest.raises(EvalInputError, match="do not describe the same questions"):
        score_vqav2(preds, ann, ques)


def test_vizwiz_by_image_and_by_question_file(tmp_path):
    anns = [
        {"image": "VizWiz_val_0.jpg", "question": "?", "answer_type": "other", "answerable": 1,
         "answers": [{"answer": "dog", "answer_confidence": "yes"}] * 10},
        {"image": "VizWiz_val_1.jpg", "question": "?", "answer_type": "unanswerable", "answerable": 0,
         "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 7
         + [{"answer": "cat", "answer_confidence": "maybe"}] * 3},
    ]
    ann = _write(tmp_path / "val.json", anns)
    official = _write(tmp_path / "p.json", [{"image": "VizWiz_val_0.jpg", "answer": "dog"},
                                           {"image": "VizWiz_val_1.jpg", "answer": "unanswerable"}])
    assert score_vizwiz(official, ann).score == 100.0
    questions = _jsonl(tmp_path / "q.jsonl", [{"question_id": 0, "image": "VizWiz_val_0.jpg", "text": "?"},
                                              {"question_id": 1, "image": "VizWiz_val_1.jpg", "text": "?"}])
    raw = _jsonl(tmp_path / "a.jsonl", [{"question_id": 0, "prompt": "?", "text": "A dog.", "model_id": "m"},
                                        {"question_id": 1, "prompt": "?", "text": "Cat", "model_id": "m"}])
    r = score_vizwiz(raw, ann, questions).to_dict()
    assert r["metrics"]["per_answer_type"] == {"other": 100.0, "unanswerable": pytest.approx(90.0)}


def test_textvqa_official_ids_and_llava_image_keyed_answers(tmp_path):
    data = [
        {"question_id": 10, "image_id": "img1", "question": "What brand?", "answers": ["Nikon"] * 10},
        {"question_id": 11, "image_id": "img1", "question": "What year?", "answers": ["1999"] * 4 + ["1998"] * 6},
    ]
    ann = _write(tmp_path / "TextVQA_val.json", {"data": data})
    by_id = _write(tmp_path / "p.json", [{"question_id": 10, "answer": "nikon"}, {"question_id": 11, "answer": "1999"}])
    r = score_textvqa(by_id, ann).to_dict()
    assert r["score"] == 100.0 and r["metrics"]["matched_by"] == "question_id"
    # LLaVA's TextVQA question file uses the image id as question_id; the question comes from the prompt.
    suffix = "\nAnswer the question using a single word or phrase."
    rows = [{"question_id": "img1", "prompt": "What brand?\nReference OCR token: NIKON" + suffix, "text": "Nikon"},
            {"question_id": "img1", "prompt": "What year?" + suffix, "text": "1998"}]
    r = score_textvqa(_jsonl(tmp_path / "a.jsonl", rows), ann).to_dict()
    assert r["metrics"]["matched_by"] == "image_id+question"
    assert r["score"] == pytest.approx(100 * (1.0 + 1.0) / 2)


def test_textvqa_image_asking_the_same_question_twice_is_scored_as_llava(tmp_path):
    # eval_textvqa.py keys annotations by (image_id, question.lower()): the later of the two wins, and every
    # answer to that question is scored against its human answers; both answers count.
    data = [
        {"question_id": 20, "image_id": "img2", "question": "What brand?", "answers": ["nikon"] * 10},
        {"question_id": 21, "image_id": "img2", "question": "what brand?", "answers": ["canon"] * 10},
        {"question_id": 22, "image_id": "img2", "question": "What year?", "answers": ["1999"] * 10},
    ]
    ann = _write(tmp_path / "TextVQA_val.json", {"data": data})
    suffix = "\nAnswer the question using a single word or phrase."
    rows = [{"question_id": "img2", "prompt": "What brand?" + suffix, "text": "Canon"},
            {"question_id": "img2", "prompt": "what brand?" + suffix, "text": "Nikon"},
            {"question_id": "img2", "prompt": "What year?" + suffix, "text": "1999"}]
    r = score_textvqa(_jsonl(tmp_path / "a.jsonl", rows), ann).to_dict()
    assert r["counts"]["gold"] == 3 and r["counts"]["predicted"] == 3
    assert r["score"] == pytest.approx(100 * (1.0 + 0.0 + 1.0) / 3)  # "Nikon" scored against the later "canon"s
    assert any("ask the same question twice" in w for w in r["warnings"])
    # answers without 'prompt' read the question from LLaVA's question file, where it appears twice
    qfile = _jsonl(tmp_path / "q.jsonl", [{"question_id": "img2", "text": "What brand?" + suffix}] * 2
                   + [{"question_id": "img3", "text": "What year?" + suffix}])
    no_prompt = [{"question_id": "img2", "text": "canon"}, {"question_id": "img2", "text": "canon"}]
    r = score_textvqa(_jsonl(tmp_path / "np.jsonl", no_prompt), ann, qfile).to_dict()
    assert r["counts"]["predicted"] == 2 and r["score"] == pytest.approx(100 * 2 / 3)
    # asked twice in the same words: eval/generate.py answers once, and that answer stands for both, as LLaVA's
    # two identical greedy answers would
    same = [dict(data[0]), dict(data[1], question="What brand?"), data[2]]
    ann_same = _write(tmp_path / "TextVQA_same.json", {"data": same})
    once = [{"question_id": "img2", "prompt": "What brand?" + suffix, "text": "canon"}]
    r = score_textvqa(_jsonl(tmp_path / "once.jsonl", once), ann_same).to_dict()
    assert r["counts"]["predicted"] == 2 and r["score"] == pytest.approx(100 * 2 / 3)
    assert any("used for both" in w for w in r["warnings"])
    rows.append(rows[0])  # a third answer to a question asked twice is a real duplicate
    with pytest.raises(EvalInputError, match=r"a3.jsonl:4: more answers for image 'img2'"):
        score_textvqa(_jsonl(tmp_path / "a3.jsonl", rows), ann)


def test_llava_textvqa_prompt_forms():
    assert llava_textvqa_question("What?\nAnswer briefly.") == "what?"
    assert llava_textvqa_question("Reference OCR token: A, B\nWhat?\nAnswer.") == "what?"
    assert llava_textvqa_question("OCR tokens: a b. Question: Who is it? Short answer: ") == "who is it?"
    with pytest.raises(ValueError):
        llava_textvqa_question("one line only")
