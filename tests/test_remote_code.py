"""A saved LlamaLongLoRA checkpoint loads with trust_remote_code in a process where longlora_hub cannot be
imported: the remote-code files must be self-contained (torch + transformers only)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from longlora_hub.remote_code import configuration_llama_longlora

from .helpers import HANG_TIMEOUT_S, pair

LOADER = textwrap.dedent(
    """
    import sys
    sys.modules["longlora_hub"] = None  # any import of the project now fails
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    path = sys.argv[1]
    ids = torch.load(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert type(model).__name__ == "LlamaLongLoRAForCausalLM", type(model)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        logits = model(ids).logits
    base = AutoModel.from_pretrained(path, trust_remote_code=True)
    assert type(base).__name__ == "LlamaLongLoRAModel", type(base)
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    assert config.model_type == "llama_longlora" and config.s2_group_size == 8
    model.train()
    loss = model(ids, labels=ids).loss  # S² in training mode, from the copied files
    loss.backward()
    torch.save({"logits": logits, "loss": loss.detach()}, sys.argv[3])
    """
)


def test_checkpoint_loads_without_the_package(tmp_path):
    stock, model = pair(s2_group_size=8)
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    files = {p.name for p in checkpoint.iterdir()}
    assert {"configuration_llama_longlora.py", "modeling_llama_longlora.py", "s2_attention.py"} <= files
    auto_map = json.loads((checkpoint / "config.json").read_text())["auto_map"]
    assert auto_map == configuration_llama_longlora.AUTO_MAP

    ids = torch.randint(3, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "load.py").write_text(LOADER)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "load.py", str(checkpoint), "ids.pt", "out.pt"],
        cwd=tmp_path,  # the repository root is not on sys.path
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], stock(ids).logits, atol=1e-5, rtol=0)
    model.train()
    torch.testing.assert_close(out["loss"], model(ids, labels=ids).loss.detach(), atol=1e-5, rtol=0)


def test_remote_code_imports_only_torch_and_transformers():
    allowed = {"torch", "transformers", "collections", "dataclasses", "functools", "typing"}
    folder = Path(configuration_llama_longlora.__file__).parent
    for path in folder.glob("*.py"):
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] in (["import"], ["from"]) and not words[1].startswith("."):
                assert words[1].split(".")[0] in allowed, f"{path.name}: {line}"
