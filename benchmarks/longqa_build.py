"""Benchmark the LongQA builder on a LongAlpaca-sized input: throughput, wall time and peak memory.

It writes a synthetic LongAlpaca-format file into a temporary folder (12k rows and ~500 MB by default, like
LongAlpaca-12k: three quarters long rows, questions, summaries and reviews over ~55 KB papers with several
questions per paper, one quarter short Alpaca-style rows), builds it streamed with `build_longqa` (tokenizer,
length filter, exact + MinHash dedupe, split, parquet, card) in a fresh process, prints one JSON object on stdout,
and deletes everything it wrote. Progress goes to stderr.

    .venv/bin/python benchmarks/longqa_build.py                    # full size (12000 rows, 500 MB)
    .venv/bin/python benchmarks/longqa_build.py --rows 1200 --size-mb 50

The build runs in its own process so that its peak RSS (`ru_maxrss`, including its `num_proc` workers) is not
the generator's. Tokens are those of the tiny byte-level BPE tokenizer of `longlora_hub.testing` (vocabulary 384,
built in code: no download); a real Llama tokenizer makes fewer, longer tokens, so tokens/s is not comparable
across tokenizers, while rows/s and MB/s mostly are.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_WALL_S = 600
TARGET_RSS_GIB = 4.0
LONG_FRACTION = 0.75  # LongAlpaca-12k: ~9k long rows, ~3k short ones
QUESTIONS_PER_PAPER = 3


def _vocabulary(rng: random.Random, size: int = 20_000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(size)]


def write_input(path: Path, rows: int, size_mb: float, seed: int = 0, array: bool = False) -> dict:
    """Write a LongAlpaca-format file of `rows` rows and about `size_mb` MB, JSON Lines or (`array`) one JSON
    array like the published LongAlpaca-12k.json; return what was written."""
    rng = random.Random(seed)
    words = _vocabulary(rng)
    num_long = round(rows * LONG_FRACTION)
    num_short = rows - num_long
    # the long rows carry almost all the bytes; each paper is shared by QUESTIONS_PER_PAPER rows, as in LongAlpaca
    paper_chars = max(200, int(size_mb * 1e6 / max(1, num_long)))
    num_papers = max(1, -(-num_long // QUESTIONS_PER_PAPER))
    kinds = ("What is the main finding of the paper?", "Please summarize the paper.", "Please write a review.")
    written = 0
    separator = ",\n" if array else "\n"
    first = True

    def put(record: dict) -> None:
        nonlocal first
        file.write(("[\n" if first and array else "" if first else separator) + json.dumps(record))
        first = False

    with open(path, "w", encoding="utf-8") as file:
        for paper_index in range(num_papers):
            paper = []
            length = 0
            while length < paper_chars:
                sentence = " ".join(rng.choices(words, k=rng.randint(8, 20))).capitalize() + "."
                paper.append(sentence)
                length += len(sentence) + 1
            paper_text = " ".join(paper)
            for question_index in range(QUESTIONS_PER_PAPER):
                if written >= num_long:
                    break
                question = f"{kinds[question_index % len(kinds)]} (paper {paper_index})"
                instruction = (
                    "Below is a paper. Memorize the paper and answer my question after the paper.\n The paper begins. "
                    f"\n{paper_text}\n Now the paper ends. \n{question}"
                )
                answer = " ".join(rng.choices(words, k=rng.randint(40, 200))) + "."
                put({"instruction": instruction, "output": answer})
                written += 1
        for index in range(num_short):
            instruction = " ".join(rng.choices(words, k=rng.randint(5, 30))) + f"? ({index})"
            answer = " ".join(rng.choices(words, k=rng.randint(5, 80))) + "."
            put({"instruction": instruction, "input": "", "output": answer})
        file.write("\n]\n" if array else "\n")
    return {"rows": rows, "long_rows": num_long, "short_rows": num_short, "bytes": path.stat().st_size}


def worker(args: argparse.Namespace) -> None:
    """Build `args.input` and print the timings and this process's peak RSS as JSON (run in a fresh process)."""
    from longlora_hub.longqa import LongQAConfig, build_longqa
    from longlora_hub.testing import build_tiny_tokenizer

    tokenizer_dir = Path(args.work) / "tokenizer"
    build_tiny_tokenizer().save_pretrained(tokenizer_dir)
    config = LongQAConfig(
        output=str(Path(args.work) / "out"),
        longalpaca=[args.input],
        tokenizer=str(tokenizer_dir),
        max_length=args.max_length,
        num_proc=args.num_proc,
        on_error="skip",
    )
    start = time.perf_counter()
    result = build_longqa(config, echo=lambda line: print(line, file=sys.stderr, flush=True))
    wall = time.perf_counter() - start
    stats = result.stats
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    output_bytes = sum(p.stat().st_size for p in Path(config.output).rglob("*") if p.is_file())
    print(
        json.dumps(
            {
                "wall_s": wall,
                "timings": result.timings,
                "kept_rows": stats["rows"]["all"]["rows"],
                "kept_tokens": stats["rows"]["all"]["tokens"],
                "dropped": stats["dropped"],
                "peak_rss_kib": own,
                "peak_rss_workers_kib": children,
                "output_bytes": output_bytes,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=12_000, help="input rows (LongAlpaca-12k: 12000)")
    parser.add_argument("--size-mb", type=float, default=500, help="input size in MB (LongAlpaca-12k: ~500)")
    parser.add_argument(
        "--max-length",
        type=int,
        default=131072,
        help="length filter in tokens; the tiny tokenizer makes ~1 token per 1.1 characters of this random text, so "
        "16384 (LongAlpaca-16k-length) would drop every long row and leave the writing unmeasured",
    )
    parser.add_argument("--format", choices=("jsonl", "json"), default="jsonl", help="JSON Lines or one JSON array")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1, help="token-counting workers")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (path printed on stderr)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    work = Path(tempfile.mkdtemp(prefix="longqa-bench-"))
    try:
        print(f"[bench] writing {args.rows} rows, ~{args.size_mb:g} MB into {work}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        source = work / f"longalpaca.{args.format}"
        written = write_input(source, args.rows, args.size_mb, array=args.format == "json")
        generate_s = time.perf_counter() - start
        command = [sys.executable, __file__, "--worker", "--input", str(source), "--work", str(work)]
        command += ["--max-length", str(args.max_length), "--num-proc", str(args.num_proc)]
        start = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        process_s = time.perf_counter() - start  # includes interpreter start and imports
        build = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        if args.keep:
            print(f"[bench] kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    wall = build["wall_s"]
    peak_gib = max(build["peak_rss_kib"], build["peak_rss_workers_kib"]) / 2**20
    counted_tokens = build["kept_tokens"]  # tokens of the kept rows; dropped rows were counted too
    result = {
        "input": {**written, "mb": round(written["bytes"] / 1e6, 1), "format": args.format},
        "config": {
            "tokenizer": "longlora_hub.testing.build_tiny_tokenizer (byte-level BPE, vocab 384)",
            "max_length": args.max_length,
            "num_proc": args.num_proc,
            "dedupe": "exact + MinHash (64 perms x 2, 5-word shingles)",
        },
        "generate_input_s": round(generate_s, 1),
        "build_wall_s": round(wall, 1),
        "build_process_s": round(process_s, 1),
        "stages_s": {name: round(value, 1) for name, value in build["timings"].items()},
        "rows_per_s": round(written["rows"] / wall, 1),
        "mb_per_s": round(written["bytes"] / 1e6 / wall, 2),
        "kept_rows": build["kept_rows"],
        "kept_tokens": counted_tokens,
        "kept_tokens_per_s": round(counted_tokens / wall),
        "dropped": build["dropped"],
        "peak_rss_gib": round(build["peak_rss_kib"] / 2**20, 2),
        "peak_rss_workers_gib": round(build["peak_rss_workers_kib"] / 2**20, 2),
        "output_mb": round(build["output_bytes"] / 1e6, 1),
        "targets": {
            "wall_s": TARGET_WALL_S,
            "rss_gib": TARGET_RSS_GIB,
            "wall_ok": wall < TARGET_WALL_S,
            "rss_ok": peak_gib < TARGET_RSS_GIB,
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    full_mb = 500
    if written["bytes"] / 1e6 < 0.9 * full_mb:
        # labelled as an estimate: the build is linear in the input bytes (tokenizing and hashing dominate)
        result["extrapolated_to_500_mb"] = {
            "wall_s": round(wall * full_mb / (written["bytes"] / 1e6)),
            "method": "linear in input MB from this run's MB/s; an estimate, not a measurement",
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
