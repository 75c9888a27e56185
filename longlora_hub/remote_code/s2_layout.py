"""Where every token sits for S²-Attn: its group, for each half of the heads.

`s2_groups` is the rule, and the only place it is written: a token attends to the earlier tokens (in the group's
causal order) of its own group. For the unshifted half, and for every head with `shift="none"`, the groups are
[0, G), [G, 2G), ...; for the shifted half they start G/2 later ([0, G/2), [G/2, 3G/2), ..., `"segments"`), or, with
the paper's `"roll"`, are those of the row rolled by -G/2 (the last group then holds the row's last G/2 tokens and
its first G/2, in that order). Positions count real tokens of a token's own document (`S2Layout.local`), so padding
and packing give every sequence the groups it would have alone.

Everything else reads the rule through `token_groups` (a batch's tensors, with the documents told apart) or
`group_plan` (regular rows, worked out on the host with no device sync): the kernels' runs and bins, FlexAttention's
mask and context parallelism's halos.

This file is shipped as remote code: it imports only torch, transformers and its sibling files.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .configuration_llama_longlora import check_s2_settings


def s2_group_size(seq_len: int, group_size: int | None = None, ratio: float = 0.25) -> int:
    """The group size G for a row of `seq_len` tokens: `group_size` if given, else `ratio * seq_len`, rounded
    down to an even number (the shift is G/2) and at least 2."""
    size = group_size if group_size is not None else int(seq_len * ratio)
    return max(2, size - size % 2)


def s2_groups(local, index, seq_len: int, group_size: int, shift: str, shifted: bool):
    r"""
    THE S² rule: the group of a token and its place in the group's causal order, for one half of the heads.
    Works on Python ints and on tensors alike.

    Args:
        local: The token's position among the real tokens of its document.
        index: The token's position in the row (its causal order when nothing is rolled).
        seq_len (`int`): N, the row length (the roll is cyclic over it).
        group_size (`int`): G.
        shift (`str`): One of `S2_SHIFTS`.
        shifted (`bool`): The second half of the heads (the first is never shifted).

    Returns:
        `(group, order)`: tokens of one group attend to those of no greater order.
    """
    if not shifted or shift == "none":
        return local // group_size, index
    if shift == "segments":
        return (local + group_size // 2) // group_size, index
    # the roll, defined on regular rows only (local == index): token t sits at (t - G/2) mod N of the rolled row
    rolled = (index - group_size // 2) % seq_len
    return rolled // group_size, rolled


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
            tokens only: what `s2_groups` lays the groups on.
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


def token_groups(layout: S2Layout, shifted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`s2_groups` over a batch: `(group, order)`, both (B, N), where `group` is one id per (document, group), unique
    in its row, and `order` the causal order within a group (the token index, or its place in the rolled row)."""

    def build():
        n = layout.seq_len
        index = torch.arange(n, device=layout.valid.device).expand_as(layout.local)  # (B, N)
        if layout.groups is not None:
            group, order = layout.groups[int(shifted)], index
        else:
            group, order = s2_groups(layout.local, index, n, layout.group_size, layout.shift, shifted)
        return layout.doc * (n + 1) + group, order

    return layout.cached(f"token_groups{int(shifted)}", build)


def group_plan(seq_len: int, group_size: int, shift: str, shifted: bool) -> list[list[tuple[int, int]]]:
    """The groups of one half of the heads on regular rows, each a list of token ranges `(start, end)` in the
    group's causal order (one range, or two for the roll's wrapped group); together they cover [0, N) once. Read
    off `s2_groups` on the host: regular rows need no device sync."""
    index = torch.arange(seq_len)
    group, order = s2_groups(index, index, seq_len, group_size, shift, shifted)
    causal = torch.argsort(order)  # the tokens in causal order: the row itself, or rotated by the roll
    new_group = torch.ones(seq_len, dtype=torch.bool)
    new_group[1:] = group[causal[1:]] != group[causal[:-1]]
    new_range = new_group.clone()
    new_range[1:] |= causal[1:] != causal[:-1] + 1
    starts = new_range.nonzero().squeeze(-1).tolist()  # where each range starts in the causal order
    plan = []
    for first, last in zip(starts, [*starts[1:], seq_len], strict=True):
        token_range = (int(causal[first]), int(causal[last - 1]) + 1)
        if new_group[first]:
            plan.append([token_range])
        else:
            plan[-1].append(token_range)
    return plan


def real_runs(layout: S2Layout, shifted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of real tokens that share a row, a document and a group (general layouts: padding, packing, windows).

    Returns `token_index` (T,) the flat (B*N) index of every real token in order, and `lengths` (S,) the
    length of each run (each <= G) in the same order."""
    n = layout.seq_len
    token_index = layout.valid.reshape(-1).nonzero().squeeze(-1)  # (T,)
    rows = torch.arange(layout.batch_size, device=token_index.device).repeat_interleave(n)  # (B*N,)
    group, _ = token_groups(layout, shifted)  # (B, N), < (N + 1)^2
    key = rows * (n + 1) ** 2 + group.reshape(-1)  # (B*N,): one integer per (row, document, group)
    _, lengths = torch.unique_consecutive(key[token_index], return_counts=True)  # (S,)
    return token_index, lengths


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
    check_s2_settings(shift, group_size=group_size)
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
    precomputed `s2_layout`: built by the first layer, reused by the others. The settings come from any model's
    config (`s2_group_size`, `s2_group_size_ratio`, `s2_shift`), with the paper's defaults."""
    config = module.config
    batch, _, seq_len, _ = query.shape
    ratio = getattr(config, "s2_group_size_ratio", 0.25)
    group = s2_group_size(seq_len, getattr(config, "s2_group_size", None), ratio)
    shift = getattr(config, "s2_shift", "segments")
    position_ids = kwargs.get("position_ids")
    anchors = [x for x in (attention_mask, position_ids) if isinstance(x, torch.Tensor)]
    key = (batch, seq_len, group, shift, query.device, *(_version_of(x) for x in anchors))
    cache = _SHAPE_LAYOUTS if not anchors else getattr(anchors[0], _LAYOUT_ATTRIBUTE, None)
    entry = None if cache is None else cache.get(key)
    # the entry holds the other tensor too: it must be this forward's
    if entry is not None and all(a is b for a, b in zip(entry[0], anchors[1:], strict=True)):
        return entry[1]
    check_s2_settings(shift, ratio, getattr(config, "s2_group_size", None))  # another model's config: unchecked yet
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


__all__ = [
    "S2Layout",
    "build_s2_layout",
    "group_plan",
    "real_runs",
    "s2_group_size",
    "s2_groups",
    "s2_layout_for",
    "token_groups",
]
