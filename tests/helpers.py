"""Builders shared by the model tests."""

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from longlora_hub.remote_code.configuration_llama_longlora import LlamaLongLoRAConfig
from longlora_hub.remote_code.modeling_llama_longlora import LlamaLongLoRAForCausalLM
from longlora_hub.remote_code.s2_attention import s2_group_size
from longlora_hub.testing import reference_attention, s2_reference_mask, tiny_llama

LINEAR_PI = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
# a guard against a HUNG subprocess only, never a speed requirement: under heavy load on 2 cores the study's smoke
# run took 17 minutes and a 1200 s limit made its tests error; CI's own limit is 90 minutes
HANG_TIMEOUT_S = 3600


def longlora_from(stock, attn_implementation: str = "sdpa", **s2) -> LlamaLongLoRAForCausalLM:
    """A LlamaLongLoRA model with exactly the weights and rope settings of a stock Llama."""
    values = stock.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        values.pop(key, None)
    config = LlamaLongLoRAConfig(**{**values, **s2})
    model = LlamaLongLoRAForCausalLM(config)
    model.load_state_dict(stock.state_dict())
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def pair(seed: int = 0, **s2):
    stock = tiny_llama(seed, rope_parameters=dict(LINEAR_PI))
    return stock, longlora_from(stock, **s2)


def reference_s2_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The dense-mask S² reference as a transformers attention function (for stock models in tests)."""
    config = module.config
    batch, _, seq_len, _ = query.shape
    group = s2_group_size(seq_len, getattr(config, "s2_group_size", None), getattr(config, "s2_group_size_ratio", 0.25))
    padding = attention_mask[:, -seq_len:] if attention_mask is not None else None
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and position_ids.shape[0] < batch:
        position_ids = position_ids.expand(batch, -1)
    mask = s2_reference_mask(seq_len, group, getattr(config, "s2_shift", "segments"), padding, position_ids, batch)
    out = reference_attention(query, key, value, mask, scaling)
    if padding is not None:
        out = out * padding[:, :, None, None]
    return out, None


AttentionInterface.register("s2_reference_test", reference_s2_attention)
# the 2D padding mask (or None), as flash-attention gets it
AttentionMaskInterface.register("s2_reference_test", ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_training_step(model, reference, inputs, atol=1e-5):
    """Same logits and same gradients for every parameter."""
    model.train()
    reference.train()
    model.zero_grad()
    reference.zero_grad()
    out = model(**inputs)
    ref = reference(**inputs)
    real = inputs.get("attention_mask")
    weight = torch.ones_like(out.logits[..., :1]) if real is None else real[..., None].to(out.logits.dtype)
    torch.testing.assert_close(out.logits * weight, ref.logits * weight, atol=atol, rtol=0)
    (out.logits * weight).square().mean().backward()
    (ref.logits * weight).square().mean().backward()
    expected = grads(reference)
    got = grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=atol, rtol=0, msg=name)
