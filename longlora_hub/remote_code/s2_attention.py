"""Shifted sparse attention (S²-Attn) from LongLoRA (arXiv 2309.12307), for training only.

The N tokens of a sequence are split into groups of G tokens and attention is causal *within* a group.
The first half of the heads uses the groups [0, G), [G, 2G), ...; the second half uses groups shifted by
G/2 so that information flows between neighbouring groups. Two shift semantics exist:

- ``"segments"`` (default): the shifted heads use [0, G/2), [G/2, 3G/2), ..., ending with the remainder.
  Nothing wraps around, so no token attends to a later one (leak-free).
- ``"roll"``: the paper's pseudo-code, which rolls the shifted heads by -G/2, attends per group and rolls
  back. The roll is cyclic: the last shifted group holds [N-G/2, N) followed by [0, G/2), so the first
  G/2 tokens see the end of the row. Kept only to reproduce the paper.
- ``"none"``: no shift; every head uses [0, G), [G, 2G), ... ("short attention" in the paper's ablation,
  Table 6): groups never exchange information. For ablations only.

Groups are laid out on each token's position *in its own sequence*: padded tokens do not count, and a
packed row (several documents, marked by ``position_ids`` that restart) is split into documents first.
So every row of a padded batch, and every document of a packed row, gets exactly the result it would get
alone with the same G.

Nothing here is Llama-specific: :func:`s2_attention_forward` has the transformers attention-function
signature and is registered in ``AttentionInterface`` as ``s2_eager``, ``s2_sdpa``, ``s2_flex_attention``
and ``s2_fa2`` (flash-attn 2; see `S2_ATTENTION_NAMES`) so that any model using ``ALL_ATTENTION_FUNCTIONS``
(Mistral, Qwen2, ...) can train with it through ``attn_implementation``. It reads its settings from ``module.config``
(``s2_group_size``, ``s2_group_size_ratio``, ``s2_shift``, ``s2_attention``) with the paper's defaults.

This file is shipped as remote code: it imports only the standard library, torch and transformers.
No N x N mask is ever built here: masks are at most (N / G + 1) x G x G. On CPU with the sdpa backend, unpadded
rows go through `_S2FlashCPU`, which holds one output and one gradient per input instead of per-group copies.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

S2_BACKENDS = ("eager", "sdpa", "flex_attention", "flash_attention_2")
S2_SHIFTS = ("segments", "roll", "none")
# The `attn_implementation` names of S² for any model. Not "s2_flash_attention_2": transformers takes every name
# containing "flash" for a flash-attn kernel to import by that name, and refuses it.
S2_ATTENTION_NAMES = {
    "eager": "s2_eager",
    "sdpa": "s2_sdpa",
    "flex_attention": "s2_flex_attention",
    "flash_attention_2": "s2_fa2",
}


def s2_group_size(seq_len: int, group_size: int | None = None, ratio: float = 0.25) -> int:
    """The group size G for a row of `seq_len` tokens: `group_size` if given, else `ratio * seq_len`, rounded
    down to an even number (the shift is G/2) and at least 2."""
    size = group_size if group_size is not None else int(seq_len * ratio)
    return max(2, size - size % 2)


@dataclass
class S2Layout:
    """Where each token sits for S²-Attn. Built once per forward and shared by every layer.

    Attributes:
        group_size (`int`): G.
        shift (`str`): one of `S2_SHIFTS`.
        regular (`bool`): every row is one unpadded sequence, so groups are plain reshapes of the row.
        valid (`torch.BoolTensor` of shape `(B, N)`): real (non-padding) tokens.
        doc (`torch.LongTensor` of shape `(B, N)`): index of the document a token belongs to in its row.
        local (`torch.LongTensor` of shape `(B, N)`): position of a token in its own document, counting real
            tokens only. Groups are `local // G` (unshifted heads) and `(local + G/2) // G` (shifted heads).
        empty (`bool`): no token of the batch is real (all padding): nothing to attend.
        groups (`tuple` of two `torch.LongTensor` of shape `(B, N)`, *optional*): the group of every token for the
            unshifted and the shifted half, given rather than derived from `local` (a context-parallel shard's
            window, where they come from the whole row); tokens are then in causal order within a group.
        shard (*optional*): set on the layout of one context-parallel shard (see `s2_context_parallel`): S² then
            runs on this rank's tokens, with the keys and values it needs from its neighbour.
    """

    group_size: int
    shift: str
    regular: bool
    valid: torch.Tensor
    doc: torch.Tensor
    local: torch.Tensor
    empty: bool = False
    groups: tuple[torch.Tensor, torch.Tensor] | None = None
    shard: object = None
    _derived: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def seq_len(self) -> int:
        return self.valid.shape[1]

    def cached(self, key: str, build: Callable):
        """Backend-specific structures (bins, block masks) are derived once and reused by every layer."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def group_of(self, offset: int) -> torch.Tensor:
        """(B, N) group of every token for the half of the heads laid out with `offset` (0, or G/2 when shifted)."""
        if self.groups is not None:
            return self.groups[int(offset > 0)]
        return (self.local + offset) // self.group_size

    def on(self, device: torch.device) -> "S2Layout":
        """This layout on `device`, copied once and reused: a model split over GPUs (`device_map`) runs its layers
        on several devices, and each layer's structures must live on its own."""
        if self.valid.device == device:
            return self

        def copy():
            moved = (x.to(device) for x in (self.valid, self.doc, self.local))
            groups = None if self.groups is None else tuple(x.to(device) for x in self.groups)
            return S2Layout(self.group_size, self.shift, self.regular, *moved, self.empty, groups, self.shard)

        return self.cached(f"on/{device}", copy)


def build_s2_layout(
    seq_len: int,
    batch_size: int,
    group_size: int,
    shift: str = "segments",
    padding_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> S2Layout:
    """Lay out a batch for S²-Attn.

    Args:
        seq_len (`int`): N, the padded row length.
        batch_size (`int`): B.
        group_size (`int`): G (even, >= 2); see [`s2_group_size`].
        shift (`str`, *optional*, defaults to `"segments"`): one of `S2_SHIFTS`.
        padding_mask (`torch.Tensor` of shape `(B, N)`, *optional*): 1/True for real tokens, 0/False for padding.
        position_ids (`torch.LongTensor` of shape `(B, N)` or `(1, N)`, *optional*): a new document starts
            wherever the position does not follow the previous one by exactly 1 (TRL packing/padding-free).
    """
    if shift not in S2_SHIFTS:
        raise ValueError(f"s2_shift must be one of {S2_SHIFTS}, got {shift!r}.")
    if group_size < 2 or group_size % 2:
        raise ValueError(f"The S² group size must be an even number >= 2, got {group_size}.")
    if device is None:
        device = next((t.device for t in (padding_mask, position_ids) if t is not None), "cpu")
    shape = (batch_size, seq_len)

    valid = None
    if padding_mask is not None:
        valid = padding_mask[:, -seq_len:].to(device=device, dtype=torch.bool)
        if bool(valid.all()):
            valid = None
    starts = None
    if position_ids is not None:
        pos = position_ids.to(device).expand(batch_size, -1)
        # (B, N): True where a document starts (the first token, and every restart of the positions)
        starts = torch.diff(pos, dim=-1, prepend=pos[:, :1] - 1) != 1
        if not bool(starts[:, 1:].any()):
            starts = None

    if valid is None and starts is None:
        local = torch.arange(seq_len, device=device).expand(shape)
        return S2Layout(
            group_size,
            shift,
            True,
            torch.ones(shape, dtype=torch.bool, device=device),
            torch.zeros(shape, dtype=torch.long, device=device),
            local,
        )
    if shift == "roll":
        raise ValueError(
            "s2_shift='roll' reproduces the paper's pseudo-code, which is only defined for unpadded, unpacked "
            "rows: its cyclic roll would mix padding and documents. Use s2_shift='segments' (the default) for "
            "padded or packed batches."
        )
    if valid is None:
        valid = torch.ones(shape, dtype=torch.bool, device=device)
    if starts is None:
        starts = torch.zeros(shape, dtype=torch.bool, device=device)
        starts[:, 0] = True
    doc = starts.long().cumsum(-1) - 1  # (B, N)
    before = valid.long().cumsum(-1) - valid.long()  # (B, N) real tokens strictly before each token
    # real tokens before the start of each token's document; cummax carries it forward (it only grows)
    base = torch.where(starts, before, torch.zeros_like(before)).cummax(-1).values
    local = torch.where(valid, before - base, torch.zeros_like(before))  # (B, N)
    return S2Layout(group_size, shift, False, valid, doc, local, empty=not bool(valid.any()))


# Models that do not hand a layout to their attention layers give every layer of one forward the same attention
# mask and position_ids tensors: the first layer builds the layout and keeps it on the first of those tensors (an
# attribute, so it dies with the forward's tensors), and the other layers, and gradient checkpointing's
# recomputation, find it there. The tensors' version counters are part of the key, so a tensor changed in place gets
# a new layout. Without either tensor the layout depends on the shape alone: a few are kept here.
_LAYOUT_ATTRIBUTE = "_s2_layouts"
_SHAPE_LAYOUTS: dict[tuple, tuple[tuple, S2Layout]] = {}
_MAX_SHAPE_LAYOUTS = 4


def _version_of(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter (None for inference tensors, which keep none)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def s2_layout_for(module: torch.nn.Module, query: torch.Tensor, attention_mask, kwargs: dict) -> S2Layout:
    """The layout of the forward in progress, inside an attention call, for models that do not pass a
    precomputed `s2_layout`: built by the first layer, reused by the others."""
    config = module.config
    batch, _, seq_len, _ = query.shape
    group = s2_group_size(seq_len, getattr(config, "s2_group_size", None), getattr(config, "s2_group_size_ratio", 0.25))
    shift = getattr(config, "s2_shift", "segments")
    position_ids = kwargs.get("position_ids")
    anchors = [x for x in (attention_mask, position_ids) if isinstance(x, torch.Tensor)]
    key = (batch, seq_len, group, shift, query.device, *(_version_of(x) for x in anchors))
    cache = _SHAPE_LAYOUTS if not anchors else getattr(anchors[0], _LAYOUT_ATTRIBUTE, None)
    entry = None if cache is None else cache.get(key)
    # the entry holds the other tensor too: it must be this forward's
    if entry is not None and all(a is b for a, b in zip(entry[0], anchors[1:], strict=True)):
        return entry[1]
    layout = build_s2_layout(
        seq_len,
        batch,
        group,
        shift,
        padding_mask=_padding_from_mask(attention_mask, seq_len),
        position_ids=position_ids,
        device=query.device,
    )
    if not anchors:
        while len(_SHAPE_LAYOUTS) >= _MAX_SHAPE_LAYOUTS:
            del _SHAPE_LAYOUTS[next(iter(_SHAPE_LAYOUTS))]
        _SHAPE_LAYOUTS[key] = ((), layout)
        return layout
    if cache is None:
        cache = {}
        try:
            setattr(anchors[0], _LAYOUT_ATTRIBUTE, cache)
        except (AttributeError, RuntimeError):  # a tensor that takes no attribute (under tracing): build per layer
            return layout
    cache[key] = (tuple(anchors[1:]), layout)
    return layout


def _padding_from_mask(attention_mask, seq_len: int) -> torch.Tensor | None:
    """The (B, N) key-padding mask behind whatever mask transformers built for the base backend."""
    if attention_mask is None or not isinstance(attention_mask, torch.Tensor):
        return None
    if attention_mask.ndim == 2:  # flash-attention masks are the 2D padding mask itself
        return attention_mask[:, -seq_len:].bool()
    if attention_mask.ndim == 4 and attention_mask.shape[-2] == 1:  # (B, 1, 1, N) key-padding mask
        mask = attention_mask[:, 0, 0, -seq_len:]
        return mask if mask.dtype == torch.bool else mask == 0
    if attention_mask.ndim == 4:  # (B, 1, N, N) causal mask: a real token always attends to itself
        diag = attention_mask[:, 0, -seq_len:, -seq_len:].diagonal(dim1=-2, dim2=-1)
        return diag if diag.dtype == torch.bool else diag == 0
    raise ValueError(f"S²-Attn cannot read an attention mask of shape {tuple(attention_mask.shape)}.")


# ----------------------------------------------------------------------------------------------------------
# dense kernels for one batch of groups

# Eager builds fp32 scores, so it bounds them: groups are taken in chunks of at most this many (L x L) score
# elements (256 MiB in fp32), so that the transient scores are those of one chunk rather than of a whole half of
# the heads; and within a chunk the queries are cut into tiles, tile t seeing only the keys up to its last query,
# so the blocks above the diagonal are never built (the saved probabilities shrink to (T + 1) / 2T of L x L).
_EAGER_CHUNK_ELEMENTS = 1 << 26
_EAGER_TILES = 4


def _causal_bias(layout: S2Layout, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(L, L) additive causal mask: 0 on and below the diagonal, the dtype's minimum above. Built once per layout
    for the longest group and shared by every layer; shorter groups use its top-left corner (a view)."""

    def build():
        size = min(layout.group_size, layout.seq_len)
        upper = torch.ones(size, size, dtype=torch.bool, device=device).triu(1)  # (L, L)
        return torch.zeros(size, size, dtype=dtype, device=device).masked_fill_(upper, torch.finfo(dtype).min)

    return layout.cached(f"causal_bias/{dtype}/{device}", build)[:length, :length]


def _sdpa_key_value(query, key, value, mask) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Key/value for SDPA, and whether to pass `enable_gqa`. On CUDA, SDPA with both a mask and `enable_gqa` has no
    fused kernel and falls to the math one (full scores): there the key/value heads are repeated instead, as
    transformers does (`use_gqa_in_sdpa`). CPU kernels take both."""
    if query.shape[1] == key.shape[1]:
        return key, value, False
    if mask is None or query.device.type == "cpu":
        return key, value, True
    n_rep = query.shape[1] // key.shape[1]
    return key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1), False


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    dropout: float,
    backend: str,
    layout: S2Layout,
) -> torch.Tensor:
    """Causal attention over groups. q: (b, Hq, L, D), k/v: (b, Hk, L, D), any strides; `mask`: (b, 1, L, L)
    bool or None for plain causal. Returns (b, Hq, L, D)."""
    if backend == "sdpa":
        key, value, enable_gqa = _sdpa_key_value(query, key, value, mask)
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=mask is None,
            scale=scaling,
            enable_gqa=enable_gqa,
        )
    # eager: the same maths spelled out, fp32 softmax like transformers' eager path
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)  # (b, Hq, L, D)
        value = value.repeat_interleave(n_rep, dim=1)  # (b, Hq, L, D)
    _, heads, length, _ = query.shape
    chunk = max(1, _EAGER_CHUNK_ELEMENTS // (heads * length * length))
    tiles = min(_EAGER_TILES, length)
    bounds = [length * tile // tiles for tile in range(tiles + 1)]
    tile_sizes = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
    bias = _causal_bias(layout, length, query.dtype, query.device) if mask is None else None  # (L, L)
    masks = [None] * query.shape[0] if mask is None else mask.split(chunk)
    outputs = []
    # split, not slices: the backward of a split is one cat, that of each slice a full-size zero gradient
    for q, k, v, m in zip(query.split(chunk), key.split(chunk), value.split(chunk), masks, strict=False):
        rows = []
        for q_tile, top, end in zip(q.split(tile_sizes, dim=2), bounds[:-1], bounds[1:], strict=True):
            # queries [top, end) only see the keys [0, end): the prefixes are views
            k_seen, v_seen = k[:, :, :end], v[:, :, :end]  # (c, Hq, end, D)
            # scale q (l x D), not the scores (l x end): the backward then has no l x end product for the scale
            scores = torch.matmul(q_tile * scaling, k_seen.transpose(-1, -2))  # (c, Hq, l, end)
            # masked in place: matmul keeps only its inputs, and the backward of add_ passes the gradient through
            # unchanged (softmax gives masked entries a zero gradient anyway), so no l x end mask copy either way
            if m is None:
                scores.add_(bias[top:end, :end])
            else:
                scores.masked_fill_(~m[:, :, top:end, :end], torch.finfo(scores.dtype).min)
            # softmax keeps its output for the backward, not its input: the scores die here
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # (c, Hq, l, end)
            del scores
            probs = F.dropout(probs, p=dropout, training=dropout > 0)
            rows.append(torch.matmul(probs, v_seen))  # (c, Hq, l, D)
        outputs.append(rows[0] if len(rows) == 1 else torch.cat(rows, dim=2))  # (c, Hq, L, D)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # (b, Hq, L, D)


# ----------------------------------------------------------------------------------------------------------
# regular rows (no padding, no packing): groups are views of the (B, N, H, D) projections
#
# The model hands q/k/v over as (B, H, N, D) views of (B, N, H, D) memory. In that token-major layout a run of m
# whole groups, [s, s + m*G), is the view (B*m, G, H, D) (for B = 1, or when the run is the whole row), so
# nothing is copied on the way in. Pieces are cut with one `split` per tensor (its backward is one `cat`; a
# slice's backward would allocate a full-size zero gradient per slice) and the two halves of the heads are
# joined by one `cat` along the heads into the (B, N, Hq, D) output, which the model's `reshape` then views.


def _plan(seq_len: int, group: int, shifted: bool, shift: str) -> list[list[tuple[int, int]]]:
    """The groups of one half of the heads, each a list of token ranges `(start, end)` in the causal order of
    the group; together they cover [0, N) exactly once."""
    half = group // 2
    if not shifted or shift == "none":
        return [[(start, min(start + group, seq_len))] for start in range(0, seq_len, group)]
    if shift == "segments":
        rest = [[(start, min(start + group, seq_len))] for start in range(half, seq_len, group)]
        return [[(0, min(half, seq_len))]] + rest
    # roll by -G/2: rolled position p holds token (p + G/2) mod N, and a rolled group wraps at most once
    offset, groups = half % seq_len, []
    for rolled in range(0, seq_len, group):
        start, end = rolled + offset, min(rolled + group, seq_len) + offset
        if end <= seq_len:
            groups.append([(start, end)])
        elif start >= seq_len:
            groups.append([(start - seq_len, end - seq_len)])
        else:
            groups.append([(start, seq_len), (0, end - seq_len)])
    return groups


def _units(plan: list[list[tuple[int, int]]], group: int) -> list[tuple[list[tuple[int, int]], int]]:
    """Merge consecutive whole groups that are adjacent in the row into runs, each attended in one call.

    Returns `(ranges, count)` pairs: a run is `([(start, start + count * G)], count)`; any other group (short,
    or wrapped by the roll) is `(ranges, 1)`."""
    units = []
    for ranges in plan:
        (start, end), whole = ranges[0], len(ranges) == 1 and ranges[0][1] - ranges[0][0] == group
        if whole and units:
            (last_start, last_end), count = units[-1][0][-1], units[-1][1]
            if len(units[-1][0]) == 1 and last_end - last_start == count * group and last_end == start:
                units[-1] = ([(last_start, end)], count + 1)
                continue
        units.append((ranges, 1))
    return units


def _attend_runs(query, key, value, count: int, attend: Callable) -> torch.Tensor:
    """Causal attention inside `count` consecutive equal groups. q: (B, count*L, Hq, D), k/v: (B, count*L, Hk,
    D), token-major. Returns (B, count*L, Hq, D)."""
    batch, length, heads, dim = query.shape
    size = length // count

    def groups(x):  # a view unless B > 1 and the run is not the whole row
        x = x.reshape(batch * count, size, x.shape[2], dim)  # (B*count, L, H, D)
        return x.transpose(1, 2)  # (B*count, H, L, D)

    out = attend(groups(query), groups(key), groups(value), None)  # (B*count, Hq, L, D)
    # sdpa's output is (B*count, L, Hq, D) in memory, so this is a view; eager's is copied here
    return out.transpose(1, 2).reshape(batch, length, heads, dim)  # (B, count*L, Hq, D)


def _regular_half(query, key, value, plan: list[list[tuple[int, int]]], group: int, attend: Callable):
    """One half of the heads on unpadded, unpacked rows. q: (B, N, Hq, D), k/v: (B, N, Hk, D), token-major
    views. Returns (B, N, Hq, D)."""
    units = _units(plan, group)
    bounds = sorted({bound for ranges, _ in units for token_range in ranges for bound in token_range})
    sizes = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
    # every range of the plan is exactly one piece, cut by one split per tensor (backward: a single cat); a run
    # over the whole row is not cut at all, since even a one-piece split copies the gradient back in its cat
    if len(sizes) == 1:
        pieces = [{0: x} for x in (query, key, value)]
    else:
        pieces = [dict(zip(bounds, x.split(sizes, dim=1), strict=False)) for x in (query, key, value)]
    # pieces[i]: range start -> (B, n, H, D) view
    outputs = {}
    for ranges, count in units:
        # a group wrapped by the roll (the row's tail, then its head: G tokens) is the only input that is copied
        inputs = [
            torch.cat([piece[start] for start, _ in ranges], dim=1) if len(ranges) > 1 else piece[ranges[0][0]]
            for piece in pieces
        ]  # (B, count*L, H, D)
        out = _attend_runs(*inputs, count, attend)  # (B, count*L, Hq, D)
        if len(ranges) == 1:
            outputs[ranges[0][0]] = out
            continue
        lengths = [end - start for start, end in ranges]
        for (start, _), part in zip(ranges, out.split(lengths, dim=1), strict=True):
            outputs[start] = part  # (B, n, Hq, D)
    parts = [outputs[start] for start in sorted(outputs)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (B, N, Hq, D)


# ----------------------------------------------------------------------------------------------------------
# regular rows, sdpa backend, CPU: torch's flash kernel called per group, writing into one tensor per result
#
# On CPU, `F.scaled_dot_product_attention` runs torch's flash kernel, which allocates each call's output and, in the
# backward, zero-filled gradients shaped like the call's inputs. Called per group through SDPA, every call's output
# is kept for the backward next to the joined output, and every call's gradients live until the split's backward
# cats them: both the output and the gradients then exist twice. `_S2FlashCPU` calls the same kernel
# (`aten::_scaled_dot_product_flash_attention_for_cpu` and its backward) on strided views of q/k/v, copies each
# call's output into ONE (B, N, Hq, D) tensor and each call's gradients into ONE gradient per input (in the input's
# own layout), and frees each call's results before the next call. Beyond the output and the gradients (what full
# attention holds too), the backward then holds one call's blocks at a time: its three gradients and the contiguous
# copy of its output gradient that the kernel makes, plus the kernel's scratch. A call covers about as many
# (group, head) pairs as torch has threads: the backward kernel runs one pair per thread, so fewer pairs would idle
# threads and more would only cost memory. It also spans at least _FLASH_MIN_TOKENS tokens: many small calls lose
# much more time than a few large ones when other jobs share the cores. The forward uses the same calls, so that
# every block either pass allocates has the same size and glibc can reuse the freed ones.

_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_FLASH_MIN_TOKENS = 4096  # a call spans at least this many tokens of groups, so that small groups are batched


def _cpu_flash_ops() -> tuple | None:
    """The CPU flash-attention forward and backward ops, or None where this torch has none."""
    try:
        aten = torch.ops.aten
        return (
            aten._scaled_dot_product_flash_attention_for_cpu.default,
            aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
        )
    except (AttributeError, RuntimeError):
        return None


def _cpu_flash_usable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> bool:
    """Whether `_S2FlashCPU` can run: CPU tensors of one floating dtype and head size, each row of D contiguous,
    no dropout (the CPU flash kernel has none), and the ops present in this torch."""
    return (
        dropout == 0.0
        and query.device.type == "cpu"
        and query.dtype in _FLASH_DTYPES
        and query.dtype == key.dtype == value.dtype
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and all(x.stride(-1) == 1 for x in (query, key, value))
        and _cpu_flash_ops() is not None
    )


@dataclass(frozen=True)
class _FlashCall:
    """One kernel call: `count` groups of `length` tokens of one row (the call's batch), the i-th starting at token
    `start + i * step`, over the query heads `q_heads` and the key/value heads `kv_heads` (both `(start, stop)`).

    `wrapped`: the roll's wrapped group (count 1), the token ranges of the row's tail and head, in causal order.
    `expand` > 0: one key/value head serves `expand` query heads (GQA/MQA; a stride-0 view, its gradients summed);
    0: the key/value heads are the query heads. `accumulate`: a call of the other half already wrote these key/value
    gradients (a key/value head serving both halves), so they are added."""

    row: int
    start: int
    step: int
    count: int
    length: int
    wrapped: tuple[tuple[int, int], ...] | None
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    expand: int
    accumulate: bool


def _flash_groups(plan: list[list[tuple[int, int]]], group: int, per_call) -> list[tuple]:
    """The plan's groups as `(start, step, count, length, wrapped)` sets, one per call: runs of whole groups cut
    into `per_call(length)` groups, short groups of equal length paired (two groups are always evenly spaced, so
    the pair is one strided view), the roll's wrapped group alone."""
    sets, short = [], {}
    for ranges, count in _units(plan, group):
        start, end = ranges[0]
        if len(ranges) > 1:
            sets.append((start, group, 1, group, tuple(ranges)))
        elif end - start < group:
            short.setdefault(end - start, []).append(start)
        else:
            size = per_call(group)
            for first in range(0, count, size):
                sets.append((start + first * group, group, min(size, count - first), group, None))
    for length, starts in short.items():
        size = min(2, per_call(length))
        for first in range(0, len(starts), size):
            pair = starts[first : first + size]
            sets.append((pair[0], pair[-1] - pair[0] or length, len(pair), length, None))
    return sets


def _flash_calls(layout: S2Layout, q_heads: int, kv_heads: int, pairs: int) -> tuple[_FlashCall, ...]:
    """The kernel calls of S² on regular rows: the two halves of the heads in turn, each over its plan's groups,
    about `pairs` (group, head) pairs per call (torch's thread count)."""
    n_rep = q_heads // kv_heads
    split = q_heads - q_heads // 2
    group = layout.group_size
    calls, written = [], set()
    for shifted, (first_head, end_head) in ((False, (0, split)), (True, (split, q_heads))):
        kv_of_half = range(first_head // n_rep, (end_head - 1) // n_rep + 1)
        if n_rep == 1:  # several heads per call, about one (group, head) pair per thread
            size = min(end_head - first_head, max(1, pairs))
            chunks = [((h, min(h + size, end_head)),) * 2 + (0,) for h in range(first_head, end_head, size)]
        else:  # one key/value head per call, with its query heads of this half
            chunks = []
            for kv in kv_of_half:
                start, stop = max(first_head, kv * n_rep), min(end_head, (kv + 1) * n_rep)
                chunks.append(((start, stop), (kv, kv + 1), stop - start))
        plan = _plan(layout.seq_len, group, shifted, layout.shift)
        for q_range, kv_range, expand in chunks:
            heads = q_range[1] - q_range[0]

            def per_call(length: int, heads: int = heads) -> int:  # groups per call: `pairs`, and some tokens
                return max(-(-pairs // heads), -(-_FLASH_MIN_TOKENS // length))

            calls.extend(
                _FlashCall(row, *groups, q_range, kv_range, expand, kv_range[0] in written)
                for groups in _flash_groups(plan, group, per_call)
                for row in range(layout.batch_size)
            )
        written.update(kv_of_half)
    return tuple(calls)


def _call_view(x: torch.Tensor, call: _FlashCall, heads: tuple[int, int], expand: int = 0) -> torch.Tensor:
    """The (count, h, L, D) operand of `call` in a token-major (B, N, H, D) tensor, or its (count, h, L) part of a
    (B, N, H) one: a strided view, except for the roll's wrapped group, which is gathered (a copy of one group)."""
    rows = x[call.row, :, heads[0] : heads[1]]  # (N, h, D) or (N, h)
    if call.wrapped is None:
        span = rows[call.start : call.start + (call.count - 1) * call.step + call.length]  # (n, h, D)
        groups = span.unfold(0, call.length, call.step)  # (count, h, D, L): group i starts at i * step
    else:
        groups = torch.cat([rows[start:end] for start, end in call.wrapped]).movedim(0, -1)[None]  # (1, h, D, L)
    groups = groups.movedim(-1, 2)  # (count, h, L, D) or (count, h, L)
    return groups.expand(-1, expand, -1, -1) if expand else groups  # expand: one key/value head, stride 0


def _call_store(dest: torch.Tensor, call: _FlashCall, heads: tuple[int, int], result: torch.Tensor, add: bool):
    """Copy (or add) a call's (count, h, L, D) result, or (count, h, L) log-sum-exp, into its place in `dest`,
    token-major (B, N, H, D) or (B, N, H)."""
    if call.wrapped is None:
        writes = [(_call_view(dest, call, heads), result)]  # a view of dest
    else:
        writes, offset = [], 0
        for start, end in call.wrapped:
            target = dest[call.row, start:end, heads[0] : heads[1]].movedim(0, 1)  # (h, n, D) or (h, n)
            writes.append((target, result[0].narrow(1, offset, end - start)))  # (h, n, D) or (h, n)
            offset += end - start
    for target, part in writes:
        if add:
            target.add_(part)
        else:
            target.copy_(part)


class _S2FlashCPU(torch.autograd.Function):
    """S²-Attn on regular rows with torch's CPU flash kernel (see above). q: (B, Hq, N, D), k/v: (B, Hk, N, D),
    any strides with contiguous rows of D. Returns (B, N, Hq, D), contiguous. Double backward is not supported."""

    @staticmethod
    def forward(ctx, query, key, value, calls: tuple[_FlashCall, ...], scaling: float):
        forward_op = _cpu_flash_ops()[0]
        batch, q_heads, seq_len, dim = query.shape
        tokens = [x.transpose(1, 2) for x in (query, key, value)]  # (B, N, H, D) views
        out = query.new_empty(batch, seq_len, q_heads, dim)  # (B, N, Hq, D)
        # one log-sum-exp for all calls, in the kernel's dtype: no small tensor per call outlives it
        lse_dtype = torch.promote_types(query.dtype, torch.float32)
        lse = torch.empty(batch, seq_len, q_heads, dtype=lse_dtype, device=query.device)  # (B, N, Hq)
        for call in calls:
            q = _call_view(tokens[0], call, call.q_heads)  # (count, h, L, D)
            k, v = (_call_view(x, call, call.kv_heads, call.expand) for x in tokens[1:])  # (count, h, L, D)
            result, logsumexp = forward_op(q, k, v, 0.0, True, scale=scaling)  # (count, h, L, D), (count, h, L)
            _call_store(out, call, call.q_heads, result, add=False)
            _call_store(lse, call, call.q_heads, logsumexp, add=False)
            del q, k, v, result, logsumexp  # before the next call allocates its own
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.calls, ctx.scaling = calls, scaling
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        backward_op = _cpu_flash_ops()[1]
        query, key, value, out, lse = ctx.saved_tensors
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()  # (B, N, Hq, D)
        tokens = [x.transpose(1, 2) for x in (query, key, value)]  # (B, N, H, D) views
        # one gradient per input, in the input's layout; no zero fill: every element is first written by a copy
        grads = [torch.empty_like(x) for x in (query, key, value)]  # (B, H, N, D)
        grad_tokens = [g.transpose(1, 2) for g in grads]  # (B, N, H, D) views
        for call in ctx.calls:
            q = _call_view(tokens[0], call, call.q_heads)  # (count, h, L, D)
            k, v = (_call_view(x, call, call.kv_heads, call.expand) for x in tokens[1:])  # (count, h, L, D)
            o, d_out = (_call_view(x, call, call.q_heads) for x in (out, grad_out))  # (count, h, L, D)
            logsumexp = _call_view(lse, call, call.q_heads)  # (count, h, L)
            results = list(backward_op(d_out, q, k, v, o, logsumexp, 0.0, True, scale=ctx.scaling))
            del q, k, v, o, d_out, logsumexp  # views, but the roll's wrapped group holds copies
            _call_store(grad_tokens[0], call, call.q_heads, results.pop(0), add=False)
            for grad in grad_tokens[1:]:
                result = results.pop(0)  # (count, h, L, D)
                if call.expand:
                    result = result.sum(1, keepdim=True)  # (count, 1, L, D): the heads sharing this kv head
                _call_store(grad, call, call.kv_heads, result, call.accumulate)
                del result  # each call's gradients die as soon as they are copied
        return grads[0], grads[1], grads[2], None, None


# ----------------------------------------------------------------------------------------------------------
# general layout (padding, packing): segments of the real-token stream, packed into bins of G slots


def _segments(layout: S2Layout, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of real tokens that share a row, a document and a group.

    Returns `token_index` (T,) the flat (B*N) index of every real token in order, and `lengths` (S,) the
    length of each run (each <= G) in the same order."""
    n = layout.seq_len
    token_index = layout.valid.reshape(-1).nonzero().squeeze(-1)  # (T,)
    rows = torch.arange(layout.batch_size, device=token_index.device).repeat_interleave(n)  # (B*N,)
    group = layout.group_of(offset)  # (B, N)
    # one integer per (row, document, group); all three are < N + 1
    key = (rows * (n + 1) + layout.doc.reshape(-1)) * (n + 1) + group.reshape(-1)  # (B*N,)
    _, lengths = torch.unique_consecutive(key[token_index], return_counts=True)  # (S,)
    return token_index, lengths


def _bins(layout: S2Layout, offset: int):
    """Pack the runs, in order, into bins of G slots (a run never straddles two bins; at most 2N/G + 1 bins).

    Returns `token_index` (T,), `slot` (T,) the slot of each real token in the (n_bins * G) grid, `source`
    (n_bins * G,) the flat (B*N) token each slot reads, and `mask` (n_bins, 1, G, G) bool: same run and causal.
    Empty slots read token 0 and attend to themselves only, so no softmax row is empty; nothing attends to them
    and their outputs are never read."""
    group = layout.group_size
    token_index, lengths = _segments(layout, offset)
    length_list = lengths.tolist()
    bin_of_run, start_of_run, fill, n_bins = [], [], group, 0
    for length in length_list:  # greedy first-fit in order; runs are few (about N/G + documents)
        if fill + length > group:
            n_bins, fill = n_bins + 1, 0
        bin_of_run.append(n_bins - 1)
        start_of_run.append(fill)
        fill += length
    device = token_index.device
    run_of_token = torch.repeat_interleave(torch.arange(len(length_list), device=device), lengths)  # (T,)
    first_token = torch.cumsum(lengths, 0) - lengths  # (S,)
    rank = torch.arange(token_index.numel(), device=device) - first_token[run_of_token]  # (T,)
    base = torch.tensor(bin_of_run, device=device) * group + torch.tensor(start_of_run, device=device)
    slot = base[run_of_token] + rank  # (T,)
    run_of_slot = torch.full((n_bins * group,), -1, dtype=torch.long, device=device)
    run_of_slot[slot] = run_of_token
    source = torch.zeros(n_bins * group, dtype=torch.long, device=device)
    source[slot] = token_index
    run_of_slot = run_of_slot.view(n_bins, group)  # (n_bins, G)
    causal = torch.ones(group, group, dtype=torch.bool, device=device).tril()  # (G, G)
    same = run_of_slot[:, :, None] == run_of_slot[:, None, :]  # (n_bins, G, G)
    empty = (run_of_slot < 0)[:, :, None] & torch.eye(group, dtype=torch.bool, device=device)
    mask = ((same & causal & (run_of_slot >= 0)[:, :, None]) | empty)[:, None]  # (n_bins, 1, G, G)
    return token_index, slot, source, mask


def _binned_half(query, key, value, layout: S2Layout, offset: int, attend: Callable):
    """One half of the heads on a padded or packed batch. q: (B, Hq, N, D). Returns (B, N, Hq, D), zero at
    padding."""
    token_index, slot, source, mask = layout.cached(f"bins{offset}", partial(_bins, layout, offset))
    group = layout.group_size
    n_bins = mask.shape[0]

    def to_bins(x):  # (B, H, N, D) -> (n_bins, H, G, D)
        batch, heads, seq_len, dim = x.shape
        flat = x.transpose(1, 2).reshape(batch * seq_len, heads, dim)  # (B*N, H, D), a view in the model's layout
        grid = flat.index_select(0, source)  # (n_bins*G, H, D): one gather, no zero grid to fill
        return grid.view(n_bins, group, heads, dim).transpose(1, 2)  # (n_bins, H, G, D)

    out = attend(to_bins(query), to_bins(key), to_bins(value), mask)  # (n_bins, Hq, G, D)
    batch, heads, seq_len, dim = query.shape
    out = out.transpose(1, 2).reshape(n_bins * group, heads, dim).index_select(0, slot)  # (T, Hq, D)
    full = out.new_zeros(batch * seq_len, heads, dim).index_copy_(0, token_index, out)  # (B*N, Hq, D)
    return full.view(batch, seq_len, heads, dim)  # (B, N, Hq, D)


# ----------------------------------------------------------------------------------------------------------
# flash-attention (varlen over the same runs) and FlexAttention (a head-dependent block mask)


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


def _flash_half(query, key, value, layout: S2Layout, shifted: bool, scaling: float, dropout: float):
    """q: (B, Hq, N, D). Returns (B, N, Hq, D), zero at padding."""
    flash_attn_varlen_func = _flash_varlen_func()

    half = layout.group_size // 2
    roll = shifted and layout.shift == "roll"
    if roll:  # the paper's roll on regular rows: the rolled row is then split in plain groups
        query, key, value = (x.roll(-half, dims=2) for x in (query, key, value))
    offset = half if shifted and not roll else 0
    batch, heads, seq_len, dim = query.shape
    if layout.regular:  # every token is real: the runs are the plan's groups, known on the host, no gather
        cu_seqlens, max_len = layout.cached(f"regular_runs{offset}", partial(_regular_runs, layout, offset, roll))
        token_index = None
    else:
        token_index, lengths = layout.cached(f"runs{offset}", partial(_segments, layout, offset))
        cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))  # (S+1,)
        max_len = layout.cached(f"max{offset}", lambda: int(lengths.max()))

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


def _regular_runs(layout: S2Layout, offset: int, rolled: bool) -> tuple[torch.Tensor, int]:
    """`cu_seqlens` (int32, on the layout's device) and the longest run of regular rows, from the plan alone: the
    groups of every row in turn. `rolled`: the row was rolled by -G/2, so it is cut in plain groups."""
    plan = _plan(layout.seq_len, layout.group_size, offset > 0 and not rolled, layout.shift)
    lengths = [end - start for ranges in plan for start, end in ranges] * layout.batch_size
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    return torch.tensor(bounds, dtype=torch.int32, device=layout.valid.device), max(lengths)


_compiled_flex = None
_FLEX_BLOCK = 128  # torch's default sparse block size (queries and keys)
# the block mask is read off the dense mask in chunks of query rows, at most this many mask entries at a time
_FLEX_CHUNK_ELEMENTS = 1 << 26


def _flex_length(seq_len: int) -> int:
    """The length the flex kernel runs at: N rounded up to the next of 128 x (1, 1.5, 2, 3, 4, 6, ...). The kernel
    is compiled for static shapes, once per length; LongQA batches come in every length, and past dynamo's
    recompile limit flex falls back to an unfused path that builds N x N scores. With these buckets a run
    compiles at most two shapes per doubling of N, at the cost of at most half of N in padding (whose blocks are
    skipped but for their diagonal)."""
    size = _FLEX_BLOCK
    while True:
        if seq_len <= size:
            return size
        if seq_len <= size * 3 // 2:
            return size * 3 // 2
        size *= 2


def _flex_rules(layout: S2Layout, length: int):
    """The S² mask over a row padded to `length` >= N, as a function `allowed(s, b, q, kv)` of the half of the
    heads `s` (0 unshifted, 1 shifted), the row and the query and key positions. Tensors broadcast, so the same
    rule serves the kernel's `mask_mod` (scalars) and the block mask's construction (blocks of positions). The
    positions past N are padding: each attends to itself only."""
    n, group, half = layout.seq_len, layout.group_size, layout.group_size // 2
    index = torch.arange(length, device=layout.valid.device).expand(layout.batch_size, length)  # (B, L)
    valid, doc, local = (F.pad(x, (0, length - n)) for x in (layout.valid, layout.doc, layout.local))  # (B, L)
    if layout.groups is not None:  # given groups, in causal order
        order = torch.stack([index, index])  # (2, B, L)
        groups = torch.stack([F.pad(x, (0, length - n)) for x in layout.groups])  # (2, B, L)
    elif layout.shift == "roll":
        # where each token sits after the roll by -G/2 (of the N real positions; the tail stays where it is)
        rolled = torch.where(index < n, (index - half) % n, index)
        order = torch.stack([index, rolled])  # (2, B, L): causal order per half
        groups = torch.stack([index // group, rolled // group])  # (2, B, L)
    else:
        shift_by = 0 if layout.shift == "none" else half
        order = torch.stack([index, index])  # (2, B, L)
        groups = torch.stack([local // group, (local + shift_by) // group])  # (2, B, L)

    def allowed(s, b, q, kv):
        ok = (groups[s, b, q] == groups[s, b, kv]) & (order[s, b, kv] <= order[s, b, q])
        ok = ok & (doc[b, q] == doc[b, kv]) & valid[b, kv] & valid[b, q]
        return ok | ((q == kv) & ~valid[b, q])  # padding attends to itself only: no empty rows

    return allowed


def _ordered_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., Qb, KVb) bool -> the number of True key blocks per query block (..., Qb) and their indices first
    (..., Qb, KVb), both int32: the layout `BlockMask.from_kv_blocks` takes."""
    count = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort(blocks.to(torch.uint8), dim=-1, descending=True, stable=True).to(torch.int32)
    return count, order


def _flex_block_mask(layout: S2Layout, num_heads: int, split: int, length: int) -> BlockMask:
    """The FlexAttention block mask of S² for `num_heads` heads, the first `split` unshifted, over rows padded to
    `length` (see `_flex_length`).

    Built without `create_block_mask`, which materialises the whole (B, H, N, N) mask at once (or is compiled anew
    for each shape): the mask is evaluated per half of the heads only (every head of a half shares it), per row
    (one row stands for all when rows are regular), and in chunks of query rows, each reduced at once to its
    blocks. Keys after a chunk's last query are never visited except under the roll, whose last group wraps."""
    allowed = _flex_rules(layout, length)
    n, block, device = length, _FLEX_BLOCK, layout.valid.device
    n_blocks = -(-n // block)
    rows = 1 if layout.regular else layout.batch_size  # regular rows share one mask, broadcast over the batch
    halves = torch.arange(2, device=device)[:, None, None]  # (2, 1, 1)
    chunk = max(1, _FLEX_CHUNK_ELEMENTS // (2 * n_blocks * block * block))  # query blocks per chunk
    any_block = torch.zeros(rows, 2, n_blocks, n_blocks, dtype=torch.bool, device=device)
    all_block = torch.zeros_like(any_block)
    for row in range(rows):
        for first in range(0, n_blocks, chunk):
            last = min(first + chunk, n_blocks)
            kv_blocks = n_blocks if layout.shift == "roll" else last
            q = torch.arange(first * block, last * block, device=device)[None, :, None]  # (1, c, 1)
            kv = torch.arange(kv_blocks * block, device=device)[None, None, :]  # (1, 1, K)
            inside = (q < n) & (kv < n)  # positions past N (the last block's tail) are never allowed
            mask = allowed(halves, row, q.clamp(max=n - 1), kv.clamp(max=n - 1)) & inside  # (2, c, K)
            mask = mask.view(2, last - first, block, kv_blocks, block)
            any_block[row, :, first:last, :kv_blocks] = mask.any(4).any(2)
            all_block[row, :, first:last, :kv_blocks] = mask.all(4).all(2)
    half_of_head = (torch.arange(num_heads, device=device) >= split).long()  # (H,)
    partial = (any_block & ~all_block).index_select(1, half_of_head)  # (rows, H, Qb, KVb)
    full = all_block.index_select(1, half_of_head)  # (rows, H, Qb, KVb)

    def mask_mod(b, h, q, kv):
        return allowed((h >= split).long(), b, q, kv)

    return BlockMask.from_kv_blocks(
        *_ordered_blocks(partial), *_ordered_blocks(full), BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(n, n)
    )


def _flex_attention(query, key, value, layout: S2Layout, split: int, scaling: float):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        # static shapes, one per bucket of `_flex_length` (dynamic shapes fail to compile on CPU, torch 2.13)
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    heads, seq_len = query.shape[1], query.shape[2]
    length = _flex_length(seq_len)
    block_mask = layout.cached(f"flex{heads}/{split}/{length}", partial(_flex_block_mask, layout, heads, split, length))
    if length > seq_len:
        query, key, value = (F.pad(x, (0, 0, 0, length - seq_len)) for x in (query, key, value))  # (B, H, L, D)
    out = _compiled_flex(
        query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )  # (B, Hq, L, D)
    return out[:, :, :seq_len] * layout.valid[:, None, :, None]  # (B, Hq, N, D)


# ----------------------------------------------------------------------------------------------------------
# the attention function


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
        return _flex_attention(query, key, value, layout, split, scaling).transpose(1, 2)

    if backend == "sdpa" and layout.regular and _cpu_flash_usable(query, key, value, dropout):
        heads, kv_heads, threads = query.shape[1], key.shape[1], torch.get_num_threads()
        calls = layout.cached(
            f"flash_calls/{heads}/{kv_heads}/{threads}", partial(_flash_calls, layout, heads, kv_heads, threads)
        )
        return _S2FlashCPU.apply(query, key, value, calls, scaling)  # (B, N, Hq, D)

    _, plain, shifted = _split_heads(query, key, value)
    attend = partial(_attend, scaling=scaling, dropout=dropout, backend=backend, layout=layout)
    outputs = []
    # with shift "none" the second half of the heads is laid out exactly like the first
    for heads, is_shifted in ((plain, False), (shifted, layout.shift != "none")):
        if backend == "flash_attention_2":
            out = _flash_half(*heads, layout, is_shifted, scaling, dropout)
        elif layout.regular:
            plan = layout.cached(
                f"plan{is_shifted}", partial(_plan, layout.seq_len, layout.group_size, is_shifted, layout.shift)
            )
            token_major = (x.transpose(1, 2) for x in heads)  # (B, N, H/2, D)
            out = _regular_half(*token_major, plan, layout.group_size, attend)
        else:
            out = _binned_half(*heads, layout, layout.group_size // 2 if is_shifted else 0, attend)
        outputs.append(out)  # (B, N, Hq/2, D)
    # one copy joins the halves; the result is contiguous, so the model's reshape to (B, N, Hq*D) is a view
    return torch.cat(outputs, dim=2)  # (B, N, Hq, D)


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
