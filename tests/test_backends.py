"""FlexAttention and flash-attention backends of S². FlexAttention has no backward on CPU (torch 2.13), so
only its forward is checked here; gradients and flash-attention run under the `gpu` marker."""

import importlib.util

import pytest
import torch

from longlora_hub.remote_code.s2_attention import build_s2_layout, s2_attention
from longlora_hub.testing import reference_attention, s2_reference_mask

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
