"""Compare adapter inits on one base, one data set, one budget: LoRA, PiSSA (principal), MiLoRA (minor), and
full finetuning as the reference, over several seeds.

    python scripts/compare_inits.py --recipe configs/demo/easyvqa_milora.yaml --output runs/compare_inits
        [--inits lora principal minor full] [--seeds 0 1 2] [--max-steps N] [--full-lr LR]
        [--new-questions F --old-questions F --image-folder DIR] [--eval-limit N] [--forgetting-limit N]
        [--launcher python|deepspeed --num-gpus N] [--threads N] [--quick]

Every run trains the recipe (scripts/train_vlm.py's code) with only `adapter.init` and the seed changed (full
finetuning: no adapter, the language model trained in full at --full-lr), then measures
- new-task accuracy and old-task accuracy (retention): greedy answers (milora_vlm.evaluation.generation, what
  eval/generate.py runs) scored by exact match (eval/score.py --task exact);
- forgetting: milora_vlm.analysis.forgetting_ce on held-out old-task conversations (the finetuned model's
  cross-entropy against the base model's greedy predictions at the answer positions; lower = closer to the base);
- the subspace analysis of the update (milora_vlm.analysis, LoRA paper 7.3), for full finetuning with the
  adapters' rank and target modules.
Writes OUTPUT/runs/<init>-s<seed>/ (model, result.json, subspace/), OUTPUT/results.md (mean ± sample std
over seeds, and every run), OUTPUT/results.json and OUTPUT/comparison.png. A run whose result.json exists is
not redone, so an interrupted study resumes; delete a run's folder to redo it.

Default question files: test_new.jsonl / test_old.jsonl next to the recipe's data.train_file (what
data_prep/easy_vqa.py writes). --quick (a smoke test): one seed, 2 steps, 8 questions each.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import time

import torch
import yaml

from milora_vlm.cli import exit_status_zero
from milora_vlm import analysis as an
from milora_vlm.config import ConfigError, read_yaml
from milora_vlm.data.records import RecordWriter, write_records
from milora_vlm.data.subset import seeded_subset

# The checkout this package lives in (pip install -e .): `--launcher deepspeed` starts its scripts/train_vlm.py.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The study's groups: three registered adapter inits (milora_vlm.milora.INITS) and full finetuning.
STUDY_GROUPS = ("lora", "principal", "minor", "full")
INIT_NAMES = {"lora": "LoRA", "principal": "PiSSA", "minor": "MiLoRA", "full": "full FT", "base": "base (no finetuning)"}
# (figure name in a run's result, column title) for the tables and the plot
FIGURES = [
    ("new_acc", "new-task acc. %"),
    ("old_acc", "old-task acc. %"),
    ("forgetting_ce", "forgetting CE"),
    ("agreement", "agreement %"),
    ("mean/delta_norm", "‖ΔW‖"),
    ("mean/delta_proj_norm", "‖UᵀWV‖"),
    ("mean/amplification", "amplification"),
    ("mean/sim_left_top", "φ_U top"),
    ("mean/sim_left_bottom", "φ_U bottom"),
]


def log(msg: str) -> None:
    print(f"[compare_inits {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------- recipes


def load_raw_recipe(path: str) -> dict:
    try:
        raw = read_yaml(path)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("adapter"), dict):
        raise SystemExit(f"{path}: needs an `adapter:` section (the study varies adapter.init)")
    return raw


def run_recipe(raw: dict, init: str, seed: int, output_dir: str, max_steps: int | None, full_lr: float | None) -> dict:
    """The base recipe with only the init and the seed changed (and, for full finetuning, the adapter replaced
    by training the language model in full)."""
    raw = json.loads(json.dumps(raw))  # deep copy
    # local paths made absolute: the run's recipe lives elsewhere, and the deepspeed launcher runs from the checkout
    for section, key in (("model", "path"), ("data", "train_file"), ("data", "image_folder"), (None, "deepspeed")):
        holder = raw if section is None else raw.get(section) or {}
        if isinstance(holder.get(key), str) and os.path.exists(holder[key]):
            holder[key] = os.path.abspath(holder[key])
    training = raw.setdefault("training", {})
    training.update(output_dir=output_dir, seed=seed)
    training.setdefault("report_to", "none")
    training["save_strategy"] = "no"  # only the final model is evaluated; intermediate checkpoints cost disk and time
    training.pop("save_steps", None)
    training.pop("save_total_limit", None)
    if max_steps is not None:
        training["max_steps"] = max_steps
    raw["export"] = "none"
    raw.pop("bootstrap", None)
    if init == "full":
        raw["adapter"] = None
        raw.setdefault("trainable", {})["language_model"] = "full"
        if full_lr is not None:
            training["learning_rate"] = full_lr
    else:
        raw["adapter"] = {**raw["adapter"], "init": init, "seed": seed}
    return raw


def is_trained(output_dir: str) -> bool:
    """The pipeline writes the final adapter / model at the top of output_dir only after training finished."""
    return any(os.path.isfile(os.path.join(output_dir, f)) for f in ("adapter_model.safetensors", "model.safetensors"))


def train(recipe_path: str, launcher: str, num_gpus: int) -> None:
    if launcher == "python":
        # In this process: the same code as `python scripts/train_vlm.py --config ...`, without paying the
        # interpreter and library start-up (~20 s on a 2-core machine) for every run.
        from milora_vlm.train.pipeline import main as train_main

        rc = train_main(["--config", recipe_path])
    else:
        script = os.path.join(ROOT, "scripts", "train_vlm.py")
        if not os.path.isfile(script):
            raise SystemExit(f"--launcher deepspeed runs a checkout's scripts/train_vlm.py; {script} is missing "
                             "(install the package from a checkout with pip install -e .)")
        port = str(random.Random(recipe_path).randint(29600, 29999))
        cmd = ["deepspeed", "--num_gpus", str(num_gpus), "--master_port", port,
               script, "--config", recipe_path]
        log(" ".join(cmd))
        rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc != 0:
        raise SystemExit(f"training failed (exit status {rc}) for {recipe_path}")


# ---------------------------------------------------------------------------------------------------- data


def question_subset(path: str, limit: int | None, out_path: str, seed: int = 0) -> str:
    """A seeded subset of at most `limit` questions (kept in file order), written once, for every run alike."""
    from milora_vlm.evaluation.inputs import load_numbered_records

    records = [rec for _, rec in load_numbered_records(path)]
    if not records:
        raise SystemExit(f"{path}: no questions")
    write_records(out_path, seeded_subset(records, limit, seed))
    return out_path


def questions_as_conversations(questions_path: str, out_path: str) -> str:
    """Eval questions {question_id, image, text, answer} -> LLaVA conversations (the held-out old-task text that
    forgetting is measured on: prompt and gold answer, the answer tokens being the scored positions)."""
    from milora_vlm.evaluation.inputs import load_numbered_records

    with RecordWriter(out_path) as writer:
        for line_no, rec in load_numbered_records(questions_path):
            if "answer" not in rec or "text" not in rec:
                raise SystemExit(f"{questions_path}:{line_no}: forgetting needs fields 'text' and 'answer'")
            human = rec["text"] if rec.get("image") is None else f"<image>\n{rec['text']}"
            conv = {"id": str(rec.get("question_id", line_no)),
                    "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": str(rec["answer"])}]}
            if rec.get("image") is not None:
                conv["image"] = rec["image"]
            writer.write(conv)
    return out_path


def forgetting_batches(conversations: str, base_recipe, loaded, batch_size: int,
                       image_folder: str | None = None) -> tuple[list[dict], list[str]]:
    """Batches of the held-out conversations, encoded exactly as training encodes (the dataset's `encode` and the
    collator); a conversation that cannot be encoded (e.g. longer than data.max_length) is skipped and reported.
    Their images are in `image_folder` (the question files' --image-folder; default: the recipe's)."""
    from milora_vlm.data.collator import SKIPS_KEY, ConversationCollator
    from milora_vlm.data.dataset import ConversationDataset
    from milora_vlm.data.records import iter_records
    from milora_vlm.data.skips import SkipSample

    d = base_recipe.data
    image_token_id = getattr(loaded.model.config, "image_token_id", None) if loaded.is_llava else None
    num_image_tokens = getattr(loaded.model.config, "image_seq_length", 0) if loaded.is_llava else 0
    ds = ConversationDataset(conversations, loaded.tokenizer, d.template, d.max_length,
                             image_folder=image_folder or d.image_folder,
                             image_processor=loaded.processor.image_processor if loaded.is_llava else None,
                             image_token_id=image_token_id, num_image_tokens=num_image_tokens,
                             image_aspect_ratio=d.image_aspect_ratio)
    collate = ConversationCollator(pad_token_id=loaded.tokenizer.pad_token_id, image_token_id=image_token_id,
                                   num_image_tokens=num_image_tokens)
    samples, skipped = [], []
    for line, rec, err in iter_records(conversations):
        try:  # the dataset itself would silently use the next record instead: here each record counts once
            if err is not None:
                raise SkipSample("malformed_record", err)
            samples.append(ds.encode(rec))
        except SkipSample as e:
            skipped.append(f"{conversations}:{line}: {e.reason}: {e.detail}")
    if not samples:
        raise SystemExit(f"{conversations}: no conversation could be encoded; first: {skipped[:1]}")
    batches = []
    for start in range(0, len(samples), batch_size):
        batch = collate(samples[start:start + batch_size])
        batch.pop(SKIPS_KEY)
        batches.append(batch)
    return batches, skipped


# ---------------------------------------------------------------------------------------------------- evaluation


def accuracy(loaded, questions: str, answers: str, template: str, image_folder: str | None, aspect: str) -> float:
    from milora_vlm.data.templates import get_template
    from milora_vlm.evaluation.generation import GenerationSettings, generate_answers, read_questions
    from milora_vlm.evaluation.tasks import run_task

    settings = GenerationSettings(template=get_template(template), max_new_tokens=8, batch_size=32,
                                  image_folder=image_folder, image_aspect_ratio=aspect)
    report = generate_answers(loaded, read_questions(questions), answers, settings, source=questions, show_progress=True)
    for s in report.skipped:
        log(f"skipped question: {s}")
    result = run_task("exact", predictions=answers, questions=questions)
    for w in result.warnings:
        log(f"warning: {w}")
    return float(result.score)


def evaluate_run(name: str, model_dir: str, base, ctx: dict) -> dict:
    """new / old accuracy, forgetting CE against the base and (for trained runs) the subspace analysis."""
    from milora_vlm.model.load import is_adapter_dir, load_for_inference

    base_path = ctx["base_path"]

    if model_dir == base_path:
        loaded = base
    else:
        loaded = load_for_inference(model_dir, base=base_path if is_adapter_dir(model_dir) else None, dtype="float32")
    d = ctx["recipe"].data
    eval_dir = os.path.join(ctx["output"], "runs", name, "answers")
    result = {"run": name}
    for family in ("new", "old"):
        result[f"{family}_acc"] = accuracy(loaded, ctx[f"{family}_questions"], os.path.join(eval_dir, f"{family}.jsonl"),
                                           d.template, ctx["image_folder"], d.image_aspect_ratio)
    batches = [{k: v.to(loaded.device) for k, v in b.items()} for b in ctx["forgetting_batches"]]
    forgetting = an.forgetting_stats(loaded.model, base.model, batches)
    result["forgetting_ce"], result["agreement"] = forgetting.ce, 100.0 * forgetting.agreement
    if model_dir != base_path:
        report = an.analyze_checkpoint(base_path, model_dir, label=name, rank=ctx["adapter"].r, targets=ctx["targets"])
        an.write_report(report, os.path.join(ctx["output"], "runs", name, "subspace"))
        result.update({f"mean/{k}": v for k, v in report.module_mean().items()})
        result["subspace_modules"] = len(report.modules)
    return result


# ---------------------------------------------------------------------------------------------------- tables


def write_results(output: str, results: dict[str, list[dict]], meta: dict, plot: bool = True) -> None:
    summaries = {}
    for group, runs in results.items():
        figures = [{n: float(r[n]) for n, _ in FIGURES if n in r} for r in runs]
        summaries[INIT_NAMES.get(group, group)] = an.summarize_over_seeds(figures)
    with open(os.path.join(output, "results.json"), "w", encoding="utf-8") as f:
        json.dump(an.json_safe({"meta": meta, "runs": results,
                                 "summary": {g: {n: vars(s) for n, s in summ.items()} for g, summ in summaries.items()}}),
                  f, indent=1)
    lines = [
        "## Adapter inits compared: same base, data and budget",
        "",
        f"Recipe `{meta['recipe']}`, {meta['max_steps']} steps per run, seeds {meta['seeds']}; "
        f"{meta['new_questions_n']} new-task and {meta['old_questions_n']} old-task test questions, forgetting on "
        f"{meta['forgetting_n']} held-out old-task conversations. Cells: mean ± sample std over seeds.",
        "",
        an.comparison_table(summaries, FIGURES),
        "forgetting CE (the MiLoRA paper's measure): the finetuned model's cross-entropy against the base model's "
        "greedy prediction at each answer position of held-out old-task text; lower = closer to the base, but a "
        "model surer of the base's own answers also scores lower, so the base row (the base against itself) is a "
        "reference, not a floor. agreement: share of those positions where the finetuned and base greedy tokens "
        "agree (base: 100). Subspace columns: mean over the adapted modules of the update ΔW against the original W "
        "(milora_vlm.analysis; full FT analysed on the same modules with the adapters' rank).",
        "",
        "### Every run",
        "",
        "| run | " + " | ".join(h for _, h in FIGURES) + " |",
        "|" + "---|" * (len(FIGURES) + 1),
    ]
    for runs in results.values():
        for r in runs:
            lines.append(f"| {r['run']} | " + " | ".join(an.format_value(r.get(n), n.split('/')[-1]) for n, _ in FIGURES) + " |")
    with open(os.path.join(output, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    if plot:
        an.plot_comparison(summaries, FIGURES, os.path.join(output, "comparison.png"))
    print("\n".join(lines[6:7]))


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--recipe", required=True, help="the training recipe every run starts from (needs an adapter section)")
    ap.add_argument("--output", required=True, help="study directory")
    ap.add_argument("--inits", nargs="+", default=list(STUDY_GROUPS), choices=STUDY_GROUPS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--max-steps", type=int, help="training steps per run (default: the recipe's)")
    ap.add_argument("--full-lr", type=float, help="learning rate of full finetuning (default: the recipe's / 10)")
    ap.add_argument("--new-questions", help="new-task eval questions (default: test_new.jsonl next to data.train_file)")
    ap.add_argument("--old-questions", help="old-task eval questions (default: test_old.jsonl next to data.train_file)")
    ap.add_argument("--image-folder", help="folder the questions' images are relative to (default: data.image_folder)")
    ap.add_argument("--eval-limit", type=int, default=500, help="at most this many questions per family (seeded subset)")
    ap.add_argument("--forgetting-limit", type=int, default=200, help="held-out old-task conversations for forgetting CE")
    ap.add_argument("--launcher", choices=["python", "deepspeed"], default="python",
                    help="python: one process, in this interpreter; deepspeed: the deepspeed launcher with --num-gpus")
    ap.add_argument("--num-gpus", type=int, default=1)
    ap.add_argument("--threads", type=int,
                    help="CPU threads for torch (training and evaluation). On a shared CPU box use 1 (BENCHMARKS.md, "
                         "easy-VQA demo and inits study: 1 thread was several times faster than 2 there)")
    ap.add_argument("--quick", action="store_true", help="smoke test: first seed only, 2 steps, 8 questions each")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.max_steps, args.eval_limit, args.forgetting_limit = 2, 8, 8
    for name in ("max_steps", "eval_limit", "forgetting_limit", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    return args


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the deepspeed launcher's processes
    from milora_vlm.config import build_recipe
    from milora_vlm.model.trainable import adapter_target_modules

    raw = load_raw_recipe(args.recipe)
    try:
        recipe = build_recipe(json.loads(json.dumps(raw)), source=args.recipe)
    except ConfigError as e:
        raise SystemExit(f"{args.recipe}: {e}")
    data_dir = os.path.dirname(os.path.abspath(recipe.data.train_file))
    new_q = args.new_questions or os.path.join(data_dir, "test_new.jsonl")
    old_q = args.old_questions or os.path.join(data_dir, "test_old.jsonl")
    for p in (new_q, old_q):
        if not os.path.isfile(p):
            raise SystemExit(f"{p}: no such question file (run data_prep/easy_vqa.py, or pass --new-questions / --old-questions)")
    full_lr = args.full_lr if args.full_lr is not None else float(recipe.training.get("learning_rate", 5e-5)) / 10
    out = os.path.abspath(args.output)
    eval_dir = os.path.join(out, "eval")
    ctx = {
        "output": out,
        "recipe": recipe,
        "adapter": recipe.adapter,
        # the adapters' modules, as training resolves them (for LLaVA: inside the language model only); full
        # finetuning is analysed on the same ones
        "targets": adapter_target_modules(recipe),
        "base_path": recipe.model.path,
        "image_folder": args.image_folder or recipe.data.image_folder,
        "new_questions": question_subset(new_q, args.eval_limit, os.path.join(eval_dir, "new_questions.jsonl")),
        "old_questions": question_subset(old_q, args.eval_limit, os.path.join(eval_dir, "old_questions.jsonl")),
    }
    held_out = question_subset(old_q, args.forgetting_limit, os.path.join(eval_dir, "forgetting_questions.jsonl"), seed=1)
    conversations = questions_as_conversations(held_out, os.path.join(eval_dir, "forgetting_conversations.jsonl"))

    from milora_vlm.model.load import load_for_inference
    from milora_vlm.train.pipeline import prepare_model_and_data

    prepare_model_and_data(recipe)  # a recipe that builds its base (bootstrap, a composed LLaVA): before it loads
    base = load_for_inference(recipe.model.path, dtype="float32")
    ctx["forgetting_batches"], skipped = forgetting_batches(conversations, recipe, base, batch_size=16,
                                                            image_folder=ctx["image_folder"])
    if skipped:
        log(f"forgetting set: {len(skipped)} conversations skipped; first: {skipped[:3]}")
    meta = {"recipe": args.recipe, "seeds": args.seeds, "max_steps": args.max_steps or recipe.training.get("max_steps"),
            "full_lr": full_lr, "new_questions_n": sum(1 for _ in open(ctx["new_questions"])),
            "old_questions_n": sum(1 for _ in open(ctx["old_questions"])),
            "forgetting_n": sum(len(b["input_ids"]) for b in ctx["forgetting_batches"]), "forgetting_skipped": skipped,
            "date": time.strftime("%Y-%m-%d"), "device": str(base.device)}

    results: dict[str, list[dict]] = {"base": [load_or_run(os.path.join(out, "runs", "base"),
                                                          lambda: evaluate_run("base", recipe.model.path, base, ctx))]}
    for init in args.inits:
        for seed in args.seeds:
            name = f"{init}-s{seed}"
            run_dir = os.path.join(out, "runs", name)

            def job(name=name, run_dir=run_dir, init=init, seed=seed):
                model_dir = os.path.join(run_dir, "model")
                if not is_trained(model_dir):
                    path = os.path.join(run_dir, "recipe.yaml")
                    os.makedirs(run_dir, exist_ok=True)
                    with open(path, "w", encoding="utf-8") as f:
                        yaml.safe_dump(run_recipe(raw, init, seed, model_dir, args.max_steps, full_lr), f, sort_keys=False)
                    t0 = time.time()
                    log(f"training {name}")
                    train(path, args.launcher, args.num_gpus)
                    train_s = time.time() - t0
                else:
                    train_s = None
                log(f"evaluating {name}")
                res = evaluate_run(name, model_dir, base, ctx)
                res.update(init=init, seed=seed, train_seconds=train_s)
                return res

            results.setdefault(init, []).append(load_or_run(run_dir, job))
            write_results(out, results, meta, plot=False)  # after every run: a partial study already has its table
    write_results(out, results, meta)
    log(f"done: {os.path.join(out, 'results.md')}")
    return results


def load_or_run(run_dir: str, job) -> dict:
    path = os.path.join(run_dir, "result.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    result = job()
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(an.json_safe(result), f, indent=1)
    return result


entry = exit_status_zero(main)  # the console script


if __name__ == "__main__":
    main()
