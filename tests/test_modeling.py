"""LlamaLongLoRA against stock Llama (eval) and against the dense S² reference (training), end to end."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from longlora_hub.testing import tiny_llama, tiny_llama_config

from .helpers import LINEAR_PI, assert_same_training_step, longlora_from, pair

BACKENDS = ["sdpa", "eager"]


def tokens(batch=2, seq_len=24, seed=0):
    return torch.randint(3, 384, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_equals_stock_llama(backend):
    stock, model = pair()
    model.set_attn_implementation(backend)
    stock.set_attn_implementation(backend)
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: the stock mask path must be used unchanged
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stock(ids).logits, atol=1e-5, rtol=0)
        got = model(ids, attention_mask=mask).logits
        want = stock(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("training", [False, True])
def test_generate_with_cache_equals_stock(training):
    """S² never applies to cached decoding, even if the module is left in training mode."""
    stock, model = pair()
    model.train(training)
    ids = tokens(1, 12)
    got = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    want = stock.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_group_covering_the_row():
    """G >= 2N: both halves are a single causal group, so training equals full attention; N <= G < 2N: the
    unshifted half is causal but the shifted half still splits at G/2, so training differs from full attention."""
    stock, model = pair(s2_group_size=48)
    ids = tokens(1, 24)
    model.train()
    stock.train()
    torch.testing.assert_close(model(ids).logits, stock(ids).logits, atol=1e-5, rtol=0)
    model.config.s2_group_size = 32
    assert not torch.allclose(model(ids).logits, stock(ids).logits, atol=1e-3)
    model.config.s2_attention = False
    torch.testing.assert_close(model(ids).logits, stock(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", ["segments", "roll", "none"])
@pytest.mark.parametrize("seq_len", [24, 26], ids=["multiple", "remainder"])
def test_training_matches_dense_reference(backend, shift, seq_len):
    stock, model = pair(s2_shift=shift)
    model.set_attn_implementation(backend)
    reference = longlora_from(stock, "s2_reference_test", s2_shift=shift, s2_attention=False)
    assert_same_training_step(model, reference, {"input_ids": tokens(2, seq_len)})


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_with_padding_and_packing_matches_reference(backend):
    stock, model = pair(s2_group_size=6)
    model.set_attn_implementation(backend)
    reference = longlora_from(stock, "s2_reference_test", s2_group_size=6, s2_attention=False)
    ids = tokens(2, 24)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, 19:] = 0
    assert_same_training_step(model, reference, {"input_ids": ids, "attention_mask": mask})
    packed = torch.tensor([list(range(10)) + list(range(14)), list(range(5)) + list(range(19))])
    assert_same_training_step(model, reference, {"input_ids": ids, "position_ids": packed})


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_rows_alone(side):
    _, model = pair(s2_group_size=6)
    model.train()
    ids = tokens(2, 24)
    lengths = [24, 17]
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, 24 - n :] = 1
        else:
            mask[row, :n] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = model(ids, attention_mask=mask, position_ids=position_ids).logits
    for row in range(2):
        real = mask[row].bool()
        alone = model(ids[row : row + 1, real]).logits[0]
        torch.testing.assert_close(batch[row, real], alone, atol=1e-5, rtol=0)


def test_packed_documents_equal_documents_alone():
    _, model = pair(s2_group_size=6)
    model.train()
    ids = tokens(1, 24)
    position_ids = torch.tensor([list(range(10)) + list(range(9)) + list(range(5))])
    packed = model(ids, position_ids=position_ids).logits
    for start, end in [(0, 10), (10, 19), (19, 24)]:
        alone = model(ids[:, start:end]).logits
        torch.testing.assert_close(packed[:, start:end], alone, atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    stock, model = pair()
    reference = longlora_from(stock)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same_training_step(model, reference, {"input_ids": tokens(2, 24)})


def test_training_loss_and_labels():
    _, model = pair()
    model.train()
    ids = tokens(2, 24)
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_training_rejects_a_4d_mask():
    _, model = pair()
    model.train()
    with pytest.raises(ValueError, match="2D padding mask"):
        model(tokens(1, 8), attention_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool))


def qwen2_pair(**s2):
    shape = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    llama = tiny_llama_config()
    config = Qwen2Config(**{key: getattr(llama, key) for key in shape}, num_key_value_heads=2, **s2)
    torch.manual_seed(0)
    model, reference = Qwen2ForCausalLM(config), Qwen2ForCausalLM(copy.deepcopy(config))
    reference.load_state_dict(model.state_dict())
    return model, reference


def test_s2_works_for_other_architectures_through_attn_implementation():
    """The S² function knows nothing about Llama: a Qwen2 model trains with attn_implementation="s2_sdpa"."""
    model, reference = qwen2_pair(s2_group_size=6)
    model.set_attn_implementation("s2_sdpa")
    reference.set_attn_implementation("s2_reference_test")
    assert model.config._attn_implementation == "s2_sdpa"  # each model has its own config
    ids = tokens(2, 24)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    assert_same_training_step(model, reference, {"input_ids": ids, "attention_mask": mask})
    # evaluation is plain attention
    plain = Qwen2ForCausalLM(copy.deepcopy(model.config)).eval()
    plain.load_state_dict(model.state_dict())
    plain.set_attn_implementation("sdpa")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, atol=1e-5, rtol=0)


def test_other_architectures_build_the_s2_layout_once_per_forward(monkeypatch):
    """Every layer of a forward gets the same mask and position_ids: the first builds the layout (host syncs,
    bins, block masks), the others and gradient checkpointing's recomputation reuse it; a new batch, or a mask
    changed in place, gets a new one."""
    from longlora_hub.remote_code import s2_attention as s2_module

    s2_module._register()  # the package's functions, not a copy a trust_remote_code checkpoint registered earlier
    built = []
    from longlora_hub.remote_code import s2_layout

    real_build = s2_layout.build_s2_layout
    monkeypatch.setattr(s2_layout, "build_s2_layout", lambda *a, **k: built.append(a) or real_build(*a, **k))
    model, reference = qwen2_pair(s2_group_size=6)
    assert model.config.num_hidden_layers >= 2
    model.set_attn_implementation("s2_sdpa")
    reference.set_attn_implementation("s2_reference_test")
    model.gradient_checkpointing_enable()
    ids = tokens(2, 24)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    assert_same_training_step(model, reference, {"input_ids": ids, "attention_mask": mask})
    assert len(built) == 1
    model(ids, attention_mask=mask.clone())
    assert len(built) == 2
    mask[1, :5] = 0  # the same tensor, changed in place: its layout must not be reused
    reference.zero_grad()
    model.zero_grad()
    assert_same_training_step(model, reference, {"input_ids": ids, "attention_mask": mask})
    assert len(built) == 3


def test_save_and_reload_keeps_everything(tmp_path):
    stock, model = pair(s2_group_size=8, s2_shift="roll")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert loaded.config.s2_group_size == 8 and loaded.config.s2_shift == "roll"
    assert loaded.config.rope_parameters["factor"] == 2.0
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, stock(ids).logits, atol=1e-5, rtol=0)
    # a transformers 4.x reader sees the same scaling through the legacy fields
    import json

    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_scaling"] == {"type": "linear", "rope_type": "linear", "factor": 2.0}
    assert saved["rope_theta"] == LINEAR_PI["rope_theta"]
    # stock Llama reads the same checkpoint (inference uses standard attention anyway)
    as_llama = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(as_llama(ids).logits, stock(ids).logits, atol=1e-5, rtol=0)


def test_tiny_llama_is_deterministic():
    assert torch.equal(tiny_llama(3).lm_head.weight, tiny_llama(3).lm_head.weight)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_builds_no_n_by_n_tensor(backend):
    """With padding, stock Llama builds a (B, 1, N, N) mask; the S² path never does."""
    from longlora_hub.testing import LargestTensor

    n = 1024
    _, model = pair(s2_group_size=64)
    model.set_attn_implementation(backend)
    model.train()
    ids = tokens(1, n)
    mask = torch.ones_like(ids)
    mask[0, :10] = 0
    with LargestTensor() as probe:
        model(ids, attention_mask=mask, labels=ids).loss.backward()
    assert probe.largest < n * n // 2
