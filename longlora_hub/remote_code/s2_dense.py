"""S²-Attn with the eager and sdpa kernels: causal attention inside groups, with no N x N mask.

Regular rows (no padding, no packing) are cut into groups by views of the (B, N, H, D) projections, whole groups
that follow each other attended in one call (`regular_half`); a padded or packed batch has its runs of real tokens
(`s2_layout.real_runs`) packed into bins of G slots, attended with a (bins, 1, G, G) mask (`binned_half`).

This file is shipped as remote code: it imports only torch, transformers and its sibling files.
"""

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from .s2_layout import S2Layout, real_runs

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


def attend(
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


def group_runs(plan: list[list[tuple[int, int]]], group: int) -> list[tuple[list[tuple[int, int]], int]]:
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


def regular_half(query, key, value, plan: list[list[tuple[int, int]]], group: int, attend: Callable):
    """One half of the heads on unpadded, unpacked rows. q: (B, N, Hq, D), k/v: (B, N, Hk, D), token-major
    views. Returns (B, N, Hq, D)."""
    units = group_runs(plan, group)
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
# general layout (padding, packing): segments of the real-token stream, packed into bins of G slots


def _bins(layout: S2Layout, shifted: bool):
    """Pack the runs, in order, into bins of G slots (a run never straddles two bins; at most 2N/G + 1 bins).

    Returns `token_index` (T,), `slot` (T,) the slot of each real token in the (n_bins * G) grid, `source`
    (n_bins * G,) the flat (B*N) token each slot reads, and `mask` (n_bins, 1, G, G) bool: same run and causal.
    Empty slots read token 0 and attend to themselves only, so no softmax row is empty; nothing attends to them
    and their outputs are never read."""
    group = layout.group_size
    token_index, lengths = real_runs(layout, shifted)
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


def binned_half(query, key, value, layout: S2Layout, shifted: bool, attend: Callable):
    """One half of the heads on a padded or packed batch. q: (B, Hq, N, D). Returns (B, N, Hq, D), zero at
    padding."""
    token_index, slot, source, mask = layout.cached(f"bins{int(shifted)}", partial(_bins, layout, shifted))
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


__all__ = ["attend", "binned_half", "group_runs", "regular_half"]
