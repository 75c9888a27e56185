"""Benchmark S²-Attn against full causal attention and against the paper's pseudo-code done naively on SDPA.

Every number is a forward + backward pass of one attention call (no projections): q/k/v of shape (B, H, N, D),
handed over as the model hands them (transposed views of (B, N, H, D) projection outputs), the gradient taken
with `torch.autograd.grad` against a fixed random (B, N, H, D) output gradient. All cases of all lengths
run in ONE invocation and the ratios are computed inside it: absolute timings on shared machines drift from run
to run, so only ratios measured side by side are worth comparing.

Each (N, case) runs in its own fresh Python process (this script re-invoked with `--worker`), so that the peak
memory of one case is not hidden by the allocator caches, thread pools or high-water mark of another. The
processes of one N stay alive together and the driver steps them round-robin (warm-up round, then `--repeats`
rounds), so that a burst of noise slows every case a little rather than one case a lot.

Peak memory is the growth over the process's footprint once the inputs (q, k, v, output gradient) exist:

- CPU: torch's CPU allocator is plain malloc, invisible to tracemalloc. After the inputs are allocated the worker
  resets the kernel's RSS high-water mark (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0) and reports
  VmHWM after the runs minus the RSS at the reset. Without the reset, VmHWM would still hold the peak
  of importing torch/transformers; if the reset is refused, the JSON says so (`memory_method`).
- CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the inputs.

On CPU each case also reports `tensor_peak_mib`: the peak of the bytes held by torch's allocator during one more
step, run under `torch.profiler` after the RSS peak is read. It counts tensors and ops' scratch buffers only, so the
gap between the two is memory outside torch's tensors (glibc's retained heap, BLAS and OpenMP buffers). Before the
baseline every worker runs one tiny `autograd.grad` with `grad_outputs`, whose first call imports sympy (~35 MiB).

Usage: `.venv/bin/python benchmarks/attention.py [--lengths 4096 8192 16384] [--repeats 3]`; see README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _measure import (
    PeakMemory,
    answer,
    environment,
    finish_workers,
    import_lazy_modules,
    ratio,
    round_robin,
    script_command,
    serve,
    start_workers,
    tensor_peak_mib,
    timing_summary,
)

BATCH, HEADS, HEAD_DIM = 1, 8, 128  # a quarter of one Llama-2-7B attention layer (32 heads of 128)
GROUP_RATIO = 0.25  # G = N/4, the paper's setting
BASE_CASES = ("full", "naive_roll")
S2_SHIFTS = ("segments", "roll")
S2_BACKENDS = ("sdpa", "eager", "flex_attention", "flash_attention_2")  # mirrors s2_attention.S2_BACKENDS
ALL_CASES = BASE_CASES + tuple(f"s2_{shift}_{backend}" for shift in S2_SHIFTS for backend in S2_BACKENDS)
DEFAULT_CASES = ("full", "s2_segments_sdpa", "s2_segments_eager", "s2_roll_sdpa", "naive_roll")
TARGET_S2_OVER_FULL = 0.32  # at 16k; 0.25 is the ideal (G = N/4 does a quarter of the causal work)
TARGET_N = 16384
TARGET_SEGMENTS_OVER_NAIVE = 1.05
TARGET_CASES = ("full", "s2_segments_sdpa", "naive_roll")  # always timed --repeats times


# ----------------------------------------------------------------------------------------------------------
# the attention functions under test; each takes q/k/v (B, H, N, D) and returns (B, N, H, D)


def full_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)  # (B, H, N, D)
    return out.transpose(1, 2)  # same layout as s2_attention's output, so the backward sees the same gradient


def naive_roll(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group_size: int, scaling: float
) -> torch.Tensor:
    """The paper's pseudo-code done the obvious way on SDPA: the baseline the S² implementation must not lose to.

    Roll the second half of the heads by -G/2 along N, cut every row into N/G groups, one causal SDPA call over
    all groups and heads, undo the grouping, roll the second half back by +G/2. N must be a multiple of G."""
    batch, heads, seq_len, dim = query.shape
    half_heads, n_groups = heads // 2, seq_len // group_size

    def shift(x: torch.Tensor, by: int) -> torch.Tensor:  # roll only the shifted (second) half of the heads
        return torch.cat([x[:, : heads - half_heads], x[:, heads - half_heads :].roll(by, dims=2)], dim=1)

    def to_groups(x: torch.Tensor) -> torch.Tensor:  # (B, H, N, D) -> (B * N/G, H, G, D)
        x = x.reshape(batch, heads, n_groups, group_size, dim).transpose(1, 2)
        return x.reshape(batch * n_groups, heads, group_size, dim)

    q, k, v = (to_groups(shift(x, -group_size // 2)) for x in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)  # (B*N/G, H, G, D)
    out = out.reshape(batch, n_groups, heads, group_size, dim).transpose(1, 2).reshape(batch, heads, seq_len, dim)
    return shift(out, group_size // 2).transpose(1, 2)  # (B, N, H, D)


def make_case(case: str, seq_len: int, device: torch.device) -> Callable[..., torch.Tensor]:
    """The function (q, k, v, scaling) -> (B, N, H, D) for `case`. The S² layout is built here, outside the
    timed region: a model builds it once per forward and shares it across all layers."""
    if case == "full":
        return full_causal
    from longlora_hub.remote_code.s2_attention import build_s2_layout, s2_attention, s2_group_size

    group = s2_group_size(seq_len, ratio=GROUP_RATIO)
    if case == "naive_roll":
        return lambda q, k, v, scaling: naive_roll(q, k, v, group, scaling)
    _, shift, backend = case.split("_", 2)
    layout = build_s2_layout(seq_len, BATCH, group, shift=shift, device=device)
    return lambda q, k, v, scaling: s2_attention(q, k, v, layout, scaling, backend=backend)


# ----------------------------------------------------------------------------------------------------------
# worker: one (N, case) in a fresh process


def run_worker(case: str, seq_len: int, device_name: str, dtype_name: str) -> None:
    """Serve one (N, case) over stdin/stdout: "step" runs one forward+backward and answers its time, "done"
    answers the peak memory and exits. Protocol lines are JSON; anything else goes to stderr."""
    device, dtype = torch.device(device_name), getattr(torch, dtype_name)
    cuda = device.type == "cuda"
    fn = make_case(case, seq_len, device)  # imports transformers for S² cases: before the memory baseline
    import_lazy_modules()  # the first autograd.grad's sympy import, likewise: the same for every case
    generator = torch.Generator(device="cpu").manual_seed(0)
    # the model's layout: a projection gives (B, N, H, D) contiguous memory and attention gets (B, H, N, D) views
    # of it, so the leaves (and their gradients) are (B, N, H, D) and every case is handed transposed views
    shape = (BATCH, seq_len, HEADS, HEAD_DIM)
    query, key, value = (
        torch.randn(shape, generator=generator, dtype=dtype).to(device).requires_grad_() for _ in range(3)
    )
    grad_out = torch.randn(shape, generator=generator, dtype=dtype).to(device)  # (B, N, H, D) like the output
    scaling = HEAD_DIM**-0.5

    def step() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scaling)  # (B, N, H, D)
        # autograd.grad instead of backward(): no .grad accumulation, so every step does identical work
        torch.autograd.grad(out, (query, key, value), grad_out)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    memory = PeakMemory(device, "after inputs")
    serve(lambda: {"time_s": step()})
    final = {"peak_mem_mib": memory.peak_mib(), "memory_method": memory.method, "threads": torch.get_num_threads()}
    if not cuda:  # one more step, profiled, after the RSS peak is read (on CUDA the peak is the allocator's already)
        final["tensor_peak_mib"] = tensor_peak_mib(step, device)
    answer(final)


# ----------------------------------------------------------------------------------------------------------
# driver


def check_naive_roll() -> dict:
    """Small CPU fp32 check that the naive baseline computes what the paper and `s2_attention(roll)` compute, so
    the speed comparison is between equal results."""
    from longlora_hub.remote_code.s2_attention import build_s2_layout, s2_attention
    from longlora_hub.testing import paper_roll_s2

    generator = torch.Generator().manual_seed(1)
    seq_len, group, scaling = 64, 16, 8**-0.5
    q, k, v = (torch.randn(2, 4, seq_len, 8, generator=generator) for _ in range(3))
    naive = naive_roll(q, k, v, group, scaling)
    paper = paper_roll_s2(q, k, v, group, scaling)
    s2_roll = s2_attention(q, k, v, build_s2_layout(seq_len, 2, group, shift="roll"), scaling)
    errors = {
        "naive_roll_vs_paper_roll_s2": (naive - paper).abs().max().item(),
        "naive_roll_vs_s2_roll": (naive - s2_roll).abs().max().item(),
    }
    return {
        "max_abs_err": errors,
        "ok": all(err < 1e-5 for err in errors.values()),
    }


def worker_command(case: str, seq_len: int, args: argparse.Namespace) -> list[str]:
    """This script as the worker of one (N, case)."""
    command = script_command(__file__, "--worker", case, "--lengths", str(seq_len))
    return command + ["--device", args.device, "--dtype", args.dtype]


def measure_length(seq_len: int, args: argparse.Namespace) -> tuple[dict, set[str]]:
    """All cases of one N, interleaved: round 0 warms every case up, then each round steps every case once.
    Noise from the machine (other jobs, frequency changes) then lands on all cases alike instead of on
    whichever case happened to run during it, which is what keeps the ratios meaningful."""
    workers = start_workers({case: worker_command(case, seq_len, args) for case in args.cases})
    warmup: dict[str, float] = {}
    times: dict[str, list[float]] = {case: [] for case in workers}
    allowed: dict[str, int] = {}
    for round_index in range(args.repeats + 1):
        for case in round_robin(list(workers), round_index):
            if round_index > allowed.get(case, args.repeats):
                continue
            print(f"[bench] N={seq_len} round {round_index} {case}", file=sys.stderr, flush=True)
            timing = workers[case].step()
            if timing is None:
                allowed[case] = -1
                continue
            elapsed = timing["time_s"]
            if round_index == 0:
                warmup[case] = elapsed
                slow = elapsed > args.slow_s and case not in TARGET_CASES
                allowed[case] = min(args.repeats, args.slow_repeats) if slow else args.repeats
            else:
                times[case].append(elapsed)
            time.sleep(args.pause_s)  # let this worker's OpenMP threads stop spinning before the next one runs
    finals, methods = finish_workers(workers)
    cases = {}
    for case, worker in workers.items():
        memory = finals[case]
        memory.pop("threads", None)  # the same in every worker: reported once, in "environment"
        if worker.error or not times[case]:
            cases[case] = {"error": worker.error or "no timing"}
            continue
        cases[case] = {
            **timing_summary(times[case], 4),
            "warmup_s": round(warmup[case], 4),
            "repeats": len(times[case]),
            **memory,
        }
        if len(times[case]) < args.repeats:
            cases[case]["note"] = (
                f"timed {len(times[case])}x instead of {args.repeats}x to keep the run short: "
                f"its warm-up took {warmup[case]:.1f}s > --slow-s {args.slow_s}"
            )
    return cases, methods


def targets(results: dict) -> dict:
    lengths = sorted(int(n) for n in results)
    at = TARGET_N if TARGET_N in lengths else lengths[-1]  # --lengths may leave out 16k: judge the longest then
    s2_full = results[str(at)]["ratios"].get("s2_sdpa/full")
    per_n = {str(n): results[str(n)]["ratios"].get("segments_sdpa/naive_roll") for n in lengths}
    measured = [value for value in per_n.values() if value is not None]
    memory = results[str(at)]["ratios"].get("mem_s2_sdpa/full")
    return {
        "s2_sdpa/full": {
            "target": f"<= {TARGET_S2_OVER_FULL} at N={TARGET_N} (ideal 0.25)",
            "judged_at_n": at,
            "value": s2_full,
            "met": None if s2_full is None else s2_full <= TARGET_S2_OVER_FULL,
        },
        "segments_sdpa/naive_roll": {
            "target": f"<= {TARGET_SEGMENTS_OVER_NAIVE} at every N",
            "value_per_n": per_n,
            "met": None if not measured else all(value <= TARGET_SEGMENTS_OVER_NAIVE for value in measured),
        },
        "mem_s2_sdpa/full": {
            "target": f"< 1 at N={TARGET_N}: S²'s peak memory below full attention's (RSS; see README.md for why "
            "the tensor floor both share makes this unreachable on CPU)",
            "judged_at_n": at,
            "value": memory,
            "tensor_value": results[str(at)]["ratios"].get("tensor_mem_s2_sdpa/full"),
            "met": None if memory is None else memory < 1,
        },
    }


def run_driver(args: argparse.Namespace) -> dict:
    from longlora_hub.remote_code.s2_attention import s2_group_size

    started = time.perf_counter()
    if args.malloc_mmap_threshold is not None:  # inherited by every worker alike, before any of them starts
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    report = {
        "environment": environment(args.device, args.dtype, cpu_capability=True),
        "config": {
            "batch": BATCH,
            "heads": HEADS,
            "head_dim": HEAD_DIM,
            "group_size": f"N * {GROUP_RATIO} (s2_group_size)",
            "lengths": args.lengths,
            "cases": args.cases,
            "repeats": args.repeats,
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default (dynamic)"),
            "timing": "median of forward+backward (torch.autograd.grad) after one warm-up; each (N, case) in its "
            "own fresh process, cases stepped round-robin so that machine noise hits them alike; q/k/v "
            "(B, H, N, D) views of (B, N, H, D) tensors, as the model's projections give them; S² layout built "
            "outside the timed region",
        },
        "checks": check_naive_roll(),
        "results": {},
    }
    methods: set[str] = set()
    for seq_len in args.lengths:
        cases, length_methods = measure_length(seq_len, args)
        methods |= length_methods
        full = cases.get("full")
        ratios = {
            "s2_sdpa/full": ratio(cases.get("s2_segments_sdpa"), full),
            "s2_eager/full": ratio(cases.get("s2_segments_eager"), full),
            "segments_sdpa/naive_roll": ratio(cases.get("s2_segments_sdpa"), cases.get("naive_roll")),
            "roll_sdpa/naive_roll": ratio(cases.get("s2_roll_sdpa"), cases.get("naive_roll")),
            "mem_s2_sdpa/full": ratio(cases.get("s2_segments_sdpa"), full, "peak_mem_mib"),
            "mem_s2_eager/full": ratio(cases.get("s2_segments_eager"), full, "peak_mem_mib"),
            "tensor_mem_s2_sdpa/full": ratio(cases.get("s2_segments_sdpa"), full, "tensor_peak_mib"),
            "tensor_mem_s2_eager/full": ratio(cases.get("s2_segments_eager"), full, "tensor_peak_mib"),
        }
        for case in cases:  # the other cases against full too, e.g. the GPU-only backends when asked for
            if case not in ("full", "s2_segments_sdpa", "s2_segments_eager"):
                ratios[f"{case}/full"] = ratio(cases[case], full)
        report["results"][str(seq_len)] = {
            "group_size": s2_group_size(seq_len, ratio=GROUP_RATIO),
            "cases": cases,
            "ratios": {name: value for name, value in ratios.items() if value is not None},
        }
    report["config"]["memory"] = "peak growth over the inputs: " + "; ".join(sorted(methods))
    if not args.device.startswith("cuda"):
        report["config"]["tensor_memory"] = (
            "tensor_peak_mib: peak growth of the bytes held by torch's allocator in one extra step, replayed from "
            "torch.profiler's memory events (tensors and ops' scratch buffers; not glibc's retained heap, BLAS or "
            "OpenMP memory)"
        )
    report["targets"] = targets(report["results"])
    report["total_wall_s"] = round(time.perf_counter() - started, 1)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384], help="sequence lengths N")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median reported)")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=list(DEFAULT_CASES),
        choices=ALL_CASES,
        help="cases to run; s2_<shift>_<backend>, e.g. s2_segments_flash_attention_2 on a GPU",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--slow-s",
        type=float,
        default=20.0,
        help="a case whose warm-up takes longer is timed --slow-repeats times (never full, s2_segments_sdpa, "
        "naive_roll: the targets need them)",
    )
    parser.add_argument("--slow-repeats", type=int, default=1)
    parser.add_argument("--pause-s", type=float, default=0.1, help="idle time between two timed steps")
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        metavar="BYTES",
        help="set MALLOC_MMAP_THRESHOLD_ for every worker (a fixed glibc mmap threshold: freed blocks above it go "
        "back to the OS), to see RSS without the heap glibc keeps; default: glibc's dynamic threshold",
    )
    parser.add_argument("--worker", choices=ALL_CASES, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.lengths[0], args.device, args.dtype)
        return
    print(json.dumps(run_driver(args), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
