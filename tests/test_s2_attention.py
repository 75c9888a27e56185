"""S²-Attn against its dense-mask reference: forward and gradients, every CPU backend, both shift modes,
padding, packing, GQA/MQA, odd lengths; and the memory promise (no N x N tensor)."""

import pytest
import torch

from longlora_hub.remote_code.s2_attention import build_s2_layout, s2_attention, s2_group_size
from longlora_hub.testing import LargestTensor, paper_roll_s2, reference_attention, s2_reference_mask

CPU_BACKENDS = ["sdpa", "eager"]
DIM = 8
SCALE = DIM**-0.5


def qkv(batch, q_heads, kv_heads, seq_len, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, q_heads, seq_len, DIM), (batch, kv_heads, seq_len, DIM), (batch, kv_heads, seq_len, DIM)]
    return [torch.randn(shape, generator=gen, dtype=torch.float32, requires_grad=True) for shape in shapes]


def forward_and_grads(fn, tensors, seed=1):
    out = fn(*tensors)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return out, torch.autograd.grad(out, tensors, grad_out)


def assert_matches_reference(
    backend, shift, batch, q_heads, kv_heads, seq_len, group, padding_mask=None, position_ids=None
):
    tensors = qkv(batch, q_heads, kv_heads, seq_len)
    layout = build_s2_layout(seq_len, batch, group, shift, padding_mask=padding_mask, position_ids=position_ids)
    mask = s2_reference_mask(seq_len, group, shift, padding_mask, position_ids, batch)
    out, grads = forward_and_grads(lambda q, k, v: s2_attention(q, k, v, layout, SCALE, 0.0, backend), tensors)
    ref, ref_grads = forward_and_grads(lambda q, k, v: reference_attention(q, k, v, mask, SCALE), tensors)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shift", ["segments", "roll"])
@pytest.mark.parametrize(
    "seq_len,group",
    [(16, 4), (18, 4), (22, 6), (8, 8), (8, 16), (5, 2)],
    ids=["multiple", "remainder", "remainder6", "one-group", "G>N", "tiny"],
)
def test_matches_dense_reference(backend, shift, seq_len, group):
    assert_matches_reference(backend, shift, 2, 4, 2, seq_len, group)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("heads", [(4, 4), (4, 1), (6, 2), (3, 1), (3, 3), (2, 1), (8, 2)])
def test_gqa_mqa_and_head_counts(backend, heads):
    assert_matches_reference(backend, "segments", 1, *heads, 12, 4)
    assert_matches_reference(backend, "roll", 1, *heads, 12, 4)


def test_roll_reference_is_the_papers_pseudo_code():
    q, k, v = (t.detach() for t in qkv(2, 4, 4, 16))
    mask = s2_reference_mask(16, 4, "roll", batch_size=2)
    torch.testing.assert_close(paper_roll_s2(q, k, v, 4, SCALE), reference_attention(q, k, v, mask, SCALE))


def test_roll_leaks_and_segments_do_not():
    """The paper's cyclic roll lets the first G/2 tokens see the end of the row; segments never look ahead."""
    roll = s2_reference_mask(16, 4, "roll")[0, 1]
    segments = s2_reference_mask(16, 4, "segments")[0, 1]
    assert roll.triu(1).any()
    assert not segments.triu(1).any()
    assert not s2_reference_mask(16, 4, "segments")[0, 0].triu(1).any()


def test_unshifted_heads_are_causal_when_group_covers_the_row():
    mask = s2_reference_mask(10, 10, "segments")[0, 0]
    assert torch.equal(mask, torch.ones(10, 10, dtype=torch.bool).tril())
    q, k, v = (t.detach() for t in qkv(1, 2, 2, 10))
    layout = build_s2_layout(10, 1, 10)
    out = s2_attention(q, k, v, layout, SCALE)[:, :, 0]
    full = torch.nn.functional.scaled_dot_product_attention(q[:, :1], k[:, :1], v[:, :1], is_causal=True)
    torch.testing.assert_close(out, full[:, 0])


LEFT_RIGHT = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 11 + [0] * 5])
PACKED = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2], list(range(16))])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "padding_mask,position_ids", [(LEFT_RIGHT, None), (None, PACKED), (LEFT_RIGHT, PACKED)], ids=["pad", "pack", "both"]
)
def test_padding_and_packing_match_reference(backend, padding_mask, position_ids):
    assert_matches_reference(backend, "segments", 2, 4, 2, 16, 4, padding_mask, position_ids)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_each_padded_row_equals_the_row_alone(backend):
    """The reference implementation lays groups out from the longest row; here each row is its own sequence."""
    q, k, v = (t.detach() for t in qkv(2, 4, 2, 16))
    layout = build_s2_layout(16, 2, 4, padding_mask=LEFT_RIGHT)
    out = s2_attention(q, k, v, layout, SCALE, backend=backend)
    for row in range(2):
        real = LEFT_RIGHT[row].bool()
        n = int(real.sum())
        alone = s2_attention(*(t[row : row + 1][:, :, real] for t in (q, k, v)), build_s2_layout(n, 1, 4), SCALE)
        torch.testing.assert_close(out[row, real], alone[0], atol=1e-6, rtol=0)
        assert torch.all(out[row, ~real] == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_each_packed_document_equals_the_document_alone(backend):
    q, k, v = (t.detach() for t in qkv(1, 4, 2, 16))
    out = s2_attention(q, k, v, build_s2_layout(16, 1, 4, position_ids=PACKED[:1]), SCALE, backend=backend)
    for start, end in [(0, 5), (5, 13), (13, 16)]:
        piece = [t[:, :, start:end] for t in (q, k, v)]
        alone = s2_attention(*piece, build_s2_layout(end - start, 1, 4), SCALE, backend=backend)
        torch.testing.assert_close(out[:, start:end], alone, atol=1e-6, rtol=0)


def test_documents_and_padding_do_not_leak():
    """Changing another document (or the padding) must not change a document's output or gradients."""
    q, k, v = (t.detach() for t in qkv(1, 4, 2, 16))
    layout = build_s2_layout(16, 1, 4, position_ids=PACKED[:1])
    base = s2_attention(q, k, v, layout, SCALE)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 5:13] += 3.0
    v2[:, :, 5:13] -= 2.0
    changed = s2_attention(q, k2, v2, layout, SCALE)
    torch.testing.assert_close(changed[:, :5], base[:, :5])
    torch.testing.assert_close(changed[:, 13:], base[:, 13:])
    assert not torch.allclose(changed[:, 5:13], base[:, 5:13])


def test_roll_refuses_padding_and_packing():
    with pytest.raises(ValueError, match="segments"):
        build_s2_layout(16, 2, 4, "roll", padding_mask=LEFT_RIGHT)
    with pytest.raises(ValueError, match="segments"):
        build_s2_layout(16, 2, 4, "roll", position_ids=PACKED)


def test_all_ones_mask_and_plain_positions_take_the_fast_path():
    layout = build_s2_layout(16, 2, 4, padding_mask=torch.ones(2, 16), position_ids=torch.arange(16)[None] + 7)
    assert layout.regular


def test_group_size_rules():
    assert s2_group_size(4096) == 1024
    assert s2_group_size(1000, ratio=0.25) == 250
    assert s2_group_size(1002, ratio=0.25) == 250  # 250.5 -> 250, kept even
    assert s2_group_size(30, ratio=0.1) == 2  # 3 -> 2
    assert s2_group_size(4096, group_size=512) == 512
    with pytest.raises(ValueError, match="even"):
        build_s2_layout(16, 1, 3)
    with pytest.raises(ValueError, match="heads"):
        q, k, v = (t.detach() for t in qkv(1, 1, 1, 8))
        s2_attention(q, k, v, build_s2_layout(8, 1, 4), SCALE)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("padded", [False, True])
def test_no_n_by_n_tensor_is_built(backend, padded):
    """Mask and score memory stay O(N * G): the largest tensor (forward and backward) is far below N x N."""
    n, group, heads = 2048, 128, 2
    q, k, v = qkv(1, heads, heads, n)
    mask = torch.ones(1, n, dtype=torch.bool)
    if padded:
        mask[0, :100] = False
    layout = build_s2_layout(n, 1, group, padding_mask=mask, position_ids=torch.arange(n)[None])
    assert layout.regular != padded
    with LargestTensor() as probe:
        s2_attention(q, k, v, layout, SCALE, backend=backend).sum().backward()
    assert probe.largest <= heads * (2 * n // group + 2) * group * group < n * n
