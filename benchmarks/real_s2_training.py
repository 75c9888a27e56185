"""Does S²-Attn training close the S² gap of a real pretrained model? (the paper's premise, at CPU scale)

Before any training, SmolLM2-135M-Instruct at 2048 tokens with groups of 512 loses far more with S² (segments)
than with full attention or with no shift at all (`benchmarks/real_s2_gap.py` says why). This script trains it with
the LongLoRA recipe (`recipes/configs/smollm2-135m/32k_extend.yaml` at 2048 tokens, inside the native context, so
no Position Interpolation: only S² is new to the model) through `recipes/sft.py` on Debian's license texts, saves a
checkpoint every `--eval-every` steps, and measures on held-out license texts, for the base and every checkpoint:
the loss with full attention (eval mode, what inference uses), with S² segments and with no shift (training mode,
dropout 0, no gradients).

Run: `python benchmarks/real_s2_training.py --steps 200` (about 22 s a step on 2 cores: 75 minutes); writes
`runs/real-s2-training/results.json` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "configs" / "smollm2-135m" / "32k_extend.yaml"
HELD_OUT = ("Apache-2.0", "MPL-2.0")  # licenses unlike the GPL family that fills the training rows


def losses(model, rows: torch.Tensor) -> dict[str, float]:
    """Mean loss over `rows` with full attention (eval mode) and with S² segments / none (training mode)."""
    out = {}
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    for name, shift in (("full", None), ("segments", "segments"), ("none", "none")):
        if shift is None:
            model.eval()
        else:
            model.train()
            config.s2_shift = shift
        with torch.no_grad():
            out[name] = sum(model(row[None], labels=row[None]).loss.item() for row in rows) / len(rows)
    config.s2_shift = "segments"
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--eval-rows", type=int, default=2)
    parser.add_argument("--output-dir", default=str(ROOT / "runs" / "real-s2-training"))
    parser.add_argument(
        "--evaluate-only", action="store_true", help="evaluate the checkpoints already saved (a run stopped early)"
    )
    args = parser.parse_args(argv)

    import importlib.util

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longlora_hub.real_model import license_texts, smollm2_checkpoint

    folder = smollm2_checkpoint()
    output = Path(args.output_dir)
    data = output / "data"
    data.mkdir(parents=True, exist_ok=True)
    train_files, held_out = [], []
    for path in license_texts():
        (held_out if path.name in HELD_OUT else train_files).append(path)
        if path.name not in HELD_OUT:
            (data / f"{path.name}.txt").write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids: list[int] = []
    for path in held_out:
        ids += tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        ids.append(tokenizer.eos_token_id)
    rows = torch.tensor(ids[: args.seq_len * args.eval_rows]).view(-1, args.seq_len)

    run_dir = output / "run"
    results_path = output / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if not (run_dir / "adapter_config.json").is_file() and not args.evaluate_only:
        spec = importlib.util.spec_from_file_location("sft_recipe", ROOT / "recipes" / "sft.py")
        sft = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sft)
        started = time.perf_counter()
        trainer = sft.main(
            [
                *("--config", str(RECIPE), "--output_dir", str(run_dir), "--model_name_or_path", str(folder)),
                *("--dataset_name", "", "--data_files", *map(str, sorted(data.glob("*.txt")))),
                *("--dataset_streaming", "false"),
                *("--context_length", str(args.seq_len), "--max_length", str(args.seq_len)),
                *("--dtype", "float32", "--bf16", "false", "--use_cpu", "true", "--gradient_accumulation_steps", "1"),
                *("--learning_rate", str(args.learning_rate), "--warmup_steps", "10", "--max_steps", str(args.steps)),
                *("--logging_steps", "10", "--save_steps", str(args.eval_every), "--save_total_limit", "100"),
                *("--disable_tqdm", "true"),
            ]
        )
        results["train_seconds"] = round(time.perf_counter() - started, 1)
        results["train_losses"] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        del trainer
    if "train_losses" not in results:  # stopped early: the last checkpoint's state has the losses so far
        states = sorted(run_dir.glob("checkpoint-*/trainer_state.json"), key=lambda path: int(path.parent.name[11:]))
        if states:
            history = json.loads(states[-1].read_text())["log_history"]
            results["train_losses"] = [entry["loss"] for entry in history if "loss" in entry]
    results["settings"] = {**vars(args), "held_out": list(HELD_OUT), "held_out_tokens": rows.numel()}
    evaluated = results.setdefault("by_step", {})
    checkpoints = {0: None} | {
        int(path.name.split("-")[1]): path for path in run_dir.glob("checkpoint-*") if path.is_dir()
    }
    for step, checkpoint in sorted(checkpoints.items()):
        if str(step) in evaluated:
            continue
        model = AutoModelForCausalLM.from_pretrained(run_dir / "base", trust_remote_code=True)
        if checkpoint is not None:
            model = PeftModel.from_pretrained(model, checkpoint)
        evaluated[str(step)] = losses(model, rows)
        results_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"step {step}: {evaluated[str(step)]}", flush=True)
    print("| step | full attention | S² segments | S² no shift | segments - full |\n|---|---|---|---|---|")
    for step, entry in sorted(evaluated.items(), key=lambda item: int(item[0])):
        gap = entry["segments"] - entry["full"]
        print(f"| {step} | {entry['full']:.3f} | {entry['segments']:.3f} | {entry['none']:.3f} | {gap:+.3f} |")
    return results


if __name__ == "__main__":
    main()
