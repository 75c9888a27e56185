"""S²-Attn with flash-attn 2 (`flash_attention_2`, `s2_fa2`): each half of the heads is one call of its varlen
kernel, every run of real tokens in one group a sequence of its own, so nothing but those runs is attended. GPU
only, imported on first use; tests run it on CPU with a pure-torch stand-in of the kernel.

This file is shipped as remote code: it imports only torch, transformers and its sibling files.
"""

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from .s2_layout import S2Layout, group_plan, real_runs

_FLASH_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def flash_inputs(module: torch.nn.Module, query, key, value) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q/k/v as flash-attn takes them: one dtype, fp16 or bf16.

    Under autocast with fp32 weights (`Trainer(bf16=True)` on a float32 model), RoPE hands over fp32 q/k next to
    a bf16 v; fp32 norms (PEFT) make fp32 inputs in a bf16 model. They are cast as transformers casts them
    (`get_target_dtype`): to the autocast dtype, else a quantized model's compute dtype, else the layer's weights'."""
    dtypes = {x.dtype for x in (query, key, value)}
    if len(dtypes) == 1 and dtypes <= set(_FLASH_KERNEL_DTYPES):
        return query, key, value
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        target = torch.get_autocast_dtype(device_type)
    elif hasattr(module.config, "_is_quantized"):
        target = module.config.dtype
    else:
        target = next(layer for layer in module.modules() if isinstance(layer, torch.nn.Linear)).weight.dtype
    if target not in _FLASH_KERNEL_DTYPES:
        raise ValueError(
            f"flash_attention_2 runs in float16 or bfloat16 only, but the attention inputs are "
            f"{sorted(map(str, dtypes))} and the model computes in {target}: load the model with "
            "dtype=torch.bfloat16, or train under autocast (bf16=True in the training arguments)."
        )
    return query.to(target), key.to(target), value.to(target)


def _flash_varlen_func() -> Callable:
    """flash-attn's `flash_attn_varlen_func`. GPU only: transformers imports flash-attn here, on first use, never
    when the model is loaded. (The test suite swaps this for a pure-torch stand-in to run the path on CPU.)"""
    from transformers.modeling_flash_attention_utils import lazy_import_flash_attention

    return lazy_import_flash_attention("flash_attention_2")[0][1]


def flash_half(query, key, value, layout: S2Layout, shifted: bool, scaling: float, dropout: float):
    """One half of the heads through flash-attn's varlen kernel, each run of a group one sequence. q: (B, Hq, N, D).
    Returns (B, N, Hq, D), zero at padding."""
    flash_attn_varlen_func = _flash_varlen_func()

    half = layout.group_size // 2
    roll = shifted and layout.shift == "roll"
    if roll:  # the paper's roll on regular rows: each group of the rolled row is contiguous
        query, key, value = (x.roll(-half, dims=2) for x in (query, key, value))
    batch, heads, seq_len, dim = query.shape
    if layout.regular:  # every token is real: the runs are the plan's groups, known on the host, no gather
        cu_seqlens, max_len = layout.cached(f"regular_runs{int(shifted)}", partial(_regular_runs, layout, shifted))
        token_index = None
    else:
        token_index, lengths = layout.cached(f"runs{int(shifted)}", partial(real_runs, layout, shifted))
        cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))  # (S+1,)
        max_len = layout.cached(f"max{int(shifted)}", lambda: int(lengths.max()))

    def flat(x):  # (B, H, N, D) -> (T, H, D): a view of the model's (B, N, H, D) layout when every token is real
        tokens = x.transpose(1, 2).reshape(batch * seq_len, x.shape[1], dim)
        return tokens if token_index is None else tokens[token_index]

    out = flash_attn_varlen_func(
        flat(query),
        flat(key),
        flat(value),
        cu_seqlens,
        cu_seqlens,
        max_len,
        max_len,
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=True,
    )  # (T, Hq, D)
    if token_index is not None:
        out = out.new_zeros(batch * seq_len, heads, dim).index_copy(0, token_index, out)  # (B*N, Hq, D)
    full = out.view(batch, seq_len, heads, dim)  # (B, N, Hq, D)
    return full.roll(half, dims=1) if roll else full


def _regular_runs(layout: S2Layout, shifted: bool) -> tuple[torch.Tensor, int]:
    """`cu_seqlens` (int32, on the layout's device) and the longest run of regular rows, from the plan alone: the
    groups of every row in turn (under the roll, those of the rolled row, in its order)."""
    plan = group_plan(layout.seq_len, layout.group_size, layout.shift, shifted)
    lengths = [sum(end - start for start, end in ranges) for ranges in plan] * layout.batch_size
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    return torch.tensor(bounds, dtype=torch.int32, device=layout.valid.device), max(lengths)


__all__ = ["flash_half", "flash_inputs"]
