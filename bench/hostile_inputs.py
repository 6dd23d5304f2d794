"""Each kind of hostile training input, fed to the training dataset and to data_prep/llava_instruct.py: what happens.

    python bench/hostile_inputs.py

Generates every input in a temporary folder (a few bytes each), builds a tiny LLaVA processor, and prints one
table row per kind: the training dataset's outcome (skip reason, or what was trained), data_prep's outcome (drop
reason), and for the image kinds the time and peak-memory growth of decoding + preprocessing (pad mode).
Figures go into BENCHMARKS.md's reliability section.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import tempfile
import time
import zlib


from PIL import Image

from milora_vlm.data.dataset import ConversationDataset, NoTrainableRecords
from milora_vlm.data.records import iter_records, write_records
from milora_vlm.data.validation import CheckConfig, check_record, read_error_reason
from milora_vlm.model.tiny import build_tiny_llava, train_tiny_tokenizer

CONV = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def build(root: str) -> list[tuple[str, bytes | dict, int]]:
    """(kind, JSONL line as a record or raw bytes, file size of its image or 0)."""
    images = os.path.join(root, "images")
    os.makedirs(images)
    Image.new("RGB", (32, 32), "red").save(os.path.join(images, "ok.png"))
    files = {
        "bomb.png": png_header_only(20000, 20000),
        "big.png": png_header_only(8000, 6000),
        "corrupt.png": b"\x89PNG\r\n\x1a\n not a png",
    }
    for name, data in files.items():
        with open(os.path.join(images, name), "wb") as f:
            f.write(data)
    Image.new("1", (20000, 1)).save(os.path.join(images, "line.png"))
    whole = open(os.path.join(images, "ok.png"), "rb").read()
    open(os.path.join(images, "cut.png"), "wb").write(whole[: len(whole) // 2])
    Image.new("RGB", (8, 8), "blue").save(os.path.join(root, "secret.png"))
    Image.new("I;16", (64, 64), 40000).save(os.path.join(images, "grey16.png"))
    os.symlink(os.path.join(root, "secret.png"), os.path.join(images, "link.png"))

    def rec(image=None, convs=CONV):
        r = {"conversations": convs}
        if image is not None:
            r["image"] = image
        return r

    size = lambda name: os.path.getsize(os.path.join(images, name))  # noqa: E731
    long_answer = [{"from": "human", "value": "What color?"}, {"from": "gpt", "value": " ".join(["red"] * 1000)}]
    return [
        ("PNG declaring 20000x20000 (PIL bomb)", rec("bomb.png"), size("bomb.png")),
        ("PNG declaring 8000x6000 (48 MP)", rec("big.png"), size("big.png")),
        ("PNG 20000x1, image_aspect_ratio pad", rec("line.png"), size("line.png")),
        ("not a PNG", rec("corrupt.png"), size("corrupt.png")),
        ("truncated PNG", rec("cut.png"), size("cut.png")),
        ("missing image", rec("gone.png"), 0),
        ("image ../secret.png", rec("../secret.png"), 0),
        ("image absolute path", rec(os.path.join(root, "secret.png")), 0),
        ("image symlink out of the folder", rec("link.png"), 0),
        ("null turn", rec(convs=[None, CONV[1]]), 0),
        ("non-UTF-8 byte", b'{"conversations": [{"from": "human", "value": "caf\xe9"}]}', 0),
        ("malformed JSON", b'{"conversations": [', 0),
        ("two <image>", rec("ok.png", [{"from": "human", "value": "<image> <image>"}, CONV[1]]), 0),
        ("<image> without an image", rec(convs=CONV), 0),
        ("answer longer than max_length", rec(convs=long_answer), 0),
        # hostile JSON text, paths and lengths (2026-11-30): the time column is the record's whole handling; peak
        # memory is a high-water mark, so the large cases go last, the smaller one first
        ("JSON nested 100,000 deep", b'{"conversations": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 200_019),
        ("lone surrogate escape \\ud800", b'{"conversations": [{"from": "human", "value": "\\ud800"}]}', 0),
        ("key given twice", b'{"id": "a", "id": "b", "conversations": []}', 0),
        ("NUL in the image path", rec("ok.png\x00x"), 0),
        ("16-bit grey PNG", rec("grey16.png"), size("grey16.png")),
        ("20 MB answer (one turn), max_length 512",
         rec(convs=[{"from": "human", "value": "What color?"}, {"from": "gpt", "value": "red " * 5_000_000}]), 20_000_050),
        ("one 65 MiB line", b'{"pad": "' + b"x" * (65 << 20) + b'"}', (65 << 20) + 11),
    ]


def main() -> None:
    print(f"load average: {os.getloadavg()}")
    root = tempfile.mkdtemp(prefix="hostile_")
    cases = build(root)
    texts = ["What color? red green blue <image>"]
    _, processor = build_tiny_llava(train_tiny_tokenizer(texts, vocab_size=300))
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    config = CheckConfig(image_folder=os.path.join(root, "images"))
    print("| input | bytes | training | data_prep | time, peak memory growth (training) |")
    print("|---|---|---|---|---|")
    for i, (kind, line, nbytes) in enumerate(cases):
        path = os.path.join(root, f"case{i}.jsonl")
        ok = json.dumps({"id": "ok", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
        with open(path, "wb") as f:
            f.write((line if isinstance(line, bytes) else json.dumps(dict(line, id="x")).encode()) + b"\n")
            f.write(ok.encode() + b"\n")
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        ds = ConversationDataset(path, processor.tokenizer, "vicuna_v1", 512, image_folder=config.image_folder,
                                 image_processor=processor.image_processor, image_token_id=image_id,
                                 num_image_tokens=17)
        if ds.load_skips:
            training = f"skipped at load: {ds.load_skips[0].detail.split(' at column')[0]}"
        else:
            sample = ds[0]
            if sample["skipped"]:
                training = f"skipped: `{sample['skipped'][0].reason}`"
            else:
                training = "trained" + "".join(f", counted `changed/{n.reason}`" for n in sample["notes"])
        seconds = time.perf_counter() - t0
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        _, rec, err = next(iter_records(path))  # read as data_prep reads it, then judged as it judges
        if err is not None:
            prep = f"dropped: `{read_error_reason(err)}`"
        else:
            dropped = [v.reason for v in check_record(rec, 1, config).issues if v.action == "dropped"]
            prep = f"dropped: `{dropped[0]}`" if dropped else "kept"
        timing = f"{1000 * seconds:.0f} ms, +{grown:.0f} MB peak" if nbytes else ""
        print(f"| {kind} | {nbytes or ''} | {training} | {prep} | {timing} |")
    bad = os.path.join(root, "allbad.jsonl")
    write_records(bad, ({"id": f"b{k}", "conversations": []} for k in range(64)))
    try:
        ConversationDataset(bad, processor.tokenizer, "vicuna_v1", 512)[0]
        outcome = "trained?"
    except NoTrainableRecords as e:
        outcome = f"NoTrainableRecords: {str(e)[:60]}..."
    print(f"| 64 bad records, nothing else | | {outcome} | | |")
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
