"""`make demo`: the LongLoRA pipeline on a tiny Llama, on CPU, in well under a minute.

1. build a tiny stock Llama and its tokenizer in code (nothing is downloaded) and save them;
2. `longlora-hub convert` it to LlamaLongLoRA with Position Interpolation to 4x its context;
3. load the result with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`;
4. train a few steps at the new length with S²-Attn (training mode), then show full attention is used at
   evaluation and generate with the KV cache.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_output", help="folder for the demo's checkpoints")
    parser.add_argument("--steps", type=int, default=8, help="S² training steps")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longlora_hub.convert import convert_checkpoint
    from longlora_hub.testing import FILLER, build_tiny_tokenizer, tiny_llama

    torch.manual_seed(0)
    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        raise SystemExit(f"{output} exists and is not empty; remove it or pass --output to another folder.")
    base_dir, extended_dir = output / "base", output / "extended"

    tokenizer = build_tiny_tokenizer()
    base = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256)
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    params = sum(p.numel() for p in base.parameters())
    say(f"built a tiny stock Llama ({params / 1e3:.0f}k parameters, context 256) in {base_dir}")

    target = 1024
    convert_checkpoint(str(base_dir), str(extended_dir), context_length=target)
    model = AutoModelForCausalLM.from_pretrained(extended_dir, trust_remote_code=True)
    config = model.config
    say(
        f"converted to {type(model).__name__}: context {config.max_position_embeddings}, "
        f"RoPE {config.rope_parameters['rope_type']} x{config.rope_parameters['factor']:g}, "
        f"S² group size ratio {config.s2_group_size_ratio} (shift: {config.s2_shift})"
    )

    ids = tokenizer(FILLER * 40, return_tensors="pt").input_ids[:, :target]
    say(f"training {args.steps} steps on {ids.shape[1]} tokens with S²-Attn (G = {int(target * 0.25)})")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        say(f"  step {step}: loss {loss.item():.3f}")
    say(f"  {args.steps * ids.shape[1] / (time.perf_counter() - start):.0f} tokens/s on CPU")

    model.eval()
    with torch.no_grad():
        eval_loss = model(ids, labels=ids).loss.item()
    say(f"evaluation uses full causal attention: loss {eval_loss:.3f} on the same {ids.shape[1]} tokens")
    model.save_pretrained(extended_dir / "trained")
    tokenizer.save_pretrained(extended_dir / "trained")
    reloaded = AutoModelForCausalLM.from_pretrained(extended_dir / "trained", trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(extended_dir / "trained", trust_remote_code=True)
    prompt = tokenizer("The grass is green. The sky is", return_tensors="pt")
    generated = reloaded.generate(**prompt, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(generated[0], skip_special_tokens=True)
    say(f"generation with the KV cache (full attention): {text!r}")
    say(f"done; checkpoints are in {output}/")


if __name__ == "__main__":
    main()
