"""The flash_attention_2 path of S² on CPU, through a pure-torch stand-in for flash-attn's varlen kernel
(tests/flash_stand_in.py): the stand-in against torch's attention, then S²'s flash path against the dense reference
over many layouts (float64 to 1e-10, bfloat16 at bf16 precision), the CPU counterparts of the `gpu` flash tests in
test_backends.py, the sdpa route S² takes on CUDA (forced here), and gradient checkpointing on the flash path."""

import itertools
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from longlora_hub.remote_code import s2_attention as s2_module
from longlora_hub.remote_code import s2_flash
from longlora_hub.remote_code.s2_attention import build_s2_layout, s2_attention
from longlora_hub.testing import reference_attention, s2_reference_mask, tiny_llama

from .flash_stand_in import FlashStandIn, flash_attn_func, flash_attn_varlen_func, use_flash_stand_in
from .helpers import assert_same_training_step, longlora_from, pair
from .test_backends import CASES, run_case

DIM = 8
SCALE = DIM**-0.5
F64 = {"atol": 1e-10, "rtol": 0}
BF16 = {"atol": 2e-2, "rtol": 0}  # O(1) inputs: bf16 keeps 8 bits of mantissa
BF16_GRAD = {"atol": 4e-2, "rtol": 0}  # gradients reach about 6, where half a bf16 ulp is 0.016


def randn(*shape, dtype=torch.float64, seed=0):
    """Reproducible normal values, drawn in float64 and then rounded to `dtype` (so every precision sees the same
    numbers)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def cu(*lengths) -> torch.Tensor:
    """cu_seqlens for sequences of these lengths, int32 as the kernel wants."""
    return F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).int()


def grads_of(out, inputs, seed=1):
    """The gradients of <out, a fixed random tensor> with respect to `inputs`, in float64."""
    weight = randn(*out.shape, seed=seed)
    return torch.autograd.grad(out.double(), inputs, weight)


def sdpa_per_head(q, k, v, **kwargs):
    """torch's attention on (L, H, D) tensors, the kernel's token-major layout. Returns (L, H, D)."""
    q, k, v = (x.transpose(0, 1) for x in (q, k, v))  # (H, L, D)
    return F.scaled_dot_product_attention(q, k, v, scale=SCALE, **kwargs).transpose(0, 1)


# ----------------------------------------------------------------------------------------------------------
# the stand-in itself: if it were wrong, every test below would check S² against the wrong thing


def test_stand_in_equals_sdpa_on_one_sequence():
    """Causal, one sequence, forward and gradients: float64 to rounding, bf16 at bf16 precision."""
    q, k, v = (randn(12, 3, DIM, seed=seed).requires_grad_() for seed in range(3))  # (L, H, D)
    got = flash_attn_varlen_func(q, k, v, cu(12), cu(12), 12, 12, softmax_scale=SCALE, causal=True, strict=False)
    want = sdpa_per_head(q, k, v, is_causal=True)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    for got_grad, want_grad in zip(grads_of(got, (q, k, v)), grads_of(want, (q, k, v)), strict=True):
        torch.testing.assert_close(got_grad, want_grad, atol=1e-12, rtol=0)
    low = [x.detach().bfloat16() for x in (q, k, v)]
    out = flash_attn_varlen_func(*low, cu(12), cu(12), 12, 12, softmax_scale=SCALE, causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), sdpa_per_head(*(x.double() for x in low), is_causal=True), **BF16)


@pytest.mark.parametrize("causal", [True, False])
def test_stand_in_varlen_equals_each_sequence_alone(causal):
    """Packed sequences never see each other: each equals torch's attention over it alone (a length-1 one too)."""
    lengths = (5, 1, 7)
    q, k, v = (randn(13, 2, DIM, seed=seed) for seed in range(3))  # (T, H, D)
    got = flash_attn_varlen_func(
        q, k, v, cu(*lengths), cu(*lengths), 7, 7, softmax_scale=SCALE, causal=causal, strict=False
    )
    start = 0
    for length in lengths:
        piece = [x[start : start + length] for x in (q, k, v)]
        torch.testing.assert_close(got[start : start + length], sdpa_per_head(*piece, is_causal=causal), **F64)
        start += length


@pytest.mark.parametrize(
    "len_q,len_k,allowed",
    [
        (2, 5, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
        (5, 2, [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]),  # rows with no key give zeros
        (3, 3, [[1, 0, 0], [1, 1, 0], [1, 1, 1]]),
    ],
    ids=["q<k", "q>k", "q=k"],
)
def test_stand_in_causal_mask_is_bottom_right_aligned(len_q, len_k, allowed):
    """flash-attn >= 2.1 aligns the causal diagonal with the bottom-right corner: these masks are its own examples."""
    allowed = torch.tensor(allowed, dtype=torch.bool)  # (Lq, Lk)
    q = randn(len_q, 2, DIM, seed=0)  # (Lq, H, D)
    k, v = (randn(len_k, 2, DIM, seed=seed) for seed in (1, 2))  # (Lk, H, D)
    got = flash_attn_varlen_func(
        q, k, v, cu(len_q), cu(len_k), len_q, len_k, softmax_scale=SCALE, causal=True, strict=False
    )
    seen = allowed.any(-1)  # (Lq,)
    want = sdpa_per_head(q[seen], k, v, attn_mask=allowed[seen])
    torch.testing.assert_close(got[seen], want, **F64)
    assert torch.all(got[~seen] == 0)


@pytest.mark.parametrize("kv_heads", [1, 2, 3])
def test_stand_in_gqa_equals_repeated_key_values(kv_heads):
    """Query head h reads key/value head h // (Hq / Hk): the same as repeating each key/value head in place."""
    q = randn(9, 6, DIM, seed=0)  # (T, Hq, D)
    k, v = (randn(9, kv_heads, DIM, seed=seed) for seed in (1, 2))  # (T, Hk, D)
    args = (cu(4, 5), cu(4, 5), 5, 5)
    got = flash_attn_varlen_func(q, k, v, *args, softmax_scale=SCALE, causal=True, strict=False)
    repeated = [x.repeat_interleave(6 // kv_heads, dim=1) for x in (k, v)]  # (T, Hq, D)
    want = flash_attn_varlen_func(q, *repeated, *args, softmax_scale=SCALE, causal=True, strict=False)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_stand_in_dropout_is_right_in_expectation():
    """Dropout changes each call, and on average gives the output without dropout (kept weights scaled by 1/(1-p)).
    2048 draws: 256 identical heads per call, 8 calls; the mean's error is about 0.01 here."""
    head = [randn(8, 1, DIM, seed=seed) for seed in range(3)]  # (L, 1, D)
    q, k, v = (x.expand(-1, 256, -1).contiguous() for x in head)  # (L, 256, D)
    args = (cu(8), cu(8), 8, 8)
    exact = flash_attn_varlen_func(*(x[:, :1] for x in (q, k, v)), *args, causal=True, strict=False)  # (L, 1, D)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        draws = [flash_attn_varlen_func(q, k, v, *args, dropout_p=0.5, causal=True, strict=False) for _ in range(8)]
    draws = torch.cat(draws, dim=1)  # (L, 2048, D)
    assert not torch.allclose(draws[:, :1], exact)
    torch.testing.assert_close(draws.mean(1, keepdim=True), exact, atol=0.06, rtol=0)


def _valid_call():
    """A call the kernel accepts (bf16, two sequences), as a dict of its arguments."""
    q, k, v = (randn(6, 4, DIM, dtype=torch.bfloat16, seed=seed) for seed in range(3))
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu(2, 4), cu_seqlens_k=cu(2, 4), max_seqlen_q=4, max_seqlen_k=4)


def _transposed_last_dim(x):
    """The same values with stride(-1) != 1."""
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: {n: c[n].float() for n in "qkv"}, "only support fp16 and bf16"),
        (lambda c: {"k": c["k"].half()}, "query and key must have the same dtype"),
        (lambda c: {"v": c["v"].float()}, "query and value must have the same dtype"),
        (lambda c: {"cu_seqlens_q": c["cu_seqlens_q"].long()}, "cu_seqlens_q must have dtype int32"),
        (lambda c: {"cu_seqlens_k": c["cu_seqlens_k"].to("meta")}, "cu_seqlens_k must be on the same device"),
        (lambda c: {"max_seqlen_q": torch.tensor(4)}, "max_seqlen_q must be a Python int"),
        (lambda c: {"q": _transposed_last_dim(c["q"])}, "contiguous last dimension"),
        (lambda c: {"v": _transposed_last_dim(c["v"])}, "contiguous last dimension"),
        (lambda c: {n: randn(6, 4, 264, dtype=torch.bfloat16) for n in "qkv"}, "head dimension at most 256"),
        (lambda c: {n: c[n][:, :3] for n in "kv"}, "must divide number of heads in query"),
        (lambda c: {"cu_seqlens_q": cu(2, 3)}, "cu_seqlens_q must rise from 0 to total_q=6"),
        (lambda c: {"max_seqlen_k": 3}, "max_seqlen_k=3 is below the longest sequence"),
    ],
    ids=[
        "fp32",
        "mixed-qk",
        "mixed-qv",
        "int64-cu",
        "cu-device",
        "tensor-max",
        "strided-q",
        "strided-v",
        "head-dim",
        "heads",
        "cu-total",
        "max-short",
    ],
)
def test_stand_in_enforces_the_kernel_checks(change, message):
    """A valid call passes; each single change to it is refused, as flash-attn would refuse it on a GPU."""
    call = _valid_call()
    flash_attn_varlen_func(**call)
    with pytest.raises(RuntimeError, match=message):
        flash_attn_varlen_func(**{**call, **change(call)})


def test_stand_in_accepts_float_only_when_not_strict_and_refuses_what_it_does_not_implement():
    """float64 only with `strict=False` (and the patched-in kernel is strict by default); features S² does not use
    are refused, not imitated; and the patched-in kernel takes only flash-attn's own arguments."""
    call = {**_valid_call(), **{n: randn(6, 4, DIM, dtype=torch.float64, seed=1) for n in "qkv"}}
    assert flash_attn_varlen_func(**call, strict=False).dtype == torch.float64
    with pytest.raises(RuntimeError, match="only support fp16 and bf16"):
        FlashStandIn()(**call)
    with pytest.raises(NotImplementedError, match="window_size, softcap"):
        flash_attn_varlen_func(**_valid_call(), window_size=(4, 0), softcap=30.0)
    with pytest.raises(TypeError):
        FlashStandIn()(**_valid_call(), strict=False)  # not a flash-attn argument


# ----------------------------------------------------------------------------------------------------------
# S²'s flash path against the dense reference


class Layout(NamedTuple):
    """One S² layout to test: shift, sizes, and the padding mask and position_ids it is built from."""

    shift: str = "segments"
    batch: int = 2
    heads: tuple[int, int] = (4, 2)  # (Hq, Hk)
    seq_len: int = 16
    group: int = 4
    padding: torch.Tensor | None = None
    positions: torch.Tensor | None = None

    def build(self) -> s2_module.S2Layout:
        """The layout S² computes from these inputs."""
        return build_s2_layout(
            self.seq_len, self.batch, self.group, self.shift, padding_mask=self.padding, position_ids=self.positions
        )

    def real(self) -> torch.Tensor:
        """(B, N): 1 for real tokens."""
        padding = torch.ones(self.batch, self.seq_len) if self.padding is None else self.padding
        return padding.double()


LEFT_RIGHT = torch.tensor([[0] * 3 + [1] * 13, [1] * 11 + [0] * 5])
PACKED = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2], list(range(16))])
# a left-padded, a right-padded, a full and an empty row; the packed row restarts twice
PAD4 = torch.tensor([[0] * 5 + [1] * 11, [1] * 9 + [0] * 7, [1] * 16, [0] * 16])
PACK4 = torch.tensor([list(range(16)), list(range(16)), [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4], [0] * 16])

LAYOUTS = {
    "segments": Layout(),
    "roll": Layout("roll"),
    "none": Layout("none"),
    "segments-remainder": Layout(seq_len=18),
    "roll-remainder": Layout("roll", seq_len=22, group=6),
    "none-remainder": Layout("none", seq_len=18),
    "segments-G>N": Layout(seq_len=6, group=8),
    "roll-G>N": Layout("roll", seq_len=6, group=8),
    "batch1-roll": Layout("roll", batch=1, seq_len=14, group=6),
    "padded": Layout(padding=LEFT_RIGHT),
    "padded-none": Layout("none", padding=LEFT_RIGHT),
    "packed": Layout(positions=PACKED),
    "packed-one-row-of-positions": Layout(positions=PACKED[:1]),
    "padded-packed": Layout(padding=LEFT_RIGHT, positions=PACKED),
    "batch4-padded-packed-empty-row": Layout(batch=4, group=6, padding=PAD4, positions=PACK4),
    "gqa": Layout(heads=(8, 2)),
    "gqa-2-kv-heads-per-half": Layout(heads=(8, 4), padding=LEFT_RIGHT),
    "mqa": Layout(heads=(4, 1)),
    "mqa-roll-remainder": Layout("roll", heads=(4, 1), seq_len=18),
    "odd-3-mqa": Layout(heads=(3, 1), seq_len=18),
    "odd-3-roll": Layout("roll", heads=(3, 3)),
    "odd-5-padded": Layout(heads=(5, 5), padding=LEFT_RIGHT),
    "odd-5-mqa-roll": Layout("roll", heads=(5, 1), seq_len=18),
    "6-over-3-packed": Layout(heads=(6, 3), positions=PACKED),  # a key/value head serves both halves
    "6-over-2-padded": Layout(heads=(6, 2), padding=LEFT_RIGHT),
}


def layout_inputs(case: Layout, dtype):
    """q, k, v in `dtype` as the model hands them over: (B, H, N, D) views of (B, N, H, D) tensors."""
    q_heads, kv_heads = case.heads
    shapes = [(case.batch, case.seq_len, heads, DIM) for heads in (q_heads, kv_heads, kv_heads)]
    return [randn(*shape, dtype=dtype, seed=seed).transpose(1, 2).requires_grad_() for seed, shape in enumerate(shapes)]


def check_against_reference(case: Layout, dtype, backend, out_tol, grad_tol):
    """S² on `case` with `backend` against the dense reference computed in float64 from the same (rounded) inputs:
    forward and the gradients of q, k and v."""
    inputs = layout_inputs(case, dtype)
    out = s2_attention(*inputs, case.build(), SCALE, 0.0, backend)  # (B, N, Hq, D)
    assert out.dtype == dtype
    exact = [x.detach().double().requires_grad_() for x in inputs]
    mask = s2_reference_mask(case.seq_len, case.group, case.shift, case.padding, case.positions, case.batch)
    ref = reference_attention(*exact, mask, SCALE) * case.real()[:, :, None, None]  # (B, N, Hq, D)
    torch.testing.assert_close(out.double(), ref, **out_tol)
    for got, want in zip(grads_of(out, inputs), grads_of(ref, exact), strict=True):
        torch.testing.assert_close(got.double(), want, **grad_tol)
    return out


PRECISIONS = {"float64": (torch.float64, False, F64, F64), "bfloat16": (torch.bfloat16, True, BF16, BF16_GRAD)}


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("case", list(LAYOUTS))
def test_flash_path_matches_reference(monkeypatch, case, precision):
    """float64 with the stand-in's float switch, to 1e-10; bf16 with every kernel check on. And S² hands the kernel
    what it should: one call per half of the heads, over exactly the real tokens, groups no longer than G."""
    dtype, strict, out_tol, grad_tol = PRECISIONS[precision]
    stand_in = use_flash_stand_in(monkeypatch, strict=strict)
    layout = LAYOUTS[case]
    check_against_reference(layout, dtype, "flash_attention_2", out_tol, grad_tol)
    assert len(stand_in.calls) == 2
    tokens = int(layout.real().sum())
    for call in stand_in.calls:
        assert call.dtypes == (dtype,) * 3
        assert call.cu_seqlens_q == call.cu_seqlens_k and call.cu_seqlens_q[-1] == tokens
        lengths = torch.tensor(call.cu_seqlens_q).diff()
        assert call.max_seqlen_q == call.max_seqlen_k == int(lengths.max()) <= layout.group
        assert call.causal and call.softmax_scale == SCALE and call.dropout_p == 0.0
    assert sum(call.heads[0] for call in stand_in.calls) == layout.heads[0]


def test_flash_path_passes_dropout_to_the_kernel(monkeypatch):
    """Attention dropout reaches the kernel (which applies it), on both halves of the heads."""
    stand_in = use_flash_stand_in(monkeypatch)
    inputs = layout_inputs(LAYOUTS["padded"], torch.bfloat16)
    with torch.random.fork_rng():
        out = s2_attention(*inputs, LAYOUTS["padded"].build(), SCALE, 0.1, "flash_attention_2")
    assert out.isfinite().all()
    assert [call.dropout_p for call in stand_in.calls] == [0.1, 0.1]


@pytest.mark.parametrize("case", list(CASES))
def test_flash_attention_matches_reference_on_cpu(monkeypatch, case):
    """The CPU counterpart of test_backends.py's `gpu` test_flash_attention_matches_reference: bf16, all checks."""
    stand_in = use_flash_stand_in(monkeypatch)
    run_case("flash_attention_2", case, dtype=torch.bfloat16, backward=True)
    assert len(stand_in.calls) == 2


# ----------------------------------------------------------------------------------------------------------
# the model on the flash path


def model_inputs(kind: str) -> dict:
    """A batch of 2 x 24 tokens: left-padded (as in test_backends.py), packed, or plain."""
    ids = torch.randint(3, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    if kind == "padded":
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        return {"input_ids": ids, "attention_mask": mask}
    if kind == "packed":
        return {"input_ids": ids, "position_ids": torch.tensor([list(range(10)) + list(range(14)), list(range(24))])}
    return {"input_ids": ids}


MODEL_CASES = {"padded": ("segments", "padded"), "packed": ("segments", "packed"), "roll": ("roll", "plain")}


def flash_pair(dtype, **s2):
    """A LlamaLongLoRA on flash_attention_2 and an sdpa reference with the same weights, in `dtype`. The backend is
    set on the config: transformers' set_attn_implementation refuses it without the flash_attn package."""
    stock, model = pair(**s2)
    model.config._attn_implementation = "flash_attention_2"
    return model.to(dtype), longlora_from(stock, "sdpa", **s2).to(dtype)


@pytest.mark.parametrize("precision", ["float64", "bfloat16"])
@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_training_step_on_flash_path(monkeypatch, case, precision):
    """The CPU counterpart of test_backends.py's `gpu` test_model_training_step_on_gpu with flash_attention_2, and
    more inputs: logits and every parameter's gradient against the sdpa model."""
    dtype, strict, _, _ = PRECISIONS[precision]
    stand_in = use_flash_stand_in(monkeypatch, strict=strict)
    shift, kind = MODEL_CASES[case]
    model, reference = flash_pair(dtype, s2_group_size=6, s2_shift=shift)
    atol = 1e-10 if dtype == torch.float64 else 5e-2
    assert_same_training_step(model, reference, model_inputs(kind), atol=atol)
    assert len(stand_in.calls) == 2 * model.config.num_hidden_layers
    assert all(call.dtypes == (dtype,) * 3 for call in stand_in.calls)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_flash_path_under_gradient_checkpointing(monkeypatch, use_reentrant):
    """Recomputing the flash path in the backward gives bit-identical gradients (float64, padded batch)."""
    stand_in = use_flash_stand_in(monkeypatch, strict=False)
    checkpointed, plain = flash_pair(torch.float64, s2_group_size=6)
    plain.config._attn_implementation = "flash_attention_2"
    # the current name of gradient_checkpointing_enable, which transformers 5 deprecates
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert_same_training_step(checkpointed, plain, model_inputs("padded"), atol=0)
    layers = checkpointed.config.num_hidden_layers
    assert len(stand_in.calls) == 3 * 2 * layers  # the checkpointed model's forward and recompute, the plain forward


def stock_pair(dtype):
    """Two stock Llamas with the same weights and S² settings, in `dtype`: no S² of their own, only through the
    attention function they are given."""
    models = [tiny_llama(0).to(dtype) for _ in range(2)]
    for model in models:
        model.config.s2_group_size = 6
    return models


@pytest.mark.parametrize("precision", ["float64", "bfloat16"])
@pytest.mark.parametrize("kind", ["padded", "packed"])
def test_s2_fa2_trains_any_model_through_attention_interface(monkeypatch, kind, precision):
    """A stock Llama trains with the `s2_fa2` attention function (the 2D padding mask and position_ids are all it
    gets) like with the dense reference."""
    dtype, strict, _, _ = PRECISIONS[precision]
    stand_in = use_flash_stand_in(monkeypatch, strict=strict)
    model, reference = stock_pair(dtype)
    model.set_attn_implementation("s2_fa2")
    reference.set_attn_implementation("s2_reference_test")
    atol = 1e-10 if dtype == torch.float64 else 5e-2
    assert_same_training_step(model, reference, model_inputs(kind), atol=atol)
    assert len(stand_in.calls) == 2 * model.config.num_hidden_layers


def test_no_name_with_flash_in_it_is_registered():
    """transformers takes every attn_implementation containing "flash" for a flash-attn kernel to import by that
    name, and refuses ours: every S² name must be selectable by `set_attn_implementation`."""
    model, _ = stock_pair(torch.bfloat16)
    for name in s2_module.S2_ATTENTION_NAMES.values():
        assert "flash" not in name
        if name != "s2_fa2":  # its kernel is imported at selection time: see the test below
            model.set_attn_implementation(name)
            assert model.config._attn_implementation == name


def test_s2_fa2_evaluates_with_transformers_own_flash_path(monkeypatch):
    """Out of training, `s2_fa2` is transformers' flash_attention_2 function, which imports the kernel its config
    names: it must be told flash_attention_2 (not s2_fa2, which it would look for on the Hub). Kernel: the
    stand-in, handed to transformers' own lazy import."""
    from transformers import modeling_flash_attention_utils as fa_utils

    stand_in = FlashStandIn(strict=True)
    imported = []

    def lazy_imports(implementation, *args, **kwargs):
        imported.append(implementation)
        return flash_attn_func, stand_in, None, fa_utils._pad_input, fa_utils._unpad_input

    monkeypatch.setattr(fa_utils, "_lazy_imports", lazy_imports)
    monkeypatch.setattr(fa_utils, "_loaded_implementation", None)
    model, reference = stock_pair(torch.bfloat16)
    model.config._attn_implementation = "s2_fa2"  # set_attn_implementation would look for the real flash_attn
    reference.set_attn_implementation("sdpa")
    inputs = model_inputs("padded")
    with torch.no_grad():
        got, want = (m.eval()(**inputs).logits for m in (model, reference))
    assert imported == ["flash_attention_2"] and stand_in.calls
    real = inputs["attention_mask"][..., None].bool()
    torch.testing.assert_close(got * real, want * real, atol=5e-2, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# the route S² takes with sdpa on CUDA: `S2FlashCPU` is CPU-only, so regular rows go through `regular_half`


def count_regular_halves(monkeypatch) -> list:
    """Record each call of `regular_half` (the CUDA route on regular rows); returns the list it appends to."""
    calls, regular_half = [], s2_module.regular_half

    def counted(*args, **kwargs):
        calls.append(True)
        return regular_half(*args, **kwargs)

    monkeypatch.setattr(s2_module, "regular_half", counted)
    return calls


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_forced_cuda_sdpa_route_matches_reference(monkeypatch, case):
    """sdpa without `S2FlashCPU`, as on CUDA: regular rows through `regular_half`, the others binned; float64."""
    monkeypatch.setattr(s2_module, "cpu_flash_usable", lambda *args: False)
    regular_halves = count_regular_halves(monkeypatch)
    layout = LAYOUTS[case]
    out = check_against_reference(layout, torch.float64, "sdpa", F64, F64)
    assert "S2Flash" not in type(out.grad_fn).__name__
    assert len(regular_halves) == (2 if layout.build().regular else 0)


@pytest.mark.parametrize("shift", ["segments", "roll"])
def test_forced_cuda_sdpa_route_model_step_equals_cpu_route(monkeypatch, shift):
    """The model on the CUDA route (`regular_half` with sdpa) against the same model on the CPU route
    (`S2FlashCPU`), float64, rows of 26 tokens (a remainder group)."""
    stock, model = pair(s2_group_size=6, s2_shift=shift)
    reference = longlora_from(stock, "sdpa", s2_group_size=6, s2_shift=shift)
    cpu_flash_usable = s2_module.cpu_flash_usable
    in_reference = []  # non-empty while the reference runs its forward: it keeps the CPU route
    reference.register_forward_pre_hook(lambda *_: in_reference.append(True))
    reference.register_forward_hook(lambda *_: in_reference.clear())
    monkeypatch.setattr(s2_module, "cpu_flash_usable", lambda *args: bool(in_reference) and cpu_flash_usable(*args))
    regular_halves = count_regular_halves(monkeypatch)
    ids = torch.randint(3, 384, (2, 26), generator=torch.Generator().manual_seed(0))
    assert_same_training_step(model.double(), reference.double(), {"input_ids": ids}, atol=1e-10)
    assert len(regular_halves) == 2 * model.config.num_hidden_layers  # the patched model only


# ----------------------------------------------------------------------------------------------------------
# what the kernel is handed: one half-precision dtype under autocast, and no host syncs on regular rows


@pytest.mark.parametrize("model_kind", ["longlora", "s2_fa2"])
def test_flash_under_autocast_with_float32_weights(monkeypatch, model_kind):
    """`Trainer(bf16=True)` on a float32 model: autocast makes the projections bf16 while RoPE (fp32 cos/sin)
    returns fp32 q/k next to a bf16 v, which flash-attn refuses. They are cast to bf16 first, as transformers
    does, for LlamaLongLoRA and for the generic `s2_fa2` function; the step matches sdpa under the same autocast."""
    stand_in = use_flash_stand_in(monkeypatch, strict=True)
    if model_kind == "longlora":
        model, reference = flash_pair(torch.float32, s2_group_size=6)
    else:
        model, reference = stock_pair(torch.float32)
        model.set_attn_implementation("s2_fa2")
        reference.set_attn_implementation("s2_reference_test")
    inputs = model_inputs("padded")
    real = inputs["attention_mask"][..., None]
    losses = []
    for candidate in (model, reference):
        candidate.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = candidate(**inputs).logits
        losses.append((logits.float() * real).square().mean())
        losses[-1].backward()
    assert stand_in.calls and all(call.dtypes == (torch.bfloat16,) * 3 for call in stand_in.calls)
    torch.testing.assert_close(losses[0], losses[1], atol=5e-2, rtol=5e-2)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_flash_refuses_float32_without_autocast_with_the_fix_named(monkeypatch):
    use_flash_stand_in(monkeypatch, strict=True)
    model, _ = flash_pair(torch.float32, s2_group_size=6)
    model.train()
    with pytest.raises(ValueError, match=r"float16 or bfloat16 only.*dtype=torch.bfloat16.*bf16=True"):
        model(**model_inputs("padded"))


@pytest.mark.parametrize("shift", ["segments", "roll"])
def test_flash_on_regular_rows_reads_its_runs_off_the_plan(monkeypatch, shift):
    """Unpadded, unpacked rows: cu_seqlens come from the plan, on the host (no `real_runs`, whose nonzero,
    unique_consecutive and max each wait for the GPU), and the kernel gets views of q/k/v, no gathered copies."""
    stand_in = use_flash_stand_in(monkeypatch, strict=False)

    def no_segments(*args):
        raise AssertionError("regular rows must not go through real_runs")

    monkeypatch.setattr(s2_flash, "real_runs", no_segments)
    case = Layout(shift, seq_len=22, group=8)
    check_against_reference(case, torch.float64, "flash_attention_2", F64, F64)
    plain, shifted = (call.cu_seqlens_q for call in stand_in.calls[:2])
    # rows of 22 tokens in groups of 8; the shifted half: [0, 4), [4, 12), [12, 20), [20, 22), or the rolled row
    runs = {"plain": [8, 8, 6], "segments": [4, 8, 8, 2], "roll": [8, 8, 6]}
    assert plain == list(itertools.accumulate([0] + runs["plain"] * 2))
    assert shifted == list(itertools.accumulate([0] + runs[shift] * 2))


@pytest.mark.parametrize("backend", ["sdpa", "eager", "flash_attention_2"])
def test_a_batch_of_padding_only_gives_zeros(monkeypatch, backend):
    """A batch with no real token (possible at the end of a filtered or packed dataset) is all zeros, with zero
    gradients, instead of an index error in the bins or an empty max in the flash path."""
    use_flash_stand_in(monkeypatch, strict=False)
    case = Layout(padding=torch.zeros(2, 16, dtype=torch.long))
    inputs = layout_inputs(case, torch.float64)
    out = s2_attention(*inputs, case.build(), SCALE, 0.0, backend)
    assert out.shape == (2, 16, 4, DIM) and not out.any()
    grads = torch.autograd.grad(out.sum(), inputs, allow_unused=True, materialize_grads=True)
    assert all(not grad.any() for grad in grads)
