"""GQA, POPE, ScienceQA, MME, commonsense and exact-match scoring: parsing rules and metrics, worked by hand."""


import pytest

from milora_vlm.evaluation.commonsense import extract_answer, family_of_label, score_commonsense
from milora_vlm.evaluation.exact import normalize_exact, score_exact
from milora_vlm.evaluation.gqa import score_gqa
from milora_vlm.evaluation.inputs import EvalInputError
from milora_vlm.evaluation.mme import mme_answer, score_mme
from milora_vlm.evaluation.pope import binary_metrics, pope_answer, score_pope
from milora_vlm.evaluation.scienceqa import score_scienceqa, scienceqa_letter
from tests.helpers.files import write_json as _write, write_jsonl as _jsonl


def _answers(path, pairs):
    return _jsonl(path, [{"question_id": q, "prompt": "p", "text": t, "model_id": "m"} for q, t in pairs])


# --- GQA -----------------------------------------------------------------------------------------------------

@pytest.fixture
def gqa_questions(tmp_path):
    q = {
        "201": {"question": "Is it red?", "answer": "yes", "isBalanced": True, "types": {"structural": "verify", "semantic": "attr"}},
        "202": {"question": "What is it?", "answer": "dog", "isBalanced": True, "types": {"structural": "query", "semantic": "obj"}},
        "203": {"question": "Which?", "answer": "left", "isBalanced": True, "types": {"structural": "choose", "semantic": "rel"}},
        "204": {"question": "Unbalanced?", "answer": "no", "isBalanced": False, "types": {"structural": "verify", "semantic": "attr"}},
    }
    return _write(tmp_path / "testdev_balanced_questions.json", q)


def test_gqa_gold_scores_100_and_unbalanced_questions_are_not_scored(tmp_path, gqa_questions):
    preds = _write(tmp_path / "p.json", [{"questionId": "201", "prediction": "yes"}, {"questionId": "202", "prediction": "dog"},
                                         {"questionId": "203", "prediction": "left"}, {"questionId": "204", "prediction": "yes"}])
    r = score_gqa(preds, gqa_questions).to_dict()
    assert r["score"] == 100.0 and r["counts"]["gold"] == 3


def test_gqa_llava_conversion_and_binary_open(tmp_path, gqa_questions):
    preds = _answers(tmp_path / "a.jsonl", [("201", "Yes."), ("202", "Dog"), ("203", "right")])
    r = score_gqa(preds, gqa_questions).to_dict()
    assert r["score"] == pytest.approx(200 / 3)
    assert r["metrics"]["open"] == 100.0 and r["metrics"]["binary"] == 50.0  # verify right, choose wrong
    assert r["metrics"]["per_structural_type"] == {"choose": 0.0, "query": 100.0, "verify": 100.0}
    # Official prediction files are compared as they are: "Yes." is not "yes".
    official = _write(tmp_path / "p.json", [{"questionId": "201", "prediction": "Yes."}])
    r = score_gqa(official, gqa_questions).to_dict()
    assert r["score"] == 0.0 and r["counts"]["missing"] == 2


# --- POPE ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text,expected",
    [
        ("Yes, there is a dog.", "yes"),
        ("No, there is no dog.", "no"),
        ("There is not a dog", "no"),
        ("Yes. No dogs were harmed.", "yes"),  # only the first sentence counts
        ("No,", "no"),  # commas are removed before splitting
        ("NO", "yes"),  # upper-case NO is not in the word list: a kept quirk
        ("Nope", "yes"),
    ],
)
def test_pope_answer(text, expected):
    assert pope_answer(text) == expected


def test_binary_metrics_by_hand():
    # tp=2, fp=1, tn=1, fn=0: acc 3/4, precision 2/3, recall 1, F1 0.8, yes-ratio 3/4
    m, _ = binary_metrics([("yes", "yes"), ("yes", "yes"), ("yes", "no"), ("no", "no")])
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == pytest.approx((75, 200 / 3, 100, 80, 75))


def test_pope_from_label_files_matched_by_image_and_question(tmp_path):
    ann = tmp_path / "pope"
    ann.mkdir()
    for split, labels in (("random", ["yes", "no"]), ("adversarial", ["yes", "no"])):
        _jsonl(ann / f"coco_pope_{split}.json", [
            {"question_id": i + 1, "image": f"img{i}.jpg", "text": f"Is there a thing {i} in the image?", "label": lab}
            for i, lab in enumerate(labels)
        ])
    suffix = "\nAnswer the question using a single word or phrase."
    qs = [{"question_id": 100 + k, "image": f"img{i}.jpg", "text": f"Is there a thing {i} in the image?" + suffix, "category": split}
          for k, (split, i) in enumerate([("random", 0), ("random", 1), ("adversarial", 0), ("adversarial", 1)])]
    questions = _jsonl(tmp_path / "llava_pope_test.jsonl", qs)
    # Answers in a shuffled order: pairing is by key, not by position.
    preds = _answers(tmp_path / "a.jsonl", [(103, "No"), (100, "Yes"), (101, "No"), (102, "No")])
    r = score_pope(preds, questions, str(ann)).to_dict()
    assert r["metrics"]["per_split"]["random"]["f1"] == 100.0
    assert r["metrics"]["per_split"]["adversarial"]["accuracy"] == 50.0
    assert r["metrics"]["per_split"]["adversarial"]["f1"] == 0.0
    assert r["score"] == pytest.approx(50.0)
    assert any("precision" in w for w in r["warnings"])


def test_pope_labels_in_question_file_and_missing_answer_is_wrong(tmp_path):
    questions = _jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "text": "?", "category": "random", "label": "yes"},
                                              {"question_id": 2, "text": "?", "category": "random", "label": "no"}])
    r = score_pope(_answers(tmp_path / "a.jsonl", [(1, "yes")]), questions).to_dict()
    assert r["metrics"]["per_split"]["random"]["accuracy"] == 50.0 and r["counts"]["missing"] == 1


def test_pope_empty_answers_read_yes_and_are_counted(tmp_path):
    # eval_pope.py: "" has no "no"/"not"/"No" word, so it is "yes"; the output says how many there were.
    questions = _jsonl(tmp_path / "q.jsonl", [{"question_id": i, "text": "?", "category": "random", "label": lab}
                                              for i, lab in enumerate(["yes", "no", "no"])])
    r = score_pope(_answers(tmp_path / "a.jsonl", [(0, ""), (1, " "), (2, "No")]), questions).to_dict()
    split = r["metrics"]["per_split"]["random"]
    assert (split["tp"], split["fp"], split["tn"]) == (1, 1, 1)
    assert split["empty_answers"] == 2 and r["metrics"]["empty_answers"] == 2
    assert any("2 answers are empty" in w for w in r["warnings"])


# --- ScienceQA -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text,expected",
    [("A", "A"), ("B. mammal", "B"), ("The answer is C.", "C"), ("Because ... The answer is D.", "D"),
     ("The answer is A. The answer is B.", None), ("b", None), ("A.mammal", None), ("", None)],
)
def test_scienceqa_letter(text, expected):
    assert scienceqa_letter(text) == expected


def test_scienceqa_overall_and_img(tmp_path):
    problems = {
        "1": {"question": "?", "choices": ["x", "y"], "answer": 1, "image": "image.png", "split": "test"},
        "2": {"question": "?", "choices": ["x", "y", "z"], "answer": 0, "image": None, "split": "test"},
        "3": {"question": "?", "choices": ["x", "y"], "answer": 0, "image": "image.png", "split": "test"},
        "4": {"question": "?", "choices": ["x", "y"], "answer": 0, "image": None, "split": "train"},
    }
    p = _write(tmp_path / "problems.json", problems)
    gold = _answers(tmp_path / "gold.jsonl", [("1", "B"), ("2", "A"), ("3", "A")])
    assert score_scienceqa(gold, p).to_dict()["metrics"]["accuracy"] == 100.0
    preds = _answers(tmp_path / "a.jsonl", [("1", "The answer is B."), ("2", "A. x"), ("3", "E")])  # E: beyond choices
    r = score_scienceqa(preds, p).to_dict()
    assert r["metrics"]["accuracy"] == pytest.approx(200 / 3)
    assert r["score"] == r["metrics"]["img_accuracy"] == 50.0 and r["metrics"]["num_img"] == 2
    split_file = _write(tmp_path / "pid_splits.json", {"test": ["1"]})
    assert score_scienceqa(preds, p, split_file=split_file, allow_unknown=True).score == 100.0


# --- MME -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"), ("Not really", "no"),
                                           ("I think yes", "other"), ("nope", "no"), ("", "other")])
def test_mme_answer(text, expected):
    assert mme_answer(text) == expected


def test_mme_scores_from_release_folder(tmp_path):
    root = tmp_path / "MME"
    (root / "existence" / "images").mkdir(parents=True)
    (root / "existence" / "questions_answers_YN").mkdir()
    (root / "existence" / "questions_answers_YN" / "1.txt").write_text(
        "Is there a dog? Please answer yes or no.\tYes\nIs there a cat? Please answer yes or no.\tNo\n")
    (root / "existence" / "questions_answers_YN" / "2.txt").write_text(
        "Is there a car? Please answer yes or no.\tYes\nIs there a bus? Please answer yes or no.\tNo\n")
    (root / "code_reasoning").mkdir()  # the flat layout: images and answers in one folder
    (root / "code_reasoning" / "5.txt").write_text("Is the output 3? Please answer yes or no.\tNo\nIs the output 4?  Please answer yes or no.\tYes\n")
    suffix = "\nAnswer the question using a single word or phrase."
    qs = []
    for cat, img, q in [("existence", "1.png", "Is there a dog?"), ("existence", "1.png", "Is there a cat?"),
                        ("existence", "2.png", "Is there a car?"), ("existence", "2.png", "Is there a bus?"),
                        ("code_reasoning", "5.png", "Is the output 3? Please answer yes or no."),
                        ("code_reasoning", "5.png", "Is the output 4?")]:
        # As in LLaVA's llava_mme.jsonl, both questions of an image share one question_id.
        qs.append({"question_id": f"{cat}/{img}", "image": f"{cat}/{img}", "text": q + suffix, "category": cat})
    questions = _jsonl(tmp_path / "llava_mme.jsonl", qs)
    # image 1 both right, image 2 one wrong; code_reasoning both right (the double-space gold line is found)
    texts = ["Yes", "No", "Yes", "Yes", "No", "Yes"]
    answers = _jsonl(tmp_path / "a.jsonl", [{"question_id": q["question_id"], "prompt": q["text"], "text": t, "model_id": "m"}
                                            for q, t in zip(qs, texts)])
    r = score_mme(answers, questions, str(root)).to_dict()
    ex = r["metrics"]["subtasks"]["existence"]
    assert (ex["acc"], ex["acc_plus"], ex["score"]) == (75.0, 50.0, 125.0)
    assert r["metrics"]["cognition"] == 200.0 and r["score"] == r["metrics"]["perception"] == 125.0
    assert any("perception total is over 1 of its 10" in w for w in r["warnings"])


# --- commonsense ---------------------------------------------------------------------------------------------

def test_commonsense_extraction_rules():
    assert extract_answer("true/false", "the correct answer is false, not true") == "false"  # first match
    assert extract_answer("answer", "answer3 (answer1 was wrong)") == "answer3"
    assert extract_answer("ending", "Ending2") == ""  # case-sensitive, as the reference
    assert extract_answer("option", "option12") == "option1"  # regex, not word match
    assert family_of_label("solution2") == "solution" and family_of_label("maybe") is None


def test_commonsense_per_dataset_and_average(tmp_path):
    rows = [{"instruction": "...", "input": "", "output": "the correct answer is true", "answer": "true"},
            {"instruction": "...", "input": "", "output": "", "answer": "false"}]
    boolq = _write(tmp_path / "boolq_test.json", rows)  # LLM-Adapters' format: ids are positions
    preds = _answers(tmp_path / "a.jsonl", [(0, "the correct answer is true"), (1, "I cannot tell")])
    r = score_commonsense(preds, boolq, dataset="boolq").to_dict()
    assert r["metrics"]["per_dataset"] == {"boolq": 50.0} and r["counts"]["unparsable"] == 1
    mixed = _jsonl(tmp_path / "mixed.jsonl", [
        {"question_id": "b0", "answer": "true", "dataset": "boolq"},
        {"question_id": "w0", "answer": "option2", "dataset": "winogrande"},
        {"question_id": "w1", "answer": "option1", "dataset": "winogrande"},
    ])
    preds = _answers(tmp_path / "b.jsonl", [("b0", "true"), ("w0", "option2"), ("w1", "option2")])
    r = score_commonsense(preds, mixed).to_dict()
    assert r["metrics"]["per_dataset"] == {"boolq": 100.0, "winogrande": 50.0} and r["score"] == 75.0
    with pytest.raises(EvalInputError, match="does not fit data set 'piqa'"):
        score_commonsense(preds, boolq, dataset="piqa")


# --- exact ---------------------------------------------------------------------------------------------------

def test_normalize_exact():
    assert normalize_exact("  Red.\nbecause it is red") == "red"
    assert normalize_exact("Circle") == "circle"


def test_exact_overall_and_per_category(tmp_path):
    questions = _jsonl(tmp_path / "q.jsonl", [
        {"question_id": "a", "image": "1.png", "text": "What color?", "answer": "red", "category": "color"},
        {"question_id": "b", "image": "1.png", "text": "What shape?", "answer": "circle", "category": "shape"},
        {"question_id": "c", "image": "2.png", "text": "What shape?", "answer": "square", "category": "shape"},
    ])
    gold = _answers(tmp_path / "g.jsonl", [("a", "red"), ("b", "circle"), ("c", "square")])
    assert score_exact(gold, questions).score == 100.0
    r = score_exact(_answers(tmp_path / "a.jsonl", [("a", "Red."), ("b", "triangle")]), questions).to_dict()
    assert r["metrics"]["per_category"] == {"color": 100.0, "shape": 0.0}
    assert r["score"] == pytest.approx(100 / 3) and r["counts"]["missing"] == 1
    assert any("1 of 3 questions have no prediction" in w for w in r["warnings"])
