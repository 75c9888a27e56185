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
@pytest.mark.parametrize("shift", ["segments", "roll", "none"])
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
    assert_matches_reference(backend, "none", 2, 4, 2, 16, 4, padding_mask, position_ids)


def test_no_shift_puts_every_head_on_the_same_groups():
    """`"none"` is the paper's "short attention" ablation: both halves of the heads see only their own group, so
    the output of a token never depends on another group, unlike with the shift."""
    mask = s2_reference_mask(16, 4, "none")[0]
    assert torch.equal(mask[0], mask[1])
    assert not torch.equal(mask[1], s2_reference_mask(16, 4, "segments")[0, 1])
    q, k, v = (t.detach() for t in qkv(1, 4, 2, 16))
    changed = [t.clone() for t in (k, v)]
    for t in changed:
        t[:, :, 0:4] += 1.0  # the first group only
    for shift, isolated in (("none", True), ("segments", False)):
        layout = build_s2_layout(16, 1, 4, shift)
        same = torch.allclose(
            s2_attention(q, k, v, layout, SCALE)[:, 4:], s2_attention(q, *changed, layout, SCALE)[:, 4:]
        )
        assert same is isolated


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


# ----------------------------------------------------------------------------------------------------------
# the CPU flash path (sdpa backend, regular rows): one output and one gradient per input, nothing half-sized


def allocator_peak(fn) -> int:
    """Peak growth of the bytes held by torch's CPU allocator while `fn()` runs, replayed from the profiler's memory
    events (tensors and the kernels' scratch buffers)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [event for event in prof.profiler.kineto_results.events() if event.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def test_cpu_sdpa_takes_the_flash_path_and_falls_back():
    q, k, v = qkv(2, 4, 2, 16)
    regular = build_s2_layout(16, 2, 4)
    assert type(s2_attention(q, k, v, regular, SCALE).grad_fn).__name__ == "S2FlashCPUBackward"
    padded = build_s2_layout(16, 2, 4, padding_mask=LEFT_RIGHT)
    assert "S2Flash" not in type(s2_attention(q, k, v, padded, SCALE).grad_fn).__name__
    dropout = s2_attention(q, k, v, regular, SCALE, dropout=0.1)
    assert "S2Flash" not in type(dropout.grad_fn).__name__
    assert "S2Flash" not in type(s2_attention(q, k, v, regular, SCALE, backend="eager").grad_fn).__name__


@pytest.mark.parametrize("shift", ["segments", "roll"])
def test_flash_path_holds_one_output_and_one_gradient_per_input(shift):
    """The peak of forward + backward is what full attention holds (the output and the three gradients) plus one
    kernel call's blocks and the kernel's scratch: no per-group outputs kept for the backward, no per-half gradients
    waiting to be joined (those cost 1.25 outputs more)."""
    n, group, heads, dim = 16384, 1024, 8, 32
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, heads, dim, generator=gen).requires_grad_() for _ in range(3))  # (B, N, H, D)
    grad_out = torch.randn(1, n, heads, dim, generator=gen)
    layout = build_s2_layout(n, 1, group, shift)
    grads = []

    def step():
        out = s2_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout, SCALE)  # (B, N, H, D)
        grads[:] = torch.autograd.grad(out, (q, k, v), grad_out)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a backward call covers one (group, head) pair per thread, and 4096 tokens
    try:
        peak = allocator_peak(step)
    finally:
        torch.set_num_threads(threads)
    output = grad_out.nbytes  # 16 MiB
    # one backward call (4 groups x 2 heads): three gradients and the output gradient's copy, 4 x 1 MiB; the kernel's
    # scratch (2 MiB on 2 threads) and the log-sum-exp (0.5 MiB); the roll also gathers its wrapped group
    assert peak <= 4 * output + output // 4 + (3 << 20) + (output // 8 if shift == "roll" else 0)
    assert all(g.stride() == x.stride() for g, x in zip(grads, (q, k, v), strict=True))  # the inputs' layout


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_flash_path_under_gradient_checkpointing(use_reentrant):
    layout = build_s2_layout(18, 2, 4)
    grad_out = torch.randn(2, 18, 4, DIM, generator=torch.Generator().manual_seed(1))  # (B, N, Hq, D)

    def attend(q, k, v):
        return s2_attention(q, k, v, layout, SCALE)

    plain, checkpointed = qkv(2, 4, 2, 18), qkv(2, 4, 2, 18)
    out = attend(*plain)
    out.backward(grad_out)
    recomputed = torch.utils.checkpoint.checkpoint(attend, *checkpointed, use_reentrant=use_reentrant)
    recomputed.backward(grad_out)  # .backward(): reentrant checkpointing does not support autograd.grad
    torch.testing.assert_close(recomputed, out, atol=0, rtol=0)
    for got, want in zip(checkpointed, plain, strict=True):
        torch.testing.assert_close(got.grad, want.grad, atol=0, rtol=0)


@pytest.mark.parametrize("heads", [(4, 4), (4, 1), (6, 2)])
def test_flash_path_in_bfloat16_matches_the_reference(heads):
    q, k, v = (t.detach() for t in qkv(1, *heads, 40))
    mask = s2_reference_mask(40, 8, "segments", batch_size=1)
    ref = reference_attention(q, k, v, mask, SCALE)
    low = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out = s2_attention(*low, build_s2_layout(40, 1, 8), SCALE)
    assert type(out.grad_fn).__name__ == "S2FlashCPUBackward"
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=0)
    out.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.isfinite().all() for t in low)


def test_flex_attention_refuses_dropout_it_cannot_apply():
    """flex_attention has no dropout: a model config with attention_dropout > 0 must not train without it silently
    (eager, sdpa and flash apply it)."""
    q, k, v = (t.detach() for t in qkv(1, 4, 4, 16))
    layout = build_s2_layout(16, 1, 8)
    with pytest.raises(ValueError, match="attention_dropout=0.1 cannot be applied with flex_attention"):
        s2_attention(q, k, v, layout, SCALE, dropout=0.1, backend="flex_attention")


# ----------------------------------------------------------------------------------------------------------
# devices: a model split with device_map, and SDPA's kernels on CUDA


def test_a_layout_follows_the_layer_to_its_device():
    """With `device_map` the layout is built on the first layer's device; a layer elsewhere gets a copy on its
    own device, made once and reused (meta stands in for a second GPU)."""
    pad = torch.ones(2, 12, dtype=torch.long)
    pad[0, :3] = 0
    layout = build_s2_layout(12, 2, 4, padding_mask=pad)
    assert layout.on(torch.device("cpu")) is layout
    moved = layout.on(torch.device("meta"))
    assert moved is layout.on(torch.device("meta"))
    assert {x.device.type for x in (moved.valid, moved.doc, moved.local)} == {"meta"}
    assert (moved.group_size, moved.shift, moved.regular) == (layout.group_size, layout.shift, layout.regular)


def test_s2_attention_runs_on_the_device_of_its_inputs(monkeypatch):
    """`s2_attention` reads the layout on q's device, not the device it was built on."""
    from longlora_hub.remote_code import s2_attention as s2_module

    seen = []
    real_on = s2_module.S2Layout.on
    monkeypatch.setattr(s2_module.S2Layout, "on", lambda self, device: seen.append(device) or real_on(self, device))
    q, k, v = qkv(1, 4, 2, 16)
    s2_attention(q, k, v, build_s2_layout(16, 1, 4), SCALE, 0.0, "eager")
    assert seen == [q.device]


def test_sdpa_with_a_mask_repeats_key_value_heads_off_cpu():
    """On CUDA, SDPA with both a mask and `enable_gqa` has no fused kernel: there the key/value heads are repeated
    (as transformers' `use_gqa_in_sdpa` decides); without a mask, or on CPU, `enable_gqa` is kept."""
    from longlora_hub.remote_code.s2_dense import _sdpa_key_value

    for device in ("cpu", "meta"):
        q, k, v = (torch.empty(2, heads, 8, 4, device=device) for heads in (4, 2, 2))
        assert _sdpa_key_value(q, k, v, None) == (k, v, True)
        mask = torch.ones(2, 1, 8, 8, dtype=torch.bool, device=device)
        key, value, gqa = _sdpa_key_value(q, k, v, mask)
        if device == "cpu":
            assert (key, value, gqa) == (k, v, True)
        else:
            assert key.shape == value.shape == q.shape and not gqa
        assert _sdpa_key_value(q, q, q, mask) == (q, q, False)


def test_the_one_group_rule_by_hand():
    """`s2_groups`, the rule every kernel path reads (through `token_groups` or `group_plan`), on rows written out by
    hand: N = 10 or 8, G = 4."""
    from longlora_hub.remote_code.s2_layout import group_plan, s2_groups, token_groups

    index = torch.arange(10)
    cases = {
        ("segments", False): [0, 0, 0, 0, 1, 1, 1, 1, 2, 2],
        ("segments", True): [0, 0, 1, 1, 1, 1, 2, 2, 2, 2],
        ("none", True): [0, 0, 0, 0, 1, 1, 1, 1, 2, 2],
        ("roll", True): [2, 2, 0, 0, 0, 0, 1, 1, 1, 1],  # the row rolled by -2: tokens 0 and 1 go last
    }
    for (shift, shifted), want in cases.items():
        group, order = s2_groups(index, index, 10, 4, shift, shifted)
        assert group.tolist() == want, (shift, shifted)
        # the batch form agrees, with one id per (document, group)
        layout = build_s2_layout(10, 1, 4, shift)
        assert token_groups(layout, shifted)[0][0].tolist() == want
    assert s2_groups(index, index, 10, 4, "roll", True)[1].tolist() == [8, 9, 0, 1, 2, 3, 4, 5, 6, 7]
    assert s2_groups(3, 3, 10, 4, "segments", True) == (1, 3)  # plain ints too
    assert group_plan(10, 4, "segments", True) == [[(0, 2)], [(2, 6)], [(6, 10)]]
    assert group_plan(10, 4, "roll", True) == [[(2, 6)], [(6, 10)], [(0, 2)]]
    assert group_plan(8, 4, "roll", True) == [[(2, 6)], [(6, 8), (0, 2)]]  # the wrapped group, in causal order
    assert group_plan(8, 4, "none", True) == group_plan(8, 4, "roll", False) == [[(0, 4)], [(4, 8)]]
    # a packed row: groups restart with each document, and a document's groups never meet another's
    packed = build_s2_layout(8, 1, 4, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]))
    ids = token_groups(packed, True)[0][0].tolist()
    assert ids[:3] == [ids[0]] * 2 + [ids[2]] and len(set(ids[:3]) & set(ids[3:])) == 0
    assert [ids[3:].count(i) for i in dict.fromkeys(ids[3:])] == [2, 3]  # [0, 2), [2, 5) of the second document
