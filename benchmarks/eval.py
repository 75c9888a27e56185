"""Benchmark `longlora-hub eval ppl`: evaluation throughput, and the peak memory of the chunked loss against the naive
one that builds all N x vocab logits.

The model is a small LlamaLongLoRA built in code with random weights (no download): 2 layers, hidden 256, 4 heads of
64, intermediate 688, vocab 32000, Position Interpolation (linear RoPE, factor 4) from 4096 to 16384 positions,
sdpa attention, fp32 on CPU by default. The data is random token ids. Evaluation is what `eval ppl` runs
(`evaluate_perplexity`: model.eval(), full attention, the `longlora` protocol), batch 1.

Cases, each in its own fresh Python process (this script re-invoked with `--worker`), one after the other:

- `speed@N` for every `--lengths` N: one warm-up window, then `--windows` windows `--stride` tokens apart, timed;
  `tokens_per_s` counts the tokens the model reads (windows x N) per second of evaluation.
- `memory_chunked@M` and `memory_naive@M` at `--memory-length` M: one window with the LM head and cross-entropy on
  `--chunk-size` positions at a time, against all positions at once. Peak memory is the growth over the process's
  footprint once the model and the data exist: the worker resets the kernel's RSS high-water mark
  (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0) and reports VmHWM after the window minus the RSS at the
  reset (CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus what is allocated).

Target: the chunked loss's peak at most a quarter of the naive one's at 16k with a 32k vocabulary.

Usage: `.venv/bin/python benchmarks/eval.py [--lengths 4096 16384] [--windows 2]`. Prints one JSON object; progress
goes to stderr. The default run takes about 2-4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from _measure import PeakMemory, environment, run_json_process, script_command

TARGET_MEMORY_RATIO = 0.25
PRETRAINING_CONTEXT = 4096


def build_model(args: argparse.Namespace):
    import torch

    from longlora_hub.remote_code.configuration_llama_longlora import LlamaLongLoRAConfig
    from longlora_hub.remote_code.modeling_llama_longlora import LlamaLongLoRAForCausalLM

    context = max(PRETRAINING_CONTEXT, *args.lengths, args.memory_length)
    config = LlamaLongLoRAConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=context,
        rope_parameters={"rope_type": "linear", "factor": context / PRETRAINING_CONTEXT, "rope_theta": 10000.0},
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaLongLoRAForCausalLM(config).to(device=args.device, dtype=getattr(torch, args.dtype))
    model.set_attn_implementation("sdpa")
    return model.eval()


def random_tokens(count: int, vocab: int):
    import numpy as np

    return np.random.default_rng(0).integers(3, vocab, size=count, dtype=np.int64)


def run_worker(args: argparse.Namespace) -> dict:
    """One case in this (fresh) process; returns its JSON."""
    from longlora_hub.evaluation.perplexity import evaluate_perplexity

    model = build_model(args)
    kind, length = args.worker.split("@")
    length = int(length)
    evaluate = dict(stride=args.stride, protocol="longlora", device=args.device, progress=False)
    if kind == "speed":
        # range(0, n - N, stride) has exactly `windows` starts for n = N + (windows - 1) * stride + 1
        tokens = random_tokens(length + (args.windows - 1) * args.stride + 1, args.vocab)
        warmup = evaluate_perplexity(model, tokens[: length + 1], length, chunk_size=args.chunk_size, **evaluate)
        result = evaluate_perplexity(model, tokens, length, chunk_size=args.chunk_size, **evaluate)
        return {
            "tokens_per_s": result["tokens_per_s"],
            "windows": result["windows"],
            "elapsed_s": result["elapsed_s"],
            "warmup_s": warmup["elapsed_s"],
            "perplexity": round(result["perplexity"], 2),
        }
    chunk_size = args.chunk_size if kind == "memory_chunked" else None
    tokens = random_tokens(length + 1, args.vocab)  # one window
    memory = PeakMemory(args.device, "after model and data")
    result = evaluate_perplexity(model, tokens, length, chunk_size=chunk_size, **evaluate)
    return {
        "peak_mem_mib": memory.peak_mib(),
        "chunk_size": chunk_size,
        "elapsed_s": result["elapsed_s"],
        "loss": round(result["loss"], 5),
        "memory_method": memory.method,
    }


def run_case(case: str, args: argparse.Namespace) -> dict:
    print(f"[bench] {case}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    result = run_json_process(script_command(__file__, "--worker", case, *args.passthrough))
    if "error" in result:
        return result
    return {**result, "process_s": round(time.perf_counter() - started, 1)}


def run_driver(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    memory_length = args.memory_length
    cases = {f"speed@{n}": run_case(f"speed@{n}", args) for n in args.lengths}
    for kind in ("memory_chunked", "memory_naive"):
        cases[f"{kind}@{memory_length}"] = run_case(f"{kind}@{memory_length}", args)
    chunked = cases[f"memory_chunked@{memory_length}"].get("peak_mem_mib")
    naive = cases[f"memory_naive@{memory_length}"].get("peak_mem_mib")
    ratio = round(chunked / naive, 3) if chunked is not None and naive else None
    methods = {case.pop("memory_method") for case in cases.values() if "memory_method" in case}
    logits_gib = memory_length * args.vocab * 4 / 2**30
    return {
        "environment": environment(args.device, args.dtype, gpu=False),
        "config": {
            "model": f"LlamaLongLoRA, {args.layers} layers, hidden {args.hidden}, {args.hidden // 64} heads of 64, "
            f"intermediate {args.intermediate}, vocab {args.vocab}, linear PI from {PRETRAINING_CONTEXT}, sdpa, random "
            "weights",
            "protocol": "longlora",
            "stride": args.stride,
            "windows": args.windows,
            "batch_size": 1,
            "chunk_size": args.chunk_size,
            "memory_length": memory_length,
            "naive_logits_gib": round(logits_gib, 2),
            "memory": "peak growth over model + data: " + "; ".join(sorted(methods)),
        },
        "results": cases,
        "ratios": {"mem_chunked/naive": ratio},
        "targets": {
            "mem_chunked/naive": {
                "target": f"<= {TARGET_MEMORY_RATIO} at N={memory_length}, vocab {args.vocab}",
                "value": ratio,
                "met": None if ratio is None else ratio <= TARGET_MEMORY_RATIO,
            }
        },
        "total_wall_s": round(time.perf_counter() - started, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384], help="lengths timed (speed cases)")
    parser.add_argument("--windows", type=int, default=2, help="timed windows per length, after one warm-up window")
    parser.add_argument("--stride", type=int, default=256, help="tokens between window starts")
    parser.add_argument("--memory-length", type=int, default=16384, help="length of the chunked vs naive memory cases")
    parser.add_argument("--chunk-size", type=int, default=1024, help="positions per LM-head chunk")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (heads of 64)")
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    args = parser.parse_args(argv)
    if args.windows < 1:
        parser.error("--windows must be >= 1")
    # everything but --worker, so that each worker rebuilds the same model
    raw = sys.argv[1:] if argv is None else argv
    args.passthrough = [item for item in raw if item != "--worker" and item != args.worker]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)), flush=True)
        return
    print(json.dumps(run_driver(args), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
