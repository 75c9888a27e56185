"""Export the pretrained tiny base (the output of `recipes/configs/tiny/pretrain.yaml`) as the stock Llama checkpoint
the package ships (`longlora_hub/assets/tiny-llama-pretrained`, bf16), and measure what the issue asks of a base
before extension: passkey accuracy within and beyond its context, and perplexity rising beyond it.

```bash
python recipes/sft.py --config recipes/configs/tiny/pretrain.yaml      # about 12 minutes on 2 cores
python benchmarks/study/export_base.py runs/tiny-pretrain               # writes the asset and prints the numbers
```
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

ASSET = ROOT / "longlora_hub" / "assets" / "tiny-llama-pretrained"


def export(trained: Path, destination: Path):
    """The trained weights in a stock `LlamaForCausalLM` (no LlamaLongLoRA keys, no remote code), bf16."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from longlora_hub.merge import LONGLORA_CONFIG_KEYS

    model = AutoModelForCausalLM.from_pretrained(trained, trust_remote_code=True, dtype=torch.float32)
    values = {k: v for k, v in model.config.to_dict().items() if k not in (*LONGLORA_CONFIG_KEYS, "_name_or_path")}
    values.update(model_type="llama", architectures=["LlamaForCausalLM"], dtype="bfloat16")
    stock = LlamaForCausalLM(LlamaConfig(**values))
    stock.load_state_dict(model.state_dict())
    stock.to(torch.bfloat16).save_pretrained(destination)
    AutoTokenizer.from_pretrained(trained).save_pretrained(destination)
    return destination


def measure(folder: Path, trials: int = 20) -> dict:
    """Passkey accuracy at 128 to 1024 tokens and perplexity (both protocols, as in the study) at 256, 512 and 1024
    on the study's held-out long documents, in fp32, with the base's own RoPE (no interpolation)."""
    import torch
    from study import evaluation_tokens, perplexities
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longlora_hub.evaluation.passkey import run_passkey

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    passkey = run_passkey(model, tokenizer, [128, 256, 512, 1024], trials=trials, batch_size=10, progress=False)
    return {"passkey": passkey["accuracy"], "perplexity": perplexities(model, evaluation_tokens(tokenizer, 24_000))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trained", type=Path, help="the pretraining run's output_dir")
    parser.add_argument("--destination", type=Path, default=ASSET)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    export(args.trained, args.destination)
    state = json.loads((args.trained / "trainer_state.json").read_text())
    losses = [(entry["step"], round(entry["loss"], 3)) for entry in state["log_history"] if "loss" in entry]
    print(json.dumps({"loss": losses[:: max(1, len(losses) // 10)] + losses[-1:], **measure(args.destination)}))


if __name__ == "__main__":
    main()
