"""Answer generation on tiny saved models: prompts, left-padded batches, stop strings, resuming after a kill,
adapter directories, chunks and per-rank merging; and the shared image preprocessing."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import pytest
import torch
from PIL import Image

from milora_vlm.data.images import expand_to_square, image_token_count, mean_color, process_images
from milora_vlm.data.templates import encode_conversation, get_template
from milora_vlm.evaluation.generation import (
    SINGLE_PRED_PROMPT,
    AnswerGenerator,
    GenerationSettings,
    cut_at_stops,
    merge_answer_files,
    read_answers,
    read_questions,
    select_chunk,
    stop_strings,
)
from milora_vlm.evaluation.inputs import EvalInputError
from milora_vlm.model.load import load_for_inference
from tests.helpers import REPO, load_script
from tests.helpers.files import write_jsonl as _jsonl


generate_cli = load_script("eval/generate.py", "eval_generate_cli")


def _lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def vqa_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    (root / "images").mkdir()
    colors = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}
    for i, (name, rgb) in enumerate(colors.items()):
        Image.new("RGB", (48 + 8 * i, 32), rgb).save(root / "images" / f"{name}.png")
    rows = [{"question_id": k, "image": f"{name}.png", "text": "What color is the shape?" + " Answer." * (k % 3)}
            for k, name in enumerate(list(colors) * 2)]
    rows.append({"question_id": "text-only", "text": "Is there a red circle?"})
    return root, _jsonl(root / "questions.jsonl", rows)


# --- images --------------------------------------------------------------------------------------------------

def test_expand_to_square_centres_on_background():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    sq = expand_to_square(img, (1, 2, 3))
    assert sq.size == (40, 40)
    assert sq.getpixel((0, 0)) == (1, 2, 3) and sq.getpixel((20, 20)) == (255, 0, 0)
    assert sq.getpixel((20, 9)) == (1, 2, 3) and sq.getpixel((20, 10)) == (255, 0, 0)  # pasted at y = (40-20)//2
    assert expand_to_square(Image.new("RGB", (8, 8)), (0, 0, 0)).size == (8, 8)


def test_process_images_modes(tiny_llava_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    ip = processor.image_processor
    wide = Image.new("RGB", (64, 16), (255, 0, 0))
    pad = process_images([wide], ip, "pad")
    assert pad.shape == (1, 3, 32, 32)
    assert pad[0, :, 0, 16].abs().max() < 0.02  # the padding is the mean colour: normalised to ~0
    assert pad[0, :, 16, 16].abs().min() > 1.0  # the red image itself
    assert process_images([wide], ip, "resize")[0, :, 0, 16].abs().min() > 1.0  # stretched: no padding rows
    assert process_images([wide], ip, "native").shape == (1, 3, 32, 32)
    assert mean_color(ip) == (123, 117, 104)
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        process_images([wide], ip, "square")
    # The <image> token count agrees with transformers' own LlavaProcessor expansion.
    n = image_token_count(processor, pad)
    ids = processor(text="<image>", images=[wide], return_tensors="pt")["input_ids"][0].tolist()
    assert n == ids.count(processor.image_token_id) == 16


# --- questions, stops, chunks --------------------------------------------------------------------------------

def test_read_questions_rules(tmp_path):
    qs = read_questions(_jsonl(tmp_path / "q.jsonl", [{"instruction": "a"}, {"query": "b", "question_id": 7}]))
    assert [(q.qid, q.text) for q in qs] == [(0, "a"), (7, "b")]
    # LLaVA's TextVQA file reuses an id for different questions: allowed; the same id and text twice is not.
    assert len(read_questions(_jsonl(tmp_path / "t.jsonl", [{"question_id": "i", "text": "a"}, {"question_id": "i", "text": "b"}]))) == 2
    # the same id, text and image twice (LLaVA's TextVQA file): answered once, and the repeat is named
    qs = read_questions(_jsonl(tmp_path / "d.jsonl", [{"question_id": 1, "text": "a"}, {"question_id": 1, "text": "a"}]))
    assert len(qs) == 1 and qs.repeated == [f"{tmp_path / 'd.jsonl'}:2 (as line 1)"]
    with pytest.raises(EvalInputError, match=r":2: the same question_id and text as line 1, with another image"):
        read_questions(_jsonl(tmp_path / "e.jsonl", [{"question_id": 1, "text": "a", "image": "x.png"},
                                                     {"question_id": 1, "text": "a", "image": "y.png"}]))
    with pytest.raises(EvalInputError, match=r":1: missing question text"):
        read_questions(_jsonl(tmp_path / "m.jsonl", [{"question_id": 1, "image": "x.png"}]))
    with pytest.raises(EvalInputError, match=r"non-empty 'input'"):
        read_questions(_jsonl(tmp_path / "i.jsonl", [{"instruction": "a", "input": "context"}]))


def test_llava_conversation_style_question_file(tmp_path):
    # LLaVA's scripts/convert_sqa_to_llava.py writes llava_test_CQM-A.json; model_vqa_science takes the first
    # turn, removes <image>, and with --single-pred-prompt appends its answer-format line.
    rows = [{"id": "4", "image": "4/image.png",
             "conversations": [{"from": "human", "value": "Context: x\nQuestion: Which?\nOptions: (A) a (B) b\n<image>"},
                               {"from": "gpt", "value": "The answer is A."}]},
            {"id": "7", "conversations": [{"from": "human", "value": "Question: Why?\nOptions: (A) c (B) d"},
                                          {"from": "gpt", "value": "The answer is B."}]}]
    path = tmp_path / "llava_test_CQM-A.json"
    path.write_text(json.dumps(rows))
    qs = read_questions(str(path), "\n" + SINGLE_PRED_PROMPT)
    assert [(q.qid, q.image) for q in qs] == [("4", "4/image.png"), ("7", None)]
    assert qs[0].text == ("Context: x\nQuestion: Which?\nOptions: (A) a (B) b\n"
                          "Answer with the option's letter from the given choices directly.")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "1", "conversations": [None]}]))
    with pytest.raises(EvalInputError, match=r"bad.json:1: field 'conversations' must start with a turn"):
        read_questions(str(bad))


@pytest.mark.parametrize(
    "row,message",
    [
        ({"question_id": 0, "image": "a.png", "text": "<image>\nWhat? <image>"}, r"q.jsonl:2: the question has 2 <image>"),
        ({"question_id": 0, "text": "<image>\nWhat?"}, r"q.jsonl:2: the question has <image> but no 'image' field"),
    ],
)
def test_image_placeholder_problems_are_errors_before_generation(tmp_path, row, message):
    with pytest.raises(EvalInputError, match=message):
        read_questions(_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "text": "fine"}, row]))


def _png_header(width, height):
    """A few-byte PNG that declares width x height (PIL checks the size when opening, before decoding)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_undecodable_and_bomb_images_are_counted_skips(tiny_llava_dir, vqa_files, tmp_path):
    from milora_vlm.evaluation.generation import generate_answers

    root, _ = vqa_files
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "ok.png").write_bytes((root / "images" / "red.png").read_bytes())
    (tmp_path / "images" / "garbage.png").write_bytes(b"not an image at all")
    (tmp_path / "images" / "bomb.png").write_bytes(_png_header(20000, 20000))  # over 2x the limit: an error in PIL
    (tmp_path / "images" / "big.png").write_bytes(_png_header(10000, 10000))  # over the limit: a warning in PIL
    names = ["ok.png", "garbage.png", "bomb.png", "big.png"]
    qfile = _jsonl(tmp_path / "q.jsonl", [{"question_id": i, "image": n, "text": "Color?"} for i, n in enumerate(names)])
    report = generate_answers(load_for_inference(str(tiny_llava_dir)), read_questions(qfile), str(tmp_path / "a.jsonl"),
                              _settings(tmp_path, batch_size=4), source=qfile, show_progress=False)
    assert report.written == 1 and [r["question_id"] for r in _lines(tmp_path / "a.jsonl")] == [0]
    assert [s.split(": ")[0:2] for s in report.skipped] == [[f"{qfile}:2", "corrupt_image"],
                                                             [f"{qfile}:3", "image_too_large"],
                                                             [f"{qfile}:4", "image_too_large"]]


def test_scienceqa_llava_question_file_end_to_end(tiny_llava_dir, vqa_files, tmp_path):
    from milora_vlm.evaluation.scienceqa import score_scienceqa

    root, _ = vqa_files
    rows = [{"id": pid, "image": "red.png" if pid == "4" else None,
             "conversations": [{"from": "human", "value": "Question: Which?\nOptions: (A) a (B) b" +
                                ("\n<image>" if pid == "4" else "")}, {"from": "gpt", "value": "A"}]}
            for pid in ("4", "7")]
    for row in rows:
        if row["image"] is None:
            del row["image"]
    qfile = tmp_path / "llava_test_CQM-A.json"
    qfile.write_text(json.dumps(rows))
    answers = str(tmp_path / "a.jsonl")
    rc = generate_cli.main(["--model", str(tiny_llava_dir), "--question-file", str(qfile), "--image-folder",
                            str(root / "images"), "--answers-file", answers, "--single-pred-prompt",
                            "--max-new-tokens", "3", "--no-progress", "--template", "vicuna_v1"])
    assert rc == 0 and [r["question_id"] for r in _lines(answers)] == ["4", "7"]
    assert _lines(answers)[0]["prompt"].endswith("\nAnswer with the option's letter from the given choices directly.")
    problems = tmp_path / "problems.json"
    problems.write_text(json.dumps({pid: {"choices": ["a", "b"], "answer": 0, "image": "image.png" if pid == "4" else None,
                                          "split": "test"} for pid in ("4", "7")}))
    r = score_scienceqa(answers, str(problems)).to_dict()
    assert r["counts"]["gold"] == 2 and r["counts"]["predicted"] == 2 and r["metrics"]["num_img"] == 1


def test_non_utf8_question_and_answer_files_name_the_line(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_bytes(b'{"question_id": 0, "text": "a"}\n{"question_id": 1, "text": "caf\xe9"}\n')
    with pytest.raises(EvalInputError, match=r"q.jsonl:2: not UTF-8 \(byte 0xe9"):
        read_questions(str(questions))
    answers = tmp_path / "a.jsonl"
    answers.write_bytes(b'{"question_id": 0, "prompt": "a", "text": "\xff", "model_id": "m"}\n')
    with pytest.raises(EvalInputError, match=r"a.jsonl:1: not UTF-8 \(byte 0xff"):
        read_answers(str(answers))


def test_select_chunk_partitions():
    items = list(range(10))
    chunks = [select_chunk(items, 3, k) for k in range(3)]
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError):
        select_chunk(items, 3, 3)


def test_stop_strings_per_template():
    assert stop_strings(get_template("vicuna_v1"), "</s>") == ["</s>"]
    assert stop_strings(get_template("llama3"), "</s>") == ["<|eot_id|>"]
    assert stop_strings(get_template("chatml"), "</s>", ["Question:"]) == ["<|im_end|>", "Question:"]
    assert stop_strings(get_template("plain"), "</s>") == ["\n"]
    assert cut_at_stops(" red</s> more", ["</s>"]) == "red"
    assert cut_at_stops("step one\nQuestion: next", ["Question:", "\n"]) == "step one"


# --- generation ----------------------------------------------------------------------------------------------

def _settings(root, **kw):
    return GenerationSettings(template=get_template(kw.pop("template", "vicuna_v1")), max_new_tokens=kw.pop("max_new_tokens", 6),
                              image_folder=str(root / "images"), **kw)


def test_prompt_is_the_training_prompt(tiny_llava_dir, vqa_files):
    root, qfile = vqa_files
    loaded = load_for_inference(str(tiny_llava_dir))
    gen = AnswerGenerator(loaded, _settings(root))
    q = read_questions(qfile)[0]
    train = encode_conversation(loaded.tokenizer, "vicuna_v1", [{"from": "human", "value": "<image>\n" + q.text},
                                                                 {"from": "gpt", "value": "red"}],
                                image_token_id=loaded.model.config.image_token_id, num_image_tokens=16)
    prompt = gen.prompt_ids(q, 16)
    assert train.input_ids[: len(prompt)] == prompt and train.labels[len(prompt)] != -100


def test_batched_left_padded_answers_equal_one_by_one(tiny_llava_dir, vqa_files, tmp_path):
    root, qfile = vqa_files
    loaded = load_for_inference(str(tiny_llava_dir))
    from milora_vlm.evaluation.generation import generate_answers

    questions = read_questions(qfile)
    batched = generate_answers(loaded, questions, str(tmp_path / "b.jsonl"), _settings(root, batch_size=4), show_progress=False)
    single = generate_answers(loaded, questions, str(tmp_path / "s.jsonl"), _settings(root, batch_size=1), show_progress=False)
    assert batched.written == single.written == len(questions)
    b, s = _lines(tmp_path / "b.jsonl"), _lines(tmp_path / "s.jsonl")
    assert [r["text"] for r in b] == [r["text"] for r in s]
    assert [r["question_id"] for r in b] == [q.qid for q in questions]
    assert b[0].keys() == {"question_id", "prompt", "text", "model_id"} and b[0]["prompt"] == questions[0].text
    assert len({r["text"] for r in b}) > 1  # the answers depend on the input: not one constant string


def test_killed_run_resumes_without_loss_or_duplicates(tiny_llava_dir, vqa_files, tmp_path):
    root, _ = vqa_files
    n = 40
    many = _jsonl(tmp_path / "many.jsonl", [{"question_id": k, "image": "red.png", "text": f"What color is shape {k}?"}
                                            for k in range(n)])
    out = tmp_path / "answers.jsonl"
    args = ["--model", str(tiny_llava_dir), "--question-file", many, "--answers-file", str(out), "--image-folder",
            str(root / "images"), "--template", "vicuna_v1", "--max-new-tokens", "8", "--no-progress"]
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "eval", "generate.py"), *args, "--batch-size", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = out.read_text()
    assert 2 <= before.count("\n") < n, "the run should have been killed part-way"
    with open(out, "a") as f:  # a write cut off by the kill
        f.write('{"question_id": 39, "prompt": "What col')
    resume = [*args, "--batch-size", "8"]  # the batch size may differ between runs
    assert generate_cli.main(resume) == 0
    rows = _lines(out)
    assert sorted(r["question_id"] for r in rows) == list(range(n))
    assert out.read_text().startswith(before)  # the answers of the killed run are kept as they were
    assert generate_cli.main(resume) == 0 and len(_lines(out)) == n  # a finished file: nothing to do


def test_resume_refuses_another_models_answers(tiny_causal_lm_dir, tmp_path):
    q = _jsonl(tmp_path / "q.jsonl", [{"question_id": 0, "text": "2+2?"}])
    out = _jsonl(tmp_path / "a.jsonl", [{"question_id": 9, "prompt": "x", "text": "y", "model_id": "other"}])
    with pytest.raises(EvalInputError, match="answer by model 'other'"):
        read_answers(out, model_id="tiny")
    rc = generate_cli.main(["--model", str(tiny_causal_lm_dir), "--question-file", q, "--answers-file", out,
                            "--template", "alpaca", "--no-progress", "--model-id", "tiny"])
    assert rc == 2


def test_chunks_cover_the_file_once(tiny_causal_lm_dir, tmp_path):
    q = _jsonl(tmp_path / "q.jsonl", [{"instruction": f"Say {k}.", "answer": str(k)} for k in range(5)])
    outs = []
    for k in range(2):
        outs.append(str(tmp_path / f"a{k}.jsonl"))
        assert generate_cli.main(["--model", str(tiny_causal_lm_dir), "--question-file", q, "--answers-file", outs[-1],
                                  "--template", "alpaca", "--num-chunks", "2", "--chunk-idx", str(k), "--max-new-tokens", "4",
                                  "--answer-prefix", " Let's think step by step.", "--stop", "###", "--no-progress"]) == 0
    ids = [r["question_id"] for o in outs for r in _lines(o)]
    assert ids == [0, 1, 2, 3, 4]
    # Per-rank files fold into one, keeping what the final file already had.
    final = _jsonl(tmp_path / "final.jsonl", _lines(outs[0])[:1])
    assert merge_answer_files(outs, final) == 4
    assert [r["question_id"] for r in _lines(final)] == [0, 1, 2, 3, 4] and not os.path.exists(outs[0])


def test_text_model_rejects_image_questions(tiny_causal_lm_dir, vqa_files, tmp_path):
    _, qfile = vqa_files
    rc = generate_cli.main(["--model", str(tiny_causal_lm_dir), "--question-file", qfile,
                            "--answers-file", str(tmp_path / "a.jsonl"), "--template", "alpaca"])
    assert rc == 2


def test_missing_images_are_an_error_before_loading(tiny_llava_dir, tmp_path):
    q = _jsonl(tmp_path / "q.jsonl", [{"question_id": 0, "image": "nope.png", "text": "?"}])
    with pytest.raises(EvalInputError, match="1 image files not found"):
        from milora_vlm.evaluation.generation import generate_answers

        generate_answers(load_for_inference(str(tiny_llava_dir)), read_questions(q), str(tmp_path / "a.jsonl"),
                         _settings(tmp_path))


# --- adapter directories -------------------------------------------------------------------------------------

def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_plain_lora_adapter_dir_with_recipe(tiny_causal_lm_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter: changes the output
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    (adapter / "milora_recipe.yaml").write_text("data:\n  template: alpaca\n")
    loaded = load_for_inference(str(adapter))
    assert loaded.template == "alpaca" and not loaded.is_llava and loaded.model_id == "adapter"
    ids = loaded.tokenizer("What color is the shape?").input_ids
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(peft_model.eval(), ids))
    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    assert not torch.allclose(_logits(loaded.model, ids), _logits(base, ids))


def test_milora_adapter_dir_loads_the_trained_function(tiny_llava_dir, vqa_files, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from milora_vlm.milora import MiLoRAConfig, apply_milora, save_milora

    model = apply_milora(LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir),
                         MiLoRAConfig(r=4, lora_alpha=4, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.3)  # move away from the step-0 point, where the adapter is a no-op
    adapter = tmp_path / "milora_adapter"
    save_milora(model, adapter)
    loaded = load_for_inference(str(adapter), base=str(tiny_llava_dir))
    assert loaded.is_llava and loaded.processor is not None
    ids = loaded.tokenizer("What color is the shape?").input_ids
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(model.eval(), ids))
    # ... and generates through the adapter, images included.
    from milora_vlm.evaluation.generation import generate_answers

    root, qfile = vqa_files
    report = generate_answers(loaded, read_questions(qfile), str(tmp_path / "a.jsonl"), _settings(root, batch_size=4),
                              show_progress=False)
    assert report.written == len(read_questions(qfile))
    assert {r["model_id"] for r in _lines(tmp_path / "a.jsonl")} == {"milora_adapter"}


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_ranks_split_and_merge(tiny_causal_lm_dir, tmp_path):
    q = _jsonl(tmp_path / "q.jsonl", [{"instruction": f"Say {k}."} for k in range(5)])
    out = tmp_path / "answers.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           os.path.join(REPO, "eval", "generate.py"), "--model", str(tiny_causal_lm_dir), "--question-file", q,
           "--answers-file", str(out), "--template", "alpaca", "--max-new-tokens", "4", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(r["question_id"] for r in _lines(out)) == [0, 1, 2, 3, 4]
    assert sorted(os.listdir(tmp_path)) == ["answers.jsonl", "q.jsonl"]  # the per-rank files are gone
    assert "rank 1: wrote 2 answers" in proc.stderr and "rank 0: wrote 3 answers" in proc.stderr


def test_image_paths_outside_the_image_folder_are_skipped_unless_allowed(tiny_llava_dir, vqa_files, tmp_path):
    from milora_vlm.evaluation.generation import generate_answers

    root, _ = vqa_files
    (tmp_path / "images").mkdir()
    for name in ("red.png", "blue.png"):
        (tmp_path / "images" / name).write_bytes((root / "images" / name).read_bytes())
    (tmp_path / "secret.png").write_bytes((root / "images" / "green.png").read_bytes())
    (tmp_path / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    names = ["red.png", "../secret.png", str(tmp_path / "secret.png"), "link.png", "blue.png"]
    qfile = _jsonl(tmp_path / "q.jsonl", [{"question_id": i, "image": n, "text": "Color?"} for i, n in enumerate(names)])
    loaded = load_for_inference(str(tiny_llava_dir))
    report = generate_answers(loaded, read_questions(qfile), str(tmp_path / "a.jsonl"), _settings(tmp_path, batch_size=8),
                              source=qfile, show_progress=False)
    assert [r["question_id"] for r in _lines(tmp_path / "a.jsonl")] == [0, 4]
    assert [s.split(": ")[0:2] for s in report.skipped] == [[f"{qfile}:{n}", "image_outside_folder"] for n in (2, 3, 4)]
    report = generate_answers(loaded, read_questions(qfile), str(tmp_path / "b.jsonl"),
                              _settings(tmp_path, batch_size=8, allow_images_outside_folder=True), source=qfile,
                              show_progress=False)
    assert report.skipped == [] and len(_lines(tmp_path / "b.jsonl")) == 5


def test_hostile_answer_and_question_lines_are_errors_naming_the_line(tmp_path):
    from milora_vlm.evaluation.generation import read_answers

    answers = tmp_path / "a.jsonl"
    answers.write_text('{"question_id": 0, "prompt": "p", "text": "t"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(EvalInputError, match=r"a\.jsonl:2: not an answer record"):
        read_answers(str(answers))
    questions = _jsonl(tmp_path / "q.jsonl", [{"question_id": 0, "text": "?"}])
    with open(questions, "a", encoding="utf-8") as f:
        f.write('{"question_id": 1, "text": "\\ud800"}\n')  # a lone surrogate: cannot be tokenised or written back
    with pytest.raises(EvalInputError, match=r"q\.jsonl:2: malformed JSON: a \\u escape of a lone surrogate"):
        read_questions(questions)
