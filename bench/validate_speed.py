"""How fast data_prep/llava_instruct.py validates a LLaVA-665K-sized file.

    python bench/validate_speed.py [--records 665000] [--images 1000] [--image-size 64] [--workers N]
                                   [--format json|jsonl] [--image-check decode|exists] [--tokenizer DIR --max-length N]
    python bench/validate_speed.py --parse-only [--rounds 5] ...   # reading alone: this project's reader / json's

Generates, in a temporary folder, --records LLaVA-style records (single-turn short-answer VQA, multi-turn
conversations and text-only ones, in LLaVA-665K's rough proportions) that reuse --images small generated JPEGs,
runs the validator on it as a user would (a subprocess) and prints the wall time and records/s. Generation is
not timed. With --images equal to --records every record has its own image: the decode-bound case.
--parse-only times reading the file instead: records.iter_records (every check of milora_vlm/jsontext.py: nesting,
duplicate keys, lone surrogates, bounded lines) against the standard library alone (json.loads per line, or
json.load of the whole array), in the same process, alternating, CPU time, median ratio over --rounds.
Besides wall time it reports the CPU seconds the validator and its workers used: on a shared machine wall time
depends on the neighbours, CPU time much less.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from PIL import Image
from tqdm import tqdm

from milora_vlm.data.records import iter_records, write_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_QUESTIONS = ["What is the color of the {o}?", "How many {o}s are there?", "Is there a {o} in the image?",
              "What is the man holding next to the {o}?", "Where is the {o} placed?"]
_OBJECTS = ["bus", "cat", "table", "umbrella", "kite", "pizza", "clock", "dog", "train", "chair"]
_SUFFIX = "\nAnswer the question using a single word or phrase."
_LONG = ("The image shows a busy street scene with several people walking along the sidewalk, a red bus "
         "waiting at the stop and tall buildings in the background. ")


def make_record(i: int, n_images: int, rng: random.Random) -> dict:
    kind = rng.random()
    if kind < 0.06:  # ShareGPT-like text-only conversation (~6% of 665K)
        return {"id": f"text-{i}", "conversations": [
            {"from": "human", "value": "Explain the following idea in detail. " * rng.randint(1, 4)},
            {"from": "gpt", "value": _LONG * rng.randint(2, 8)}]}
    rec = {"id": f"{i:012d}", "image": f"img/{i % n_images:06d}.jpg"}
    turns = []
    for t in range(1 if kind < 0.5 else rng.randint(2, 6)):
        q = rng.choice(_QUESTIONS).format(o=rng.choice(_OBJECTS))
        long_answer = kind >= 0.5 and rng.random() < 0.5
        turns.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + q + ("" if long_answer else _SUFFIX)})
        turns.append({"from": "gpt", "value": _LONG * rng.randint(1, 3) if long_answer else rng.choice(_OBJECTS)})
    rec["conversations"] = turns
    return rec


def generate(folder: str, n_records: int, n_images: int, size: int, fmt: str) -> str:
    rng = random.Random(0)
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    for k in tqdm(range(n_images), desc="images", unit="img", mininterval=1.0):
        colour = tuple(rng.randrange(256) for _ in range(3))
        Image.new("RGB", (size, size), colour).save(os.path.join(folder, "img", f"{k:06d}.jpg"), quality=90)
    path = os.path.join(folder, f"data.{fmt}")
    write_records(path, (make_record(i, n_images, rng)
                         for i in tqdm(range(n_records), desc="records", unit="rec", mininterval=1.0)))
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=665_000)
    ap.add_argument("--images", type=int, default=1000, help="distinct images, reused across records")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--format", choices=["json", "jsonl"], default="json", help="LLaVA-665K ships as a JSON array")
    ap.add_argument("--image-check", choices=["decode", "exists"], default="decode")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--image-tokens", type=int, default=None)
    ap.add_argument("--parse-only", action="store_true", help="time reading the records only (see above)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = generate(tmp, args.records, args.images, args.image_size, args.format)
        size_mb = os.path.getsize(data) / 2**20
        if args.parse_only:
            return parse_only(data, args, size_mb)
        cmd = [sys.executable, os.path.join(REPO, "data_prep", "llava_instruct.py"), "--input", data,
               "--image-folder", tmp, "--output", os.path.join(tmp, "clean.jsonl"), "--workers", str(args.workers),
               "--image-check", args.image_check]
        if args.tokenizer:
            cmd += ["--tokenizer", args.tokenizer, "--max-length", str(args.max_length)]
            if args.image_tokens is not None:
                cmd += ["--image-tokens", str(args.image_tokens)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the validator and its worker processes
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if proc.returncode != 0:
            raise SystemExit(f"validator failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        with open(os.path.join(tmp, "clean.report.json"), encoding="utf-8") as f:
            report = json.load(f)
    result = {
        "records": args.records, "distinct_images": args.images, "image_size": args.image_size,
        "format": args.format, "input_mb": round(size_mb, 1), "workers": args.workers,
        "image_check": args.image_check, "tokenizer": args.tokenizer, "cpu_count": os.cpu_count(),
        "wall_s": round(wall, 1), "records_per_s": round(args.records / wall),
        "cpu_s": round(cpu, 1), "records_per_cpu_s": round(args.records / cpu),
        "peak_rss_mb_largest_process": round(after.ru_maxrss / 1024),  # Linux reports KiB
        "load_average_1min_after": round(os.getloadavg()[0], 1),
        "records_kept": report["records_kept"], "records_dropped": report["records_dropped"],
    }
    print(json.dumps(result, indent=1))
    return result


def parse_only(data: str, args, size_mb: float) -> dict:
    def project() -> int:
        return sum(1 for _, rec, err in iter_records(data) if err is None)

    def stdlib() -> int:
        with open(data, encoding="utf-8") as f:
            return sum(1 for line in f if json.loads(line)) if data.endswith(".jsonl") else len(json.load(f))

    times: dict[str, list[float]] = {"project": [], "stdlib": []}
    for _ in range(args.rounds):
        for name, read in (("project", project), ("stdlib", stdlib)):
            start = time.process_time()
            assert read() == args.records
            times[name].append(time.process_time() - start)
    ratios = sorted(p / q for p, q in zip(times["project"], times["stdlib"]))
    result = {"records": args.records, "format": args.format, "input_mb": round(size_mb, 1), "rounds": args.rounds,
              "project_cpu_s_median": round(statistics.median(times["project"]), 2),
              "stdlib_cpu_s_median": round(statistics.median(times["stdlib"]), 2),
              "ratio_median": round(statistics.median(ratios), 3), "ratio_range": [round(ratios[0], 3), round(ratios[-1], 3)],
              "load_average_1min": round(os.getloadavg()[0], 1)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
