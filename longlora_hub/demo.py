"""`make demo`: the whole LongLoRA pipeline on a tiny Llama, on CPU, in about a minute.

1. build a tiny stock Llama (context 256) and its tokenizer in code (nothing is downloaded);
2. `longlora-hub convert` it to LlamaLongLoRA with Position Interpolation to 1024 tokens (4x);
3. stage 1, context extension: `recipes/sft.py` with `recipes/configs/tiny/extend.yaml` (S²-Attn, LoRA +
   embeddings + norms) on synthetic long documents at the extended length; merge the adapter;
4. stage 2, LongQA: `recipes/sft.py` with `recipes/configs/tiny/longqa.yaml` on passkey questions; merge;
5. generate with full attention and the KV cache on a long prompt.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def load_recipe():
    spec = importlib.util.spec_from_file_location("longlora_sft_recipe", ROOT / "recipes" / "sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_stage(sft, config: Path, model: Path, output: Path, steps: int) -> str:
    """Run one recipe stage quietly; return its loss curve as text."""
    trainer = sft.main(
        ["--config", str(config), "--model_name_or_path", str(model), "--output_dir", str(output)]
        + ["--max_steps", str(steps), "--logging_steps", str(max(1, steps // 5)), "--disable_tqdm", "true"]
    )
    return " -> ".join(f"{entry['loss']:.3f}" for entry in trainer.state.log_history if "loss" in entry)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_output", help="folder for every checkpoint the demo writes")
    parser.add_argument("--extend-steps", type=int, default=30, help="context-extension steps")
    parser.add_argument("--longqa-steps", type=int, default=20, help="LongQA steps")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longlora_hub.convert import convert_checkpoint
    from longlora_hub.merge import merge_adapter
    from longlora_hub.synthetic import passkey_examples
    from longlora_hub.testing import build_tiny_tokenizer, tiny_llama

    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        raise SystemExit(f"{output} exists and is not empty; remove it or pass --output to another folder.")
    sft = load_recipe()
    configs = ROOT / "recipes" / "configs" / "tiny"

    # 1. a stock Llama built in code
    tokenizer = build_tiny_tokenizer()
    base = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256)
    base.save_pretrained(output / "base")
    tokenizer.save_pretrained(output / "base")
    say(f"1. built a tiny stock Llama ({sum(p.numel() for p in base.parameters()) / 1e3:.0f}k parameters, context 256)")

    # 2. conversion: config + remote code, weights copied as they are
    converted = convert_checkpoint(output / "base", output / "converted", context_length=1024)
    rope = AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True).config.rope_parameters
    say(f"2. converted to LlamaLongLoRA: context 1024, RoPE {rope['rope_type']} x{rope['factor']:g} -> {converted}")

    # 3. stage 1: context extension at 1024 tokens with S²-Attn
    say("3. stage 1 (extend): 1024-token rows of long documents, S² groups of 256, LoRA + embeddings + norms")
    curve = run_stage(sft, configs / "extend.yaml", converted, output / "extend", args.extend_steps)
    say(f"   loss at 1024 tokens: {curve}; adapter in {output / 'extend'}")
    extended = merge_adapter(output / "extend", output / "extended")
    say(f"   merged into {extended}")

    # 4. stage 2: LongQA supervised fine-tuning on the extended model
    say("4. stage 2 (longqa): passkey questions over ~700-token prompts, loss on the answers only")
    curve = run_stage(sft, configs / "longqa.yaml", extended, output / "longqa", args.longqa_steps)
    say(f"   loss: {curve}; adapter in {output / 'longqa'}")
    final = merge_adapter(output / "longqa", output / "final")
    say(f"   merged into {final}")

    # 5. generation with full attention on a long prompt
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(final, trust_remote_code=True)
    example = passkey_examples(1, seed=123)[0]
    prompt = tokenizer(f"[INST]{example['instruction']}[/INST]", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(generated[0, prompt.input_ids.shape[1] :], skip_special_tokens=True)
    say(f"5. generation on a {prompt.input_ids.shape[1]}-token prompt (full attention, KV cache):")
    say(f"   expected {example['output']!r}, got {answer!r}")
    say(f"done: every checkpoint is under {output}/ (base, converted, extend, extended, longqa, final)")


if __name__ == "__main__":
    main()
