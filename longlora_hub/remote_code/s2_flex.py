"""S²-Attn with FlexAttention (`flex_attention`, `s2_flex_attention`): one kernel call for all the heads, with a
block mask in which a head's half picks its groups. Its backward needs a GPU (torch has none on CPU).

This file is shipped as remote code: it imports only torch, transformers and its sibling files.
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from .s2_layout import S2Layout, token_groups

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
    heads `s` (0 unshifted, 1 shifted), the row and the query and key positions (`s2_layout.token_groups`: same
    group, and the key no later in the group's causal order). Tensors broadcast, so the same rule serves the
    kernel's `mask_mod` (scalars) and the block mask's construction (blocks of positions). The positions past N are
    padding: each attends to itself only."""
    pad = (0, length - layout.seq_len)
    valid = F.pad(layout.valid, pad)  # (B, L)
    halves = [token_groups(layout, shifted) for shifted in (False, True)]
    groups = torch.stack([F.pad(group, pad) for group, _ in halves])  # (2, B, L)
    order = torch.stack([F.pad(order, pad) for _, order in halves])  # (2, B, L)

    def allowed(s, b, q, kv):
        ok = (groups[s, b, q] == groups[s, b, kv]) & (order[s, b, kv] <= order[s, b, q])
        ok = ok & valid[b, kv] & valid[b, q]
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


def flex_attention(query, key, value, layout: S2Layout, split: int, scaling: float):
    """S² for every head at once: q (B, Hq, N, D), the first `split` heads unshifted. Returns (B, Hq, N, D)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as kernel

    if _compiled_flex is None:
        # static shapes, one per bucket of `_flex_length` (dynamic shapes fail to compile on CPU, torch 2.13)
        _compiled_flex = torch.compile(kernel, dynamic=False)
    heads, seq_len = query.shape[1], query.shape[2]
    length = _flex_length(seq_len)
    block_mask = layout.cached(f"flex{heads}/{split}/{length}", partial(_flex_block_mask, layout, heads, split, length))
    if length > seq_len:
        query, key, value = (F.pad(x, (0, 0, 0, length - seq_len)) for x in (query, key, value))  # (B, H, L, D)
    out = _compiled_flex(
        query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )  # (B, Hq, L, D)
    return out[:, :, :seq_len] * layout.valid[:, None, :, None]  # (B, Hq, N, D)


__all__ = ["flex_attention"]
