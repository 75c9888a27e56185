"""Merge a LongLoRA adapter (LoRA + trained embeddings and norms) into its base, as a LlamaLongLoRA checkpoint.

This first version loads the whole model (fine for the tiny demo and small models); the streamed,
shard-by-shard merge and the `longlora-hub merge` command build on it.
"""

from __future__ import annotations

import json
from pathlib import Path


def merge_adapter(adapter: str | Path, output: str | Path, base: str | Path | None = None) -> Path:
    r"""
    Merge `adapter` into its base model and save the result to `output`.

    Args:
        adapter (`str` or `Path`): A PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`).
        output (`str` or `Path`): A new or empty folder.
        base (`str` or `Path`, *optional*): The base checkpoint; defaults to the adapter's
            `base_model_name_or_path`.

    Returns:
        `Path`: `output`, holding the merged weights, config (with its RoPE scaling and `auto_map`), the
        remote-code files, tokenizer and generation config.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, output = Path(adapter), Path(output)
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"No adapter_config.json in {adapter}; pass a PEFT adapter folder.")
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty; pass a new folder (nothing is overwritten).")
    base = base or json.loads(config_path.read_text())["base_model_name_or_path"]
    model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True, dtype="auto")
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(output)
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").exists() else base
    AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=True).save_pretrained(output)
    return output


__all__ = ["merge_adapter"]
