"""Shifted sparse attention (S²-Attn) from LongLoRA (arXiv 2309.12307), for training only.

The algorithm, whole: split the N tokens of a row into groups of G tokens (G = N / 4 by default) and let each token
attend causally to the tokens of its own group only. Half of the heads use the groups [0, G), [G, 2G), ...; the
other half use groups shifted by G/2, [0, G/2), [G/2, 3G/2), ..., so that information flows from each group to the
next. RoPE is applied with the true positions before grouping. `s2_attention` below is that, for every kernel; the
rule saying which group each token is in is `s2_layout.s2_groups`. Evaluation and generation use full attention.

Two other shifts exist (config `s2_shift`): `"roll"`, the paper's pseudo-code, rolls the shifted heads by -G/2
cyclically, so its last group lets the first G/2 tokens see the row's end (a leak, kept only to reproduce the
paper); `"none"` shifts nothing (the paper's "short attention" ablation). Groups are laid out on each token's
position in its own sequence: every row of a padded batch, and every document of a packed row, gets what it would
get alone. No N x N mask is built anywhere: at most (N / G + 1) x G x G.

The files, one per kernel path: `s2_layout.py` (the groups), `s2_dense.py` (eager and sdpa), `s2_cpu_flash.py`
(sdpa on CPU, regular rows), `s2_flash.py` (flash-attn 2), `s2_flex.py` (FlexAttention), `s2_context_parallel.py`
(a row over several processes). `s2_attention_forward` has the transformers attention-function signature and is
registered as `s2_eager`, `s2_sdpa`, `s2_flex_attention` and `s2_fa2`, so that any model (Mistral, Qwen2, ...) can
train with S² through `attn_implementation`, its settings read from `module.config`. This file is shipped as remote
code: it imports only the standard library, torch, transformers and its sibling files.
"""

from functools import partial

import torch
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_llama_longlora import S2_SHIFTS
from .s2_cpu_flash import S2FlashCPU, cpu_flash_usable, flash_calls
from .s2_dense import attend, binned_half, regular_half
from .s2_flash import flash_half, flash_inputs
from .s2_flex import flex_attention
from .s2_layout import S2Layout, build_s2_layout, group_plan, s2_group_size, s2_layout_for

S2_BACKENDS = ("eager", "sdpa", "flex_attention", "flash_attention_2")
# The `attn_implementation` names of S² for any model. Not "s2_flash_attention_2": transformers takes every name
# containing "flash" for a flash-attn kernel to import by that name, and refuses it.
S2_ATTENTION_NAMES = {
    "eager": "s2_eager",
    "sdpa": "s2_sdpa",
    "flex_attention": "s2_flex_attention",
    "flash_attention_2": "s2_fa2",
}


def s2_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: S2Layout,
    scaling: float,
    dropout: float = 0.0,
    backend: str = "sdpa",
) -> torch.Tensor:
    """S²-Attn over a batch laid out by [`build_s2_layout`].

    Args:
        query (`torch.Tensor` of shape `(B, Hq, N, D)`), key, value (`(B, Hk, N, D)`, Hq a multiple of Hk).
            Cheapest as transposed views of `(B, N, H, D)` tensors, the way attention layers make them.
        backend (`str`): one of `S2_BACKENDS`.

    Returns:
        `torch.Tensor` of shape `(B, N, Hq, D)`, contiguous; padded positions are zero.
    """
    if backend not in S2_BACKENDS:
        raise ValueError(f"S²-Attn supports the backends {S2_BACKENDS}, got {backend!r}.")
    if query.shape[1] < 2:
        raise ValueError("S²-Attn shifts half of the heads: it needs at least 2 attention heads.")
    layout = layout.on(query.device)
    if layout.shard is not None:  # one context-parallel shard: the halo exchange, then S² on the window
        return layout.shard.attend(query, key, value, scaling, dropout, backend)
    if layout.empty:  # all padding: the output is zero there anyway, and no kernel takes zero tokens
        return (query.transpose(1, 2) * 0).contiguous()  # (B, N, Hq, D)
    if backend == "flex_attention":
        if dropout > 0:  # flex_attention has no dropout argument: refuse rather than silently train without it
            raise ValueError(
                f"attention_dropout={dropout} cannot be applied with flex_attention, which has no attention dropout: "
                "set attention_dropout to 0 (LongLoRA trains with none) or use sdpa, eager or flash_attention_2."
            )
        split = query.shape[1] - query.shape[1] // 2
        return flex_attention(query, key, value, layout, split, scaling).transpose(1, 2)

    if backend == "sdpa" and layout.regular and cpu_flash_usable(query, key, value, dropout):
        heads, kv_heads, threads = query.shape[1], key.shape[1], torch.get_num_threads()
        calls = layout.cached(
            f"flash_calls/{heads}/{kv_heads}/{threads}", partial(flash_calls, layout, heads, kv_heads, threads)
        )
        return S2FlashCPU.apply(query, key, value, calls, scaling)  # (B, N, Hq, D)

    _, plain, shifted = _split_heads(query, key, value)
    attend_groups = partial(attend, scaling=scaling, dropout=dropout, backend=backend, layout=layout)
    outputs = []
    # with shift "none" the second half of the heads is laid out exactly like the first
    for heads, is_shifted in ((plain, False), (shifted, layout.shift != "none")):
        if backend == "flash_attention_2":
            out = flash_half(*heads, layout, is_shifted, scaling, dropout)
        elif layout.regular:
            plan = layout.cached(
                f"plan{int(is_shifted)}",
                partial(group_plan, layout.seq_len, layout.group_size, layout.shift, is_shifted),
            )
            token_major = (x.transpose(1, 2) for x in heads)  # (B, N, H/2, D)
            out = regular_half(*token_major, plan, layout.group_size, attend_groups)
        else:
            out = binned_half(*heads, layout, is_shifted, attend_groups)
        outputs.append(out)  # (B, N, Hq/2, D)
    # one copy joins the halves; the result is contiguous, so the model's reshape to (B, N, Hq*D) is a view
    return torch.cat(outputs, dim=2)  # (B, N, Hq, D)


def _split_heads(query, key, value):
    """Unshifted heads first, the last Hq // 2 shifted (the paper's `chunk(2)`). Key/value heads follow their
    query heads; when a key/value head would serve both halves (MQA, odd grouping) it is repeated. One `split`
    per tensor: views, whose backward is one cat (slices would each allocate a full-size zero gradient)."""
    q_heads, kv_heads = query.shape[1], key.shape[1]
    split = q_heads - q_heads // 2
    n_rep = q_heads // kv_heads
    if split % n_rep:
        # repeated in the token-major layout, so that groups stay views: (B, N, Hq, D) memory
        key = key.transpose(1, 2).repeat_interleave(n_rep, dim=2).transpose(1, 2)  # (B, Hq, N, D)
        value = value.transpose(1, 2).repeat_interleave(n_rep, dim=2).transpose(1, 2)  # (B, Hq, N, D)
        n_rep = 1
    kv_split = split // n_rep
    plain, shifted = zip(
        query.split([split, q_heads - split], dim=1),
        key.split([kv_split, key.shape[1] - kv_split], dim=1),
        value.split([kv_split, key.shape[1] - kv_split], dim=1),
        strict=True,
    )
    return split, plain, shifted


def s2_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    backend: str = "sdpa",
    s2_layout: S2Layout | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function (see `AttentionInterface`): S²-Attn while `module` is training and
    there is no KV cache, the plain `backend` otherwise.

    q: (B, Hq, N, D), k/v: (B, Hk, N_kv, D). Returns `(out (B, N, Hq, D), None)`.
    """
    config = getattr(module, "config", None)
    training_s2 = module.training and getattr(config, "s2_attention", True)
    if s2_layout is None and not (training_s2 and query.shape[2] == key.shape[2]):
        return _base_attention(module, query, key, value, attention_mask, scaling, dropout, backend, kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if s2_layout is None:
        s2_layout = s2_layout_for(module, query, attention_mask, kwargs)
    if backend == "flash_attention_2":
        query, key, value = flash_inputs(module, query, key, value)
    return s2_attention(query, key, value, s2_layout, scaling, dropout, backend), None


def _base_attention(module, query, key, value, attention_mask, scaling, dropout, backend, kwargs):
    """Standard attention for evaluation and cached decoding under an `s2_*` name."""
    if backend == "flex_attention" and not isinstance(attention_mask, BlockMask):
        # `s2_flex_attention` is handed the 2D padding mask (see `_register`): build the causal block mask
        from transformers.masking_utils import flex_attention_mask

        q_len, kv_len = query.shape[2], key.shape[2]
        attention_mask = flex_attention_mask(
            query.shape[0],
            q_len,
            kv_len,
            q_offset=kv_len - q_len,
            attention_mask=attention_mask,
            device=query.device,
        )
    if backend == "eager":  # eager is not in the registry: each modeling file has its own, all alike
        from transformers.models.llama.modeling_llama import eager_attention_forward as base
    else:
        base = ALL_ATTENTION_FUNCTIONS[backend]
    if backend == "flash_attention_2":  # transformers' flash function imports the kernel its config names
        module = _SeenAs(module, _SeenAs(module.config, None, _attn_implementation=backend))
    return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


class _SeenAs:
    """An object as a transformers function sees it: every attribute is the object's, except the ones given
    (`config=` for a module, `_attn_implementation=` for a config). Nothing of the original is changed."""

    def __init__(self, target, config=None, **overrides):
        self._target = target
        self.__dict__.update(overrides if config is None else {"config": config, **overrides})

    def __getattr__(self, name):
        return getattr(self._target, name)


def _register() -> None:
    """Expose S² for any model: `attn_implementation="s2_sdpa"` (or s2_eager, s2_flex_attention, s2_fa2).
    Masks are the base backend's, so evaluation is unchanged; FlexAttention gets the 2D padding mask instead of a
    block mask, since S² needs to know the padding."""
    for backend, name in S2_ATTENTION_NAMES.items():
        AttentionInterface.register(name, partial(s2_attention_forward, backend=backend))
        mask_backend = "flash_attention_2" if backend == "flex_attention" else backend
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_backend])


_register()


__all__ = [
    "S2_ATTENTION_NAMES",
    "S2_BACKENDS",
    "S2_SHIFTS",
    "S2Layout",
    "build_s2_layout",
    "flash_inputs",
    "s2_attention",
    "s2_attention_forward",
    "s2_group_size",
]
