"""Peak memory of `longlora-hub merge` (streamed, tensor by tensor) against loading the same model whole.

A random Llama (default: 6 layers, hidden 512, intermediate 1376, vocab 1024, fp32, about 80 MB) is saved in 8
safetensors shards with a `longlora` adapter (LoRA on q, k, v, o plus trained embeddings and norms, all changed).
Three cases, each in its own fresh process that first imports every library any case uses, measured as the growth
of the peak RSS (VmHWM) over the footprint after those imports (the kernel's high-water mark is reset there):

- `load`: `AutoModelForCausalLM.from_pretrained(base)` and a read of every weight: the model loaded whole, the
  least any merge that loads the model needs (transformers maps the files, and mapped pages count once read);
- `peft_merge`: the usual in-memory merge, `PeftModel.from_pretrained(...).merge_and_unload().save_pretrained()`;
- `streamed`: `merge_adapter(adapter, output)`: reads one tensor at a time and appends it to the output shard.

Target: streamed / load <= 1/3. The script prints one JSON object; `--layers`/`--hidden` change the model size.
Usage: `.venv/bin/python benchmarks/merge.py [--shards 8]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _measure import environment, high_water_kib, ratio, reset_peak_rss, rss_kib, run_json_process, script_command

TARGET_STREAMED_OVER_WHOLE = 1 / 3
CASES = ("load", "peft_merge", "streamed")


def worker(case: str, base: str, adapter: str, output: str) -> None:
    # every case imports every library any case uses before the baseline, so none counts another's imports
    import huggingface_hub.repocard  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    import longlora_hub.remote_code.modeling_llama_longlora  # noqa: F401
    from longlora_hub.merge import merge_adapter

    baseline = rss_kib()
    method = "VmHWM - RSS after imports, high-water mark reset via /proc/self/clear_refs"
    if not reset_peak_rss():
        method = "VmHWM - RSS after imports (high-water mark NOT reset: may include import peaks)"
    start = time.perf_counter()
    if case == "load":
        # transformers maps the files: pages count once read, so read every weight, as any merge must
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        with torch.no_grad():
            checksum = sum(float(parameter.sum()) for parameter in model.parameters())
        del model, checksum
    elif case == "peft_merge":
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(output)
    else:
        merge_adapter(adapter, output)
    seconds = time.perf_counter() - start
    peak_mib = round((high_water_kib() - baseline) / 1024, 1)
    print(json.dumps({"peak_mem_mib": peak_mib, "time_s": round(seconds, 3), "memory": method}))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--worker", nargs=4, metavar=("CASE", "BASE", "ADAPTER", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return {}

    from longlora_hub.testing import sharded_base_and_adapter

    with tempfile.TemporaryDirectory(prefix="merge-bench-") as tmp:
        base, adapter = sharded_base_and_adapter(
            tmp,
            num_shards=args.shards,
            num_hidden_layers=args.layers,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            vocab_size=args.vocab,
            num_attention_heads=8,
            num_key_value_heads=8,
        )
        weights = sorted(base.glob("*.safetensors"))
        model_mib = round(sum(path.stat().st_size for path in weights) / 2**20, 1)
        cases = {}
        for case in CASES:
            output = Path(tmp) / f"merged-{case}"
            cases[case] = run_json_process(
                script_command(__file__, "--worker", case, str(base), str(adapter), str(output))
            )
        merged_shards = len(list((Path(tmp) / "merged-streamed").glob("*.safetensors")))
    result = {
        "config": {
            "layers": args.layers,
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "vocab": args.vocab,
            "dtype": "float32",
            "base_shards": len(weights),
            "merged_shards": merged_shards,
            "model_mib": model_mib,
        },
        "environment": environment("cpu", "float32"),
        "cases": cases,
        "ratios": {
            "mem_streamed/load": ratio(cases["streamed"], cases["load"], "peak_mem_mib"),
            "mem_streamed/peft_merge": ratio(cases["streamed"], cases["peft_merge"], "peak_mem_mib"),
        },
        "target": {"mem_streamed/load": round(TARGET_STREAMED_OVER_WHOLE, 3)},
    }
    value = result["ratios"]["mem_streamed/load"]
    result["target_met"] = value is not None and value <= TARGET_STREAMED_OVER_WHOLE
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main().get("target_met", True) else 1)
