"""The LongLoRA ablations at CPU scale: extend the shipped tiny base 4x (256 -> 1024 tokens) in seven ways, and 8x
(to 2048 tokens) in three, and compare perplexity and passkey retrieval at 1x, 2x, 4x (and 8x) its original context.

Launch:
```bash
python benchmarks/study/study.py                    # the study: about 45 minutes on 2 cores, writes docs/study.md
python benchmarks/study/study.py --smoke --output /tmp/study --doc /tmp/study/study.md   # CI: about a minute
```

Every run (a method and a seed) trains in its own process with `recipes/sft.py` and
`recipes/configs/tiny/extend_pretrained.yaml` plus the method's overrides, then evaluates the trained model in eval
mode (full attention) and writes `OUTPUT/RUN-sSEED/result.json`. Finished runs are skipped on a re-launch, so an
interrupted study resumes. The report (`--doc`, with PNG plots next to it and the raw numbers in `OUTPUT/study.json`) is
written from whatever results exist; `--report-only` rewrites it without training.

The methods (the paper's Tables 2, 6 and 12 in miniature):

| run | what | trainable | attention in training |
|---|---|---|---|
| `pi-only` | Position Interpolation, no training | - | - |
| `full-attn` | full fine-tuning | all | full |
| `full-s2` | full fine-tuning with S²-Attn | all | S², `segments` shift |
| `full-s2-roll` | the same with the paper's cyclic roll | all | S², `roll` shift |
| `longlora` | LoRA + embeddings + norms (LongLoRA) | LoRA, embed, norms | S², `segments` |
| `lora-s2` | plain LoRA | LoRA | S², `segments` |
| `lora-plus-no-shift` | LongLoRA without the shift | LoRA, embed, norms | short attention, no shift |

`pi-only-8x`, `full-attn-8x` and `longlora-8x` are the same methods extending 8x, to 2048 tokens, with the same
tokens per step (2 rows of 2048 instead of 4 of 1024).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE.parent)]  # the package and benchmarks/_measure, from any working directory

BASE = "builtin:tiny-llama-pretrained"
CONFIG = ROOT / "recipes" / "configs" / "tiny" / "extend_pretrained.yaml"
ORIGINAL, TARGET, TARGET_8X = 256, 1024, 2048
EIGHT_X = {"context_length": str(TARGET_8X), "max_length": str(TARGET_8X), "per_device_train_batch_size": "2"}
RUNS = {
    "pi-only": None,
    "full-attn": {"trainable": "full", "s2_attention": "false"},
    "full-s2": {"trainable": "full"},
    "full-s2-roll": {"trainable": "full", "s2_shift": "roll"},
    "longlora": {"trainable": "longlora"},
    "lora-s2": {"trainable": "lora"},
    "lora-plus-no-shift": {"trainable": "longlora", "s2_shift": "none"},
    "pi-only-8x": None,
    "full-attn-8x": {"trainable": "full", "s2_attention": "false", **EIGHT_X},
    "longlora-8x": {"trainable": "longlora", **EIGHT_X},
}
MAIN_RUNS = ("pi-only", "full-attn", "full-s2", "longlora", "lora-s2")
LABELS = {
    "pi-only": "PI only, no training",
    "full-attn": "full FT, full attention",
    "full-s2": "full FT, S² (segments)",
    "full-s2-roll": "full FT, S² (roll)",
    "longlora": "LoRA+ (embed, norms), S²: LongLoRA",
    "lora-s2": "plain LoRA, S²",
    "lora-plus-no-shift": "LoRA+, short attention, no shift",
    "pi-only-8x": "8x: PI only, no training",
    "full-attn-8x": "8x: full FT, full attention",
    "longlora-8x": "8x: LongLoRA",
}


def target_of(run: str) -> int:
    """The context length the run extends to."""
    return TARGET_8X if run.endswith("-8x") else TARGET


def ppl_lengths(target: int) -> tuple[int, ...]:
    """Perplexity is measured at 1x, 2x, 4x (and 8x) the original context, up to the run's target."""
    return tuple(n for n in (256, 512, 1024, 2048) if n <= target)


def passkey_lengths(target: int) -> tuple[int, ...]:
    return (256, 512, 768, 1024) if target == TARGET else (256, 512, 1024, 2048)


SIZES = {  # training steps, documents generated for training (None: the recipe's), evaluation tokens, passkey trials
    "full": {"steps": None, "rows": None, "eval_tokens": 24_000, "trials": 20},
    "smoke": {"steps": 2, "rows": 16, "eval_tokens": 3_000, "trials": 2},
}


# ----------------------------------------------------------------------------------------------------------
# one run, in a worker process


def evaluation_tokens(tokenizer, max_tokens: int):
    """Held-out long documents of the study corpus, joined with EOS, as the evaluation's flat token array."""
    import numpy as np

    from longlora_hub.corpus import held_out_tokens

    return np.asarray(held_out_tokens(tokenizer, max_tokens), dtype=np.int64)


def evaluate(model, tokenizer, size: dict, seed: int, target: int) -> dict:
    """Perplexity (both protocols) at 1x, 2x, 4x (8x) and passkey accuracy by length, with full attention."""
    from longlora_hub.evaluation.passkey import run_passkey

    tokens = evaluation_tokens(tokenizer, size["eval_tokens"])
    passkey = run_passkey(
        model, tokenizer, passkey_lengths(target), trials=size["trials"], seed=seed, batch_size=10, progress=False
    )
    return {"perplexity": perplexities(model, tokens, ppl_lengths(target)), "passkey": passkey["accuracy"]}


def perplexities(model, tokens, lengths) -> dict:
    """Perplexity at `lengths` with both protocols: `longlora` windows every 256 tokens, each scored in full;
    `press` windows every N/4 tokens, each token scored once with at least 3N/4 tokens of context."""
    from longlora_hub.evaluation.perplexity import evaluate_perplexity

    result = {}
    for protocol in ("longlora", "press"):
        result[protocol] = {
            str(n): round(
                evaluate_perplexity(
                    model, tokens, n, 256 if protocol == "longlora" else n // 4, protocol, progress=False
                )["perplexity"],
                4,
            )
            for n in lengths
            if n < len(tokens)
        }
    return result


def worker(run: str, seed: int, output: Path, size: dict) -> dict:
    import torch
    from _measure import PeakMemory, import_lazy_modules

    folder = output / f"{run}-s{seed}"
    import_lazy_modules()
    memory = PeakMemory("cpu", "before training")
    started = time.perf_counter()
    if RUNS[run] is None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from longlora_hub.training import LongLoRAArguments, ModelArguments, prepare_base

        args = ModelArguments(model_name_or_path=BASE, context_length=target_of(run))
        base = prepare_base(args, LongLoRAArguments(), str(folder), target_of(run))
        model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=True)  # its config has an auto_map
        trainable, loss, steps = 0, [], 0
    else:
        from longlora_hub.recipes import sft

        argv = ["--config", str(CONFIG), "--output_dir", str(folder), "--seed", str(seed), "--disable_tqdm", "true"]
        for key, value in RUNS[run].items():
            argv += [f"--{key}", value]
        if size["steps"] is not None:
            argv += ["--max_steps", str(size["steps"]), "--logging_steps", "1"]
        if size["rows"] is not None:  # 2 steps of 4 rows need 8 documents, not the recipe's 1200
            argv += ["--builtin_rows", str(size["rows"])]
        trainer = sft.main(argv)
        model, tokenizer = trainer.model, trainer.processing_class
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        loss = [round(entry["loss"], 4) for entry in trainer.state.log_history if "loss" in entry]
        steps = trainer.state.global_step
    train_s = time.perf_counter() - started
    peak = memory.peak_mib()
    result = {
        "run": run,
        "seed": seed,
        "trainable_parameters": trainable,
        "steps": steps,
        "train_s": round(train_s, 1),
        "peak_mib": peak,
        "peak_method": memory.method,
        "loss": loss,
        **evaluate(model, tokenizer, size, seed, target_of(run)),
    }
    (folder / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


# ----------------------------------------------------------------------------------------------------------
# the report


def mean_spread(values: list[float]) -> tuple[float, float]:
    """The mean and half the range (the spread of 2 seeds is their half-difference)."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def aggregate(results: list[dict]) -> dict:
    """Per run: the seeds, and mean and spread of every number."""
    table = {}
    for run in RUNS:
        rows = [r for r in results if r["run"] == run]
        if not rows:
            continue
        entry = {"seeds": sorted(r["seed"] for r in rows), "trainable_parameters": rows[0]["trainable_parameters"]}
        for key in ("train_s", "peak_mib"):
            entry[key] = mean_spread([r[key] for r in rows])
        for protocol in ("longlora", "press"):
            entry[f"ppl_{protocol}"] = {
                n: mean_spread([r["perplexity"][protocol][n] for r in rows]) for n in rows[0]["perplexity"][protocol]
            }
        entry["passkey"] = {n: mean_spread([r["passkey"][n] for r in rows]) for n in rows[0]["passkey"]}
        entry["final_loss"] = mean_spread([r["loss"][-1] for r in rows]) if rows[0]["loss"] else None
        table[run] = entry
    return table


def _cell(value: tuple[float, float], digits: int, percent: bool = False) -> str:
    mean, spread = value
    scale, unit = (100, "%") if percent else (1, "")
    text = f"{mean * scale:.{digits}f}{unit}"
    return text + (f" ± {spread * scale:.{digits}f}" if spread else "")


def verdicts(table: dict) -> list[tuple[str, str, str]]:
    """The paper's claims, each checked against these numbers: (claim, measured, agrees / does not agree)."""
    checks = []

    def ppl(run, n=None):
        return table[run]["ppl_press"][n or str(target_of(run))][0]

    def passkey(run):
        return table[run]["passkey"][str(target_of(run))][0]

    def compare(claim: str, run: str, other: str, agrees) -> None:
        """`agrees(gap, passkey of run, passkey of other)`, gap = relative perplexity of `run` over `other`."""
        if run not in table or other not in table:
            return
        gap = ppl(run) / ppl(other) - 1
        measured = (
            f"perplexity at {target_of(run)}: {ppl(run):.3f} vs {ppl(other):.3f} ({gap:+.1%}); passkey "
            f"{passkey(run):.0%} vs {passkey(other):.0%}"
        )
        if run == "pi-only":
            measured += f"; PI only at {ORIGINAL}: {ppl(run, str(ORIGINAL)):.3f}"
        checks.append((claim, measured, "agrees" if agrees(gap, passkey(run), passkey(other)) else "does not agree"))

    compare(
        "S²-Attn trains as well as full attention (Table 6: within about 1%): full FT with S² vs with full attention",
        "full-s2",
        "full-attn",
        lambda gap, _, __: abs(gap) <= 0.03,
    )
    compare(
        "short attention without the shift is worse (Table 6): LoRA+ with no shift vs LongLoRA",
        "lora-plus-no-shift",
        "longlora",
        lambda gap, mine, theirs: gap > 0.005 or mine < theirs,
    )
    compare(
        "plain LoRA is much worse than LoRA with trainable embeddings and norms (Table 2): plain LoRA vs LongLoRA",
        "lora-s2",
        "longlora",
        lambda gap, _, __: gap > 0.01,
    )
    compare(
        "Position Interpolation alone is poor beyond the original context: PI only vs LongLoRA",
        "pi-only",
        "longlora",
        lambda gap, mine, theirs: gap > 0 and mine <= theirs,
    )
    compare(
        "Position Interpolation alone is poor at 8x too: PI only vs LongLoRA, both extended to 2048",
        "pi-only-8x",
        "longlora-8x",
        lambda gap, mine, theirs: gap > 0 and mine <= theirs,
    )
    for run in ("longlora", "longlora-8x"):
        if run not in table:
            continue
        longest, shortest = ppl(run), ppl(run, str(ORIGINAL))
        checks.append(
            (
                f"an extended model uses its longer context: perplexity falls from {ORIGINAL} tokens to the target "
                f"(Tables 3 and 4), {LABELS[run]}",
                f"perplexity at {ORIGINAL}: {shortest:.3f}, at {target_of(run)}: {longest:.3f} "
                f"({longest / shortest - 1:+.1%})",
                "agrees" if longest < shortest else "does not agree",
            )
        )
    return checks


def plot(table: dict, key: str, lengths: list[str], ylabel: str, path: Path, percent: bool = False) -> None:
    """One line per method over the context lengths, with the seeds' spread as error bars. Perplexity gets a second
    panel without PI only, whose perplexity is so far above the others' that it flattens them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [list(table)] if percent else [list(table), [run for run in table if RUNS[run] is not None]]
    figure, axes_list = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), dpi=110, squeeze=False)
    scale = 100 if percent else 1
    for axes, runs in zip(axes_list[0], panels, strict=True):
        for run in runs:
            entry = table[run]
            xs = [int(n) for n in lengths if n in entry[key]]
            ys = [entry[key][str(x)][0] * scale for x in xs]
            errors = [entry[key][str(x)][1] * scale for x in xs]
            color = f"C{list(RUNS).index(run)}"  # the same colour for a method in both panels
            style = "-" if target_of(run) == TARGET else "--"  # dashed: the 8x runs
            axes.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=LABELS[run], color=color, linestyle=style)
        axes.axvline(ORIGINAL, color="grey", linestyle=":", linewidth=1)
        axes.set_xticks([int(n) for n in lengths])
        axes.set_xlabel("context length (tokens); dotted: the base's context")
        axes.set_ylabel(ylabel)
        axes.legend(fontsize=7)
    if not percent:
        axes_list[0][0].set_yscale("log")
        axes_list[0][1].set_title("without PI only", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_report(results: list[dict], output: Path, doc: Path, smoke: bool) -> None:
    table = aggregate(results)
    (output / "study.json").write_text(json.dumps({"runs": table, "results": results}, indent=1) + "\n")
    doc.parent.mkdir(parents=True, exist_ok=True)
    targets = sorted({target_of(run) for run in table})
    ppl_columns = [str(n) for n in sorted({n for t in targets for n in ppl_lengths(t)})]
    passkey_columns = [str(n) for n in sorted({n for t in targets for n in passkey_lengths(t)})]
    plot(table, "ppl_press", ppl_columns, "perplexity (sliding window)", doc.with_name("study_perplexity.png"))
    plot(table, "passkey", passkey_columns, "passkey accuracy (%)", doc.with_name("study_passkey.png"), True)

    lines = [
        "# The LongLoRA ablations at CPU scale",
        "",
        "Generated by `python benchmarks/study/study.py`" + (" (SMOKE SIZE: not results)" if smoke else "") + ".",
        "",
        f"The shipped tiny base (`{BASE}`, context {ORIGINAL}) extended {TARGET // ORIGINAL}x to {TARGET} tokens "
        f"(and, in the rows marked 8x, to {TARGET_8X}) "
        "with Position Interpolation, trained as in `recipes/configs/tiny/extend_pretrained.yaml` plus each "
        "method's overrides, and evaluated with full attention on held-out documents of the generated corpus. Mean "
        "± half the range over the seeds listed.",
        "",
        "## Perplexity",
        "",
        "| method | seeds | " + " | ".join(f"{n} longlora | {n} press" for n in ppl_columns) + " |",
        "|---|---|" + "---|---|" * len(ppl_columns),
    ]
    for run, entry in table.items():
        cells = []
        for n in ppl_columns:
            for protocol in ("longlora", "press"):
                value = entry[f"ppl_{protocol}"].get(n)
                cells.append(_cell(value, 3) if value else "-")
        lines.append(f"| {LABELS[run]} | {','.join(map(str, entry['seeds']))} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "`longlora`: windows every 256 tokens, each scored in full (the reference's protocol); `press`: sliding "
        "windows every N/4 tokens, each token scored once with at least 3N/4 tokens of context (Press et al.).",
        "",
        "![perplexity](study_perplexity.png)",
        "",
        "## Passkey retrieval",
        "",
        "| method | " + " | ".join(passkey_columns) + " |",
        "|---|" + "---|" * len(passkey_columns),
    ]
    for run, entry in table.items():
        cells = " | ".join(
            _cell(entry["passkey"][n], 0, True) if n in entry["passkey"] else "-" for n in passkey_columns
        )
        lines.append(f"| {LABELS[run]} | {cells} |")
    lines += [
        "",
        "![passkey](study_passkey.png)",
        "",
        "## Cost",
        "",
        "| method | trainable parameters | training time (s) | peak RSS growth (MiB) | final loss |",
        "|---|---|---|---|---|",
    ]
    for run, entry in table.items():
        loss = _cell(entry["final_loss"], 3) if entry["final_loss"] else "-"
        lines.append(
            f"| {LABELS[run]} | {entry['trainable_parameters']:,} | {_cell(entry['train_s'], 0)} | "
            f"{_cell(entry['peak_mib'], 0)} | {loss} |"
        )
    lines += ["", "## Against the paper", "", "| claim | measured | verdict |", "|---|---|---|"]
    lines += [f"| {claim} | {measured} | {verdict} |" for claim, measured, verdict in verdicts(table)]
    notes = HERE / "notes.md"
    if notes.exists() and not smoke:
        lines += ["", notes.read_text().strip()]
    doc.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------------
# the driver


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "study", help="runs and study.json")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "study.md", help="the report (PNGs beside it)")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="methods to run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds of the main runs")
    parser.add_argument(
        "--other-seeds", nargs="+", type=int, default=[0], help="seeds of the other runs (roll, no shift)"
    )
    parser.add_argument("--smoke", action="store_true", help="2 steps and tiny evaluations: checks the pipeline")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from finished runs")
    parser.add_argument("--worker", nargs=2, metavar=("RUN", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = SIZES["smoke" if args.smoke else "full"]
    if args.smoke:
        args.seeds, args.other_seeds = args.seeds[:1], args.other_seeds[:1]

    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.output, size)
        return
    args.output.mkdir(parents=True, exist_ok=True)
    plan = [
        (run, seed)
        for run in args.runs
        for seed in (args.seeds if run in MAIN_RUNS else args.other_seeds)
        if not (RUNS[run] is None and seed != args.seeds[0])  # PI only has no randomness but its passkey keys
    ]
    results, workers = [], 0
    for run, seed in plan:
        path = args.output / f"{run}-s{seed}" / "result.json"
        if not path.exists() and not args.report_only:
            print(f"[study] {run} seed {seed} ...", flush=True)
            if args.smoke and workers:
                # the smoke size checks the plumbing: after one worker process, the runs go in this one, sparing each
                # the ~5 s of imports (its peak memory is then not the run's own: smoke figures are not results)
                os.environ["TOKENIZERS_PARALLELISM"] = "false"
                worker(run, seed, args.output, size)
            else:
                workers += 1
                command = [sys.executable, str(Path(__file__).resolve()), "--output", str(args.output)]
                command += ["--worker", run, str(seed)] + (["--smoke"] if args.smoke else [])
                done = subprocess.run(command, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                if done.returncode:
                    raise SystemExit(f"The run {run} (seed {seed}) failed with exit code {done.returncode}; see above.")
        if path.exists():
            result = json.loads(path.read_text())
            results.append(result)
            target = target_of(run)
            ppl = result["perplexity"]["press"].get(str(target), math.nan)
            print(
                f"[study] {run} seed {seed}: {result['train_s']:.0f} s, ppl@{target} {ppl:.3f}, passkey "
                f"{result['passkey']}",
                flush=True,
            )
    if not results:
        raise SystemExit(f"No finished runs under {args.output}.")
    write_report(results, args.output, args.doc, args.smoke)
    print(f"[study] report: {args.doc}", flush=True)


if __name__ == "__main__":
    main()
