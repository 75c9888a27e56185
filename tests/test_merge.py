"""Merged model against base + adapter (the streamed merge and the CLI come with the publishing work)."""

import pytest
import torch

from longlora_hub.merge import merge_adapter

from .test_training import TINY_EXTEND, run, short


def test_merged_equals_base_plus_adapter(tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = run(TINY_EXTEND, tmp_path / "run", *short("--max_steps", "3"))
    merged_dir = merge_adapter(tmp_path / "run", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, trust_remote_code=True).eval()
    assert type(merged).__name__ == "LlamaLongLoRAForCausalLM"
    assert merged.config.rope_parameters["factor"] == 2.0
    ids = torch.randint(3, 300, (1, 512), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trainer.model.eval()(ids).logits, atol=1e-4, rtol=0)
    with pytest.raises(FileExistsError, match="not empty"):
        merge_adapter(tmp_path / "run", tmp_path / "merged")
