"""Benchmark one whole training step of a LlamaLongLoRA model: S²-Attn against full attention, `longlora` against full
fine-tuning.

One step is what a trainer does per batch: forward with labels (so the loss, over the LM head's N x vocab logits,
is included), `loss.backward()`, `AdamW.step()` and `zero_grad()`. Four cases run in ONE invocation and the ratios
are computed inside it (absolute timings on shared machines drift from run to run, ratios taken side by side do
not):

| case                      | attention                   | trainable                                       |
|---------------------------|-----------------------------|-------------------------------------------------|
| `s2+longlora`             | S² (`s2_attention=True`)    | `longlora`: LoRA r=8 on q,k,v,o + embed + norms |
| `full_attention+longlora` | full (`s2_attention=False`) | `longlora`                                      |
| `s2+full`                 | S²                          | every parameter                                 |
| `full_attention+full`     | full                        | every parameter                                 |

The default is a small Llama-shaped model on CPU in fp32 (2 layers, hidden 512, 8 heads of 64, intermediate 1376,
vocab 32000, random weights) at N=16384, batch 1. `--preset 7b-layers` gives Llama-2-7B-shaped layers (hidden 4096,
32 heads, intermediate 11008; `--layers` of them) for a GPU, e.g. at 32k in bf16.

As in `attention.py`, each case runs in its own fresh process (this script re-invoked with `--worker`), the
processes stay alive together and the driver steps them round-robin (a warm-up round, then `--repeats` rounds in
a rotating order), so that a burst of machine noise slows every case a little rather than one case a lot.

Peak memory is the growth over the process's footprint once the model (with its PEFT wrapper), the optimizer and
the inputs exist, so it counts what training adds: activations, logits, gradients and the AdamW states (created
by the first step):

- CPU: after that point the worker resets the kernel's RSS high-water mark (`echo 5 > /proc/self/clear_refs`,
  Linux >= 4.0) and reports VmHWM after its steps minus the RSS at the reset.
- CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus what is allocated at that
  point. Each worker empties its cache after every step (outside the timed region), so that the idle workers do
  not hold the memory the stepping one needs.

Usage: `.venv/bin/python benchmarks/train_step.py [--length 16384] [--repeats 3]`; see README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from _measure import (
    PeakMemory,
    answer,
    environment,
    finish_workers,
    ratio,
    round_robin,
    script_command,
    serve,
    start_workers,
    timing_summary,
)

BATCH, VOCAB = 1, 32000
PRESETS = {
    # a small Llama: what 2 CPU cores can train at 16k in minutes
    "small": {"hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 1376, "layers": 2},
    # Llama-2-7B's layer shape (32 heads of 128); the full model has 32 such layers
    "7b-layers": {"hidden_size": 4096, "num_attention_heads": 32, "intermediate_size": 11008, "layers": 4},
}
ATTENTIONS = ("s2", "full_attention")
TRAINABLES = ("longlora", "full")
CASES = tuple(f"{attention}+{trainable}" for trainable in TRAINABLES for attention in ATTENTIONS)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2")
GROUP_RATIO = 0.25  # LlamaLongLoRAConfig's default s2_group_size_ratio, the paper's G = N/4
TARGET_N = 16384
TARGET_S2_OVER_FULL_ATTENTION = 0.6  # step time, per trainable mode
TARGET_LORA_PLUS_OVER_FULL_MEM = 0.7  # peak memory, with S²
LEARNING_RATE = 1e-5


# ----------------------------------------------------------------------------------------------------------
# the model of one case


def model_shape(args: argparse.Namespace) -> dict:
    shape = dict(PRESETS[args.preset])
    if args.layers is not None:
        shape["layers"] = args.layers
    shape["head_dim"] = shape["hidden_size"] // shape["num_attention_heads"]
    return shape


def build_model(case: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A randomly initialised LlamaLongLoRAForCausalLM for `case` (the same weights in every case), wrapped by
    PEFT for `longlora`, in training mode."""
    from longlora_hub.remote_code.configuration_llama_longlora import LlamaLongLoRAConfig
    from longlora_hub.remote_code.modeling_llama_longlora import LlamaLongLoRAForCausalLM
    from longlora_hub.trainable import lora_config

    attention, trainable = case.split("+")
    shape = model_shape(args)
    config = LlamaLongLoRAConfig(
        vocab_size=VOCAB,
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=max(args.length, 4096),
        use_cache=False,
        s2_attention=attention == "s2",
        s2_group_size_ratio=GROUP_RATIO,
        attn_implementation=args.attn,
    )
    torch.manual_seed(0)
    with device:  # initialise on the device: a 7B-shaped stack in fp32 on the host would be slow and large
        model = LlamaLongLoRAForCausalLM(config)
    model.to(dtype=dtype)
    if args.loss == "fused":
        # what TRL's SFTTrainer does to every model it trains: the LM head runs in tiles over the positions that
        # have a label, so the N x vocab logits never exist (added before PEFT wraps the model, as TRL does)
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    peft_config = lora_config(trainable)
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    model.to(device)  # the LoRA weights and the copies of embed_tokens / norms
    return model.train()


# ----------------------------------------------------------------------------------------------------------
# worker: one case in a fresh process


def run_worker(case: str, args: argparse.Namespace) -> None:
    """Serve one case over stdin/stdout: "step" runs one training step and answers its timings, "done" answers
    the peak memory and exits. Protocol lines are JSON; anything else goes to stderr."""
    from longlora_hub.trainable import count_parameters

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    started = time.perf_counter()
    model = build_model(case, args, device, dtype)
    trainable, total = count_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    generator = torch.Generator(device="cpu").manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (BATCH, args.length), generator=generator).to(device)
    build_s = time.perf_counter() - started

    def step() -> dict:
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        if args.loss == "fused":
            outputs = model(input_ids=input_ids, labels=input_ids, fused_lm_head=True)
            loss = -outputs.log_probs.sum() / outputs.label_mask.sum().clamp(min=1)  # SFTTrainer's loss
            del outputs
        else:
            loss = model(input_ids=input_ids, labels=input_ids).loss
        sync()
        forward_end = time.perf_counter()
        loss.backward()
        sync()
        backward_end = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        end = time.perf_counter()
        timings = {
            "time_s": end - start,
            "cpu_s": time.process_time() - cpu_start,
            "forward_s": forward_end - start,
            "backward_s": backward_end - forward_end,
            "optimizer_s": end - backward_end,
            "loss": loss.item(),
        }
        del loss
        if cuda:
            torch.cuda.empty_cache()  # hand the step's memory back for the next worker
        return timings

    memory = PeakMemory(device, "once model, optimizer and inputs exist", peaks="import and build peaks")
    serve(step, trainable_params=trainable, total_params=total, build_s=round(build_s, 1))
    answer({"peak_mem_mib": memory.peak_mib(), "memory_method": memory.method})


# ----------------------------------------------------------------------------------------------------------
# driver


def worker_command(case: str, args: argparse.Namespace) -> list[str]:
    """This script as the worker of one case, building the same model as every other case."""
    command = script_command(__file__, "--worker", case, "--length", str(args.length))
    command += ["--device", args.device, "--dtype", args.dtype, "--preset", args.preset, "--attn", args.attn]
    command += ["--loss", args.loss]
    if args.layers is not None:
        command += ["--layers", str(args.layers)]
    return command


def plan_steps(estimate: dict[str, float], remaining: dict[str, int], seconds_left: float) -> dict[str, int]:
    """How many more timed steps each case gets: `remaining` if they fit in `seconds_left` (a step costing
    `estimate`), else one fewer for the case with the most steps left (the slowest among equals) at a time."""
    planned = dict(remaining)
    while sum(planned[case] * estimate[case] for case in planned) > seconds_left:
        cuttable = [case for case in planned if planned[case] > 0]
        if not cuttable:
            break
        slowest = max(cuttable, key=lambda case: (planned[case], estimate[case]))
        planned[slowest] -= 1
    return planned


def measure(args: argparse.Namespace, started: float) -> tuple[dict, set[str]]:
    """All cases, interleaved: round 0 warms every case up (and creates the AdamW states), then each round steps
    every case once, in a rotating order. From the second timed round on, the steps still to come are fitted
    into --budget-s, each priced at the case's latest timed step."""
    workers = start_workers({case: worker_command(case, args) for case in args.cases})
    warmup: dict[str, dict] = {}
    steps: dict[str, list[dict]] = {case: [] for case in workers}
    limit = dict.fromkeys(workers, args.repeats)  # timed steps a case may still reach; only ever lowered
    for round_index in range(args.repeats + 1):
        if round_index > 1:  # the first timed round runs in full: every case needs one timed step
            live = [case for case in workers if steps[case] and not workers[case].error]
            planned = plan_steps(
                {case: steps[case][-1]["time_s"] for case in live},
                {case: limit[case] - len(steps[case]) for case in live},
                args.budget_s - (time.perf_counter() - started),
            )
            limit.update({case: len(steps[case]) + planned[case] for case in live})
        for case in round_robin(list(workers), round_index):
            if workers[case].error or (round_index > 0 and (case not in warmup or len(steps[case]) >= limit[case])):
                continue
            print(f"[bench] N={args.length} round {round_index} {case}", file=sys.stderr, flush=True)
            timings = workers[case].step()
            if timings is None:
                continue
            if round_index == 0:
                warmup[case] = timings
            else:
                steps[case].append(timings)
            time.sleep(args.pause_s)  # let this worker's OpenMP threads stop spinning before the next one runs
    finals, methods = finish_workers(workers)
    cases = {}
    for case, worker in workers.items():
        memory = finals[case]
        if worker.error or not steps[case]:
            cases[case] = {"error": worker.error or "no timing"}
            continue
        times = [timings["time_s"] for timings in steps[case]]
        result = {**timing_summary(times, 2), "repeats": len(times)}
        phases = ("forward_s", "backward_s", "optimizer_s") + (("cpu_s",) if args.device == "cpu" else ())
        for phase in phases:
            result[phase] = round(statistics.median(timings[phase] for timings in steps[case]), 2)
        result["warmup_s"] = round(warmup[case]["time_s"], 2)
        result.update(memory)
        result["trainable_params"] = worker.info.get("trainable_params")
        result["total_params"] = worker.info.get("total_params")
        result["loss"] = round(steps[case][-1]["loss"], 4)
        if len(times) < args.repeats:
            result["note"] = (
                f"timed {len(times)}x instead of {args.repeats}x to keep the run within --budget-s {args.budget_s:g}"
            )
        cases[case] = result
    return cases, methods


def forward_gflop(args: argparse.Namespace, group_size: int) -> dict:
    """Multiply-add work of one forward pass (2 flops per multiply-add), to see what the time goes to. The
    backward costs about twice this for trained weights, once for frozen ones (only the input gradient)."""
    shape = model_shape(args)
    n, hidden, layers = args.length, shape["hidden_size"], shape["layers"]
    linear_params = 4 * hidden * hidden + 3 * hidden * shape["intermediate_size"]  # q, k, v, o + gate, up, down
    # causal: about n^2/2 query-key pairs, each a q.k and a p.v product of width `hidden` (all heads)
    full_pairs = n * (n + 1) / 2
    s2_pairs = (n // group_size) * group_size * (group_size + 1) / 2  # n/G causal groups of G tokens
    return {
        "lm_head": round(2 * n * hidden * VOCAB / 1e9, 1),
        "layer_projections_and_mlp": round(2 * n * layers * linear_params / 1e9, 1),
        "attention_full_attention": round(4 * full_pairs * hidden * layers / 1e9, 1),
        "attention_s2": round(4 * s2_pairs * hidden * layers / 1e9, 1),
    }


def targets(ratios: dict, seq_len: int) -> dict:
    """Each target with its measured value and `met` (None when a case it needs failed)."""
    result = {}
    for mode in TRAINABLES:
        value = ratios.get(f"time_s2/full_attention@{mode}")
        result[f"time_s2/full_attention@{mode}"] = {
            "target": f"<= {TARGET_S2_OVER_FULL_ATTENTION} at N={TARGET_N} (step time, {mode} in both)",
            "value": value,
            "met": None if value is None else value <= TARGET_S2_OVER_FULL_ATTENTION,
        }
    memory = ratios.get("mem_longlora/full@s2")
    result["mem_longlora/full@s2"] = {
        "target": f"< {TARGET_LORA_PLUS_OVER_FULL_MEM} (peak memory growth of a step, S² in both)",
        "value": memory,
        "met": None if memory is None else memory < TARGET_LORA_PLUS_OVER_FULL_MEM,
    }
    if seq_len != TARGET_N:
        for target in result.values():
            target["note"] = f"set for N={TARGET_N}, judged here at N={seq_len}"
    return result


def run_driver(args: argparse.Namespace) -> dict:
    from longlora_hub.remote_code.s2_attention import s2_group_size

    started = time.perf_counter()
    shape = model_shape(args)
    group_size = s2_group_size(args.length, ratio=GROUP_RATIO)
    logits_mib = BATCH * args.length * VOCAB * 4 / 2**20  # the loss upcasts the logits to fp32
    report = {
        "environment": environment(args.device, args.dtype),
        "config": {
            "preset": args.preset,
            **shape,
            "vocab_size": VOCAB,
            "batch": BATCH,
            "length": args.length,
            "s2_group_size": group_size,
            "attn_implementation": args.attn,
            "optimizer": f"torch.optim.AdamW(lr={LEARNING_RATE}) over the trainable parameters",
            "cases": args.cases,
            "repeats": args.repeats,
            "budget_s": args.budget_s,
            "timing": "median of whole training steps (forward with labels -> loss, backward, AdamW step, "
            "zero_grad) after one warm-up step; each case in its own fresh process, cases stepped round-robin so "
            "that machine noise hits them alike; forward/backward/optimizer are the medians of each phase; on CPU, "
            "cpu_s is the worker's CPU time (all its threads) per step, which other jobs on a shared machine "
            "disturb less than the wall-clock time_s",
            "loss": args.loss,
            "logits_note": (
                "TRL's fused LM head (what SFTTrainer installs): per-token log-probabilities, entropy and top-1 "
                f"computed in tiles, so the {BATCH}x{args.length}x{VOCAB} logits ({logits_mib:.0f} MiB in fp32) "
                "are never built"
                if args.loss == "fused"
                else f"the LM head's logits are {BATCH}x{args.length}x{VOCAB} = {logits_mib:.0f} MiB in fp32 (the "
                "loss upcasts them); the log-softmax of the loss and the logits' gradient are as large again"
            ),
            "forward_gflop": forward_gflop(args, group_size),
        },
        "cases": {},
    }
    cases, methods = measure(args, started)
    report["config"]["memory"] = "peak growth of a step: " + "; ".join(sorted(methods))
    report["cases"] = cases
    ratios = {}
    for mode in TRAINABLES:
        s2, full = cases.get(f"s2+{mode}"), cases.get(f"full_attention+{mode}")
        ratios[f"time_s2/full_attention@{mode}"] = ratio(s2, full)
        ratios[f"cpu_s2/full_attention@{mode}"] = ratio(s2, full, "cpu_s")
        ratios[f"mem_s2/full_attention@{mode}"] = ratio(s2, full, "peak_mem_mib")
    for attention in ATTENTIONS:
        longlora, full = cases.get(f"{attention}+longlora"), cases.get(f"{attention}+full")
        ratios[f"time_longlora/full@{attention}"] = ratio(longlora, full)
        ratios[f"cpu_longlora/full@{attention}"] = ratio(longlora, full, "cpu_s")
        ratios[f"mem_longlora/full@{attention}"] = ratio(longlora, full, "peak_mem_mib")
    report["ratios"] = {name: value for name, value in ratios.items() if value is not None}
    report["targets"] = targets(report["ratios"], args.length)
    report["total_wall_s"] = round(time.perf_counter() - started, 1)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=TARGET_N, help="sequence length N (default 16384)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per case (median reported)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES, help="cases to run")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model shape")
    parser.add_argument("--layers", type=int, help="decoder layers (default: 2 for small, 4 for 7b-layers)")
    parser.add_argument("--attn", default="sdpa", choices=ATTN_IMPLEMENTATIONS, help="attn_implementation")
    parser.add_argument(
        "--loss",
        default="logits",
        choices=["logits", "fused"],
        help="logits: model(labels=...) builds the N x vocab logits; fused: TRL's fused LM head, which SFTTrainer "
        "installs (on CPU its tiles are 32768 tokens, so it is not smaller there: see README.md)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--budget-s",
        type=float,
        default=480.0,
        help="wall-clock seconds the run aims for: when --repeats timed steps of every case would not fit after "
        "the warm-up round, the slowest cases are timed fewer times (at least once) and carry a note",
    )
    parser.add_argument("--pause-s", type=float, default=0.1, help="idle time between two steps")
    parser.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)  # internal: run one case
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker, args)
        return
    print(json.dumps(run_driver(args), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
