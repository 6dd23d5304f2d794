"""Generate answers to a question file with a trained model (merged directory or adapter directory).

  python eval/generate.py --model out/adapter --question-file questions.jsonl --image-folder images \\
      --answers-file answers.jsonl [--template vicuna_v1] [--batch-size 8] [--max-new-tokens 128]

Greedy unless --temperature > 0. The prompt is built by the same code as training, with the template saved in
the model's milora_recipe.yaml unless --template is given. Re-running resumes: answers already in
--answers-file are kept and their questions skipped.

Splitting the work: --num-chunks N --chunk-idx K answers the K-th of N contiguous chunks (each chunk into its own
--answers-file, then concatenate them); under torchrun / the deepspeed launcher every rank takes its chunk
automatically and rank 0 merges the per-rank files into --answers-file at the end.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

from milora_vlm.data.images import ASPECT_RATIOS
from milora_vlm.data.templates import get_template, template_names
from milora_vlm.dist import barrier, gather_object, is_initialized, launcher_rank_and_world
from milora_vlm.evaluation.generation import (
    SINGLE_PRED_PROMPT,
    GenerationSettings,
    generate_answers,
    merge_answer_files,
    read_questions,
    select_chunk,
)
from milora_vlm.evaluation.inputs import EvalInputError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="merged model dir, or adapter dir as written by training")
    p.add_argument("--base", help="base model for an adapter dir (default: its adapter_config.json)")
    p.add_argument("--question-file", required=True, help="JSONL/JSON questions: question_id, text[, image]")
    p.add_argument("--answers-file", required=True, help="answers JSONL to write (appended to when resuming)")
    p.add_argument("--image-folder", help="folder that question 'image' paths are relative to")
    p.add_argument("--allow-images-outside-folder", action="store_true",
                   help="answer questions whose image path resolves outside --image-folder (../, absolute, a "
                   "symlink out); by default they are skipped and reported, as in training")
    p.add_argument("--template", choices=template_names(), help="conversation template (default: the recipe's)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, help="nucleus sampling when --temperature > 0")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-aspect-ratio", choices=ASPECT_RATIOS, default="pad")
    p.add_argument("--single-pred-prompt", action="store_true",
                   help="append LLaVA's \"Answer with the option's letter from the given choices directly.\" line to "
                   "each question (its ScienceQA evaluation)")
    p.add_argument("--answer-prefix", default="", help="text appended to every prompt, e.g. \" Let's think step by step.\"")
    p.add_argument("--stop", action="append", default=[], help="extra stop string (repeatable)")
    p.add_argument("--num-chunks", type=int, default=1)
    p.add_argument("--chunk-idx", type=int, default=0)
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--model-id", help="model_id written with each answer (default: the model dir's name)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    # the deepspeed launcher passes --local_rank; the rank is read from the environment
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank, world_size = launcher_rank_and_world()
    if world_size > 1 and args.num_chunks != 1:
        print("error: use either --num-chunks/--chunk-idx or a distributed launcher, not both", file=sys.stderr)
        return 2
    num_chunks, chunk_idx = (world_size, rank) if world_size > 1 else (args.num_chunks, args.chunk_idx)
    output = f"{args.answers_file}.part{rank}of{world_size}" if world_size > 1 else args.answers_file
    try:
        suffix = "\n" + SINGLE_PRED_PROMPT if args.single_pred_prompt else ""
        all_questions = read_questions(args.question_file, suffix)
        if all_questions.repeated and rank == 0:
            print(f"note: {len(all_questions.repeated)} questions repeat an earlier line (same question_id, text and "
                  f"image) and are answered once: {', '.join(all_questions.repeated[:3])}", file=sys.stderr)
        questions = select_chunk(all_questions, num_chunks, chunk_idx)
        from milora_vlm.model.load import load_for_inference

        loaded = load_for_inference(args.model, base=args.base, dtype=args.dtype, model_id=args.model_id)
        template_name = args.template or loaded.template
        if template_name is None:
            raise EvalInputError(f"{args.model} has no milora_recipe.yaml naming a template: pass --template "
                                 f"(one of {template_names()})")
        settings = GenerationSettings(
            template=get_template(template_name),
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            batch_size=args.batch_size,
            image_folder=args.image_folder,
            allow_images_outside_folder=args.allow_images_outside_folder,
            image_aspect_ratio=args.image_aspect_ratio,
            answer_prefix=args.answer_prefix,
            extra_stop_strings=tuple(args.stop),
            seed=args.seed,
        )
        if world_size > 1:  # answers already merged into the final file count as done on every rank
            from milora_vlm.evaluation.generation import read_answers

            merged = read_answers(args.answers_file, loaded.model_id)
            questions = [q for q in questions if q.key not in merged]
        report = generate_answers(loaded, questions, output, settings, source=args.question_file,
                                  show_progress=not args.no_progress and rank == 0)
    except (EvalInputError, OSError, ValueError) as e:  # bad inputs, a missing model dir, --chunk-idx out of range
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"rank {rank}: wrote {report.written} answers, {report.already_done} already done, "
          f"{len(report.skipped)} skipped -> {output}", file=sys.stderr)
    for s in report.skipped:
        print(f"skipped: {s}", file=sys.stderr)
    if world_size > 1:
        _merge_ranks(args.answers_file, rank, world_size)
    return 0


def _merge_ranks(answers_file: str, rank: int, world_size: int) -> None:
    """Wait for every rank, then rank 0 folds the per-rank files into the final answers file.

    On node-local disks rank 0 cannot see another node's part file, so every rank also sends its part's text and
    rank 0 writes the ones it cannot see before merging (on a shared disk it sees them all); each node then drops
    its own part, as the merge does on a shared disk."""
    import torch.distributed as dist

    own_group = not is_initialized()
    if own_group:  # gloo works on CPU and GPU machines alike
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
    barrier()
    parts = [f"{answers_file}.part{r}of{world_size}" for r in range(world_size)]
    own = None
    if os.path.exists(parts[rank]):
        with open(parts[rank], encoding="utf-8") as f:
            own = f.read()
    texts = gather_object(own)
    if rank == 0:
        for part, text in zip(parts, texts):
            if text is not None and not os.path.exists(part):  # another node's disk
                with open(part, "w", encoding="utf-8") as f:
                    f.write(text)
        added = merge_answer_files([p for p in parts if os.path.exists(p)], answers_file)
        print(f"merged {added} answers from {world_size} ranks into {answers_file}", file=sys.stderr)
    barrier()
    if os.path.exists(parts[rank]):  # merged on rank 0's disk; this node's copy is done with
        os.remove(parts[rank])
    if own_group:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
