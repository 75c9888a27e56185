"""FlexAttention and flash-attention backends of S². FlexAttention has no backward on CPU (torch 2.13), so
only its forward is checked here; gradients and flash-attention run under the `gpu` marker."""

import importlib.util

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

from longlora_hub.remote_code import s2_flex
from longlora_hub.remote_code.s2_attention import build_s2_layout, s2_attention
from longlora_hub.testing import LargestTensor, reference_attention, s2_reference_mask

from .helpers import assert_same_training_step, longlora_from, pair

N, G = 32, 8
PAD = torch.tensor([[0, 0, 0] + [1] * 29, [1] * 27 + [0] * 5])
PACK = torch.tensor([list(range(10)) + list(range(18)) + list(range(4))] * 2)
CASES = {
    "segments": ("segments", None, None),
    "roll": ("roll", None, None),
    "padded": ("segments", PAD, None),
    "packed": ("segments", None, PACK),
}


def run_case(backend, case, device="cpu", dtype=torch.float32, backward=False):
    shift, pad, pos = CASES[case]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen) for shape in [(2, 4, N, 16), (2, 2, N, 16), (2, 2, N, 16)])
    mask = s2_reference_mask(N, G, shift, pad, pos, 2)
    ref_inputs = [t.clone().requires_grad_(backward) for t in (q, k, v)]
    ref = reference_attention(*ref_inputs, mask, 0.25)
    if pad is not None:
        ref = ref * pad[:, :, None, None]
    inputs = [t.to(device, dtype).requires_grad_(backward) for t in (q, k, v)]
    layout = build_s2_layout(
        N,
        2,
        G,
        shift,
        padding_mask=None if pad is None else pad.to(device),
        position_ids=None if pos is None else pos.to(device),
    )
    out = s2_attention(*inputs, layout, 0.25, 0.0, backend)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float().cpu(), ref, atol=atol, rtol=0)
    if backward:
        grad = torch.randn(ref.shape, generator=gen)
        ref.backward(grad)
        out.backward(grad.to(device, dtype))
        for got, want in zip(inputs, ref_inputs, strict=True):
            torch.testing.assert_close(got.grad.float().cpu(), want.grad, atol=atol * 5, rtol=0)


@pytest.mark.slow
def test_flex_forward_matches_reference_on_cpu():
    for case in CASES:  # same shapes: one compilation
        run_case("flex_attention", case)


needs_flash = pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn not installed")


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_flex_forward_and_backward_on_gpu(case):
    run_case("flex_attention", case, device="cuda", backward=True)


@pytest.mark.gpu
@needs_flash
@pytest.mark.parametrize("case", list(CASES))
def test_flash_attention_matches_reference(case):
    run_case("flash_attention_2", case, device="cuda", dtype=torch.bfloat16, backward=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex_attention", pytest.param("flash_attention_2", marks=needs_flash)])
def test_model_training_step_on_gpu(backend):
    stock, model = pair(s2_group_size=6)
    reference = longlora_from(stock, "sdpa").cuda()
    model = model.cuda()
    model.set_attn_implementation(backend)
    dtype = torch.bfloat16 if backend == "flash_attention_2" else torch.float32
    model, reference = model.to(dtype), reference.to(dtype)
    ids = torch.randint(3, 384, (2, 24), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    assert_same_training_step(model, reference, {"input_ids": ids, "attention_mask": mask}, atol=5e-2)


# ----------------------------------------------------------------------------------------------------------
# the flex block mask and the shapes flex is compiled for

FLEX_LAYOUTS = {
    "segments": dict(shift="segments"),
    "roll": dict(shift="roll"),
    "none": dict(shift="none"),
    "padded": dict(shift="segments", padding=True),
    "packed": dict(shift="segments", packed=True),
}


def flex_inputs(seq_len, batch, padding=False, packed=False):
    """(padding_mask, position_ids) for a flex case: left padding in the first row and right padding in the last,
    or two documents per row."""
    pad = pos = None
    if padding:
        pad = torch.ones(batch, seq_len, dtype=torch.long)
        pad[0, : seq_len // 5] = 0
        pad[-1, seq_len - seq_len // 7 :] = 0
    if packed:
        cut = seq_len // 3 + 5
        pos = torch.cat([torch.arange(cut), torch.arange(seq_len - cut)])[None].expand(batch, -1)
    return pad, pos


def flex_layout(seq_len, group, shift, padding=False, packed=False, batch=2):
    pad, pos = flex_inputs(seq_len, batch, padding, packed)
    return build_s2_layout(seq_len, batch, group, shift, padding_mask=pad, position_ids=pos)


@pytest.mark.parametrize("case", list(FLEX_LAYOUTS))
@pytest.mark.parametrize("seq_len, group", [(300, 40), (600, 256), (130, 64)])
def test_flex_block_mask_is_the_one_create_block_mask_builds(case, seq_len, group):
    """Our block mask (per half of the heads, in chunks of query rows) has exactly the blocks, partial and full,
    that torch's `create_block_mask` finds on the dense mask, at the padded length the kernel runs at; and its
    rule is the dense reference's, position by position."""
    from torch.nn.attention.flex_attention import create_block_mask

    spec = dict(FLEX_LAYOUTS[case])
    shift = spec.pop("shift")
    batch, heads, split, length = 2, 5, 3, s2_flex._flex_length(seq_len)
    pad, pos = flex_inputs(seq_len, batch, **spec)
    layout = build_s2_layout(seq_len, batch, group, shift, padding_mask=pad, position_ids=pos)
    ours = s2_flex._flex_block_mask(layout, heads, split, length)
    theirs = create_block_mask(ours.mask_mod, batch, heads, length, length, device="cpu")
    assert ours.kv_num_blocks.shape[:2] == (1 if layout.regular else batch, heads)  # regular rows: broadcast

    def full_blocks(mask):
        return BlockMask.from_kv_blocks(mask.full_kv_num_blocks, mask.full_kv_indices).to_dense()

    for row in range(batch):
        mine = 0 if layout.regular else row
        torch.testing.assert_close(ours.to_dense()[mine], theirs.to_dense()[row])
        torch.testing.assert_close(full_blocks(ours)[mine], full_blocks(theirs)[row])
    reference = s2_reference_mask(seq_len, group, shift, pad, pos, batch)  # (B, 2, N, N)
    q, kv = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None, :]
    for row in range(batch):
        itself = (q == kv) & ~layout.valid[row][:, None]  # padding attends to itself only
        for head in (0, heads - 1):
            got = ours.mask_mod(torch.tensor(row), torch.tensor(head), q, kv)
            assert torch.equal(got, reference[row, int(head >= split)] | itself), (row, head)


def test_flex_block_mask_never_builds_the_dense_mask():
    """At B=8, H=32, N=1024 the dense mask has 268M entries; building ours touches at most one chunk of
    2 x N x N, however many rows and heads."""
    layout = flex_layout(1024, 256, "segments", padding=True, batch=8)
    with LargestTensor() as probe:
        s2_flex._flex_block_mask(layout, 32, 16, 1024)
    assert probe.largest <= 2 * 1024 * 1024 < 8 * 32 * 1024 * 1024 // 64


def test_flex_lengths_are_a_few_buckets():
    lengths = [s2_flex._flex_length(n) for n in range(1, 70_000)]
    assert sorted(set(lengths))[:8] == [128, 192, 256, 384, 512, 768, 1024, 1536]
    assert all(n <= length <= max(128, 1.5 * n) for n, length in zip(range(1, 70_000), lengths, strict=True))
    assert len({length for length in lengths if 1024 < length <= 65536}) == 12  # two per doubling


@pytest.mark.slow
def test_flex_compiles_once_per_bucket_not_per_length():
    """LongQA batches vary in length: within one bucket (257..384 tokens) flex is compiled once, and the
    padded run equals the dense reference at every length."""
    from torch._dynamo.utils import counters

    s2_flex._compiled_flex = None
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    for seq_len in (260, 301, 384, 333):
        gen = torch.Generator().manual_seed(seq_len)
        q, k, v = (torch.randn(1, heads, seq_len, 16, generator=gen) for heads in (4, 2, 2))
        layout = flex_layout(seq_len, 64, "segments", padding=seq_len == 333, batch=1)
        out = s2_attention(q, k, v, layout, 0.25, 0.0, "flex_attention")
        pad = None if layout.regular else layout.valid.long()
        ref = reference_attention(q, k, v, s2_reference_mask(seq_len, 64, "segments", pad, None, 1), 0.25)
        ref = ref if pad is None else ref * pad[:, :, None, None]
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] - before == 1
