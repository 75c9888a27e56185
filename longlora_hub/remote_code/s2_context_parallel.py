"""Context parallelism for S²-Attn: one row's tokens split over P ranks, with a halo exchange instead of a ring.

Rank r holds the contiguous shard [r * N/P, (r + 1) * N/P) of every row. Under S² a token attends only to the
earlier tokens of its own group (at most G), so when no group spans more than two ranks, the keys and values a shard
needs that it does not hold are the last few tokens of the previous rank: the halo. With the default layout (N/P a
multiple of G), the unshifted groups lie inside one rank and each shifted group starts G/2 tokens before a shard
boundary, so the halo is G/2 tokens of the shifted heads' keys and values, whatever N and P. Ring attention and
Ulysses move every key/value block (or every token's heads) instead, which grows with N.

The halo lengths come from the whole row's layout (its padding mask and position_ids are O(N) integers, which every
rank of the group has, since context-parallel ranks get the same batch): a halo is the previous shard's suffix that
continues the (document, group) of this shard's first real token. Padding and packing are then exact too. With
`s2_shift="roll"` the last group wraps onto the row's start, so rank 0's previous rank is P - 1.

Per layer, in the forward, each rank sends its suffix of keys and values to the next rank and receives its halo from
the previous one (`torch.distributed` point-to-point); in the backward the halo's gradient goes back the same way.
The shard's queries then attend over [halo, own tokens] with any S² backend (`_HaloExchange`, `_ContextShard`).

This file is shipped as remote code: it imports only the standard library, torch and its sibling files.
"""

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from .s2_attention import s2_attention
from .s2_layout import S2Layout, token_groups


@dataclass(frozen=True)
class ContextParallel:
    """The ranks a row's tokens are split over: `group`, a `torch.distributed` process group of P ranks (None: the
    default group); shard r goes to the r-th rank of the group."""

    group: object = None

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def global_rank(self, rank: int) -> int:
        """The default-group rank of the group's `rank`-th member (point-to-point ops address those)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the group's ranks (a copy)."""
        total = tensor.clone()
        dist.all_reduce(total, group=self.group)
        return total


@dataclass
class _ContextShard:
    """This rank's part of a context-parallel S² forward, shared by every layer (it sits on the shard's layout).

    `start`/`length`: the shard's tokens in the row; `halo_in`: how many tokens of the previous rank it receives
    (the window's halo), `halo_in_halves` the same for the unshifted and the shifted half of the heads; `halo_out`,
    `halo_out_halves`: how many of its own last tokens the next rank needs; `window`: the layout of [halo, own]."""

    parallel: ContextParallel
    start: int
    length: int
    halo_in_halves: tuple[int, int]
    halo_out_halves: tuple[int, int]
    window: S2Layout

    @property
    def halo_in(self) -> int:
        return max(self.halo_in_halves)

    @property
    def halo_out(self) -> int:
        return max(self.halo_out_halves)

    @property
    def previous(self) -> int:
        return self.parallel.global_rank((self.parallel.rank - 1) % self.parallel.size)

    @property
    def next(self) -> int:
        return self.parallel.global_rank((self.parallel.rank + 1) % self.parallel.size)

    def attend(self, query, key, value, scaling: float, dropout: float, backend: str) -> torch.Tensor:
        """S² for this shard's queries. q: (B, Hq, n, D), k/v: (B, Hk, n, D), this rank's tokens. Returns
        (B, n, Hq, D)."""
        key_halo, value_halo = _HaloExchange.apply(key, value, self, query.shape[1])  # (B, Hk, h, D)
        batch, heads, _, dim = query.shape
        # the halo's own queries belong to the previous rank: zeros here, their outputs dropped
        query = torch.cat([query.new_zeros(batch, heads, self.halo_in, dim), query], dim=2)  # (B, Hq, h + n, D)
        key, value = (torch.cat(pair, dim=2) for pair in ((key_halo, key), (value_halo, value)))  # (B, Hk, h + n, D)
        out = s2_attention(query, key, value, self.window, scaling, dropout, backend)  # (B, h + n, Hq, D)
        return out[:, self.halo_in :]


def kv_halo_lengths(halves: tuple[int, int], q_heads: int, kv_heads: int) -> list[int]:
    """Halo tokens each key/value head needs: the longest halo of the halves its query heads are in (query head q
    reads key/value head q // (Hq / Hk); the last Hq // 2 query heads are shifted). With the default layout only the
    shifted half has a halo, so the key/value heads of the unshifted half send nothing."""
    split, n_rep = q_heads - q_heads // 2, q_heads // kv_heads
    return [max(halves[int(q >= split)] for q in range(j * n_rep, (j + 1) * n_rep)) for j in range(kv_heads)]


class _HaloExchange(torch.autograd.Function):
    """Forward: send each key/value head's last tokens that the next rank needs, receive this rank's halo from the
    previous one. Backward: the halo's gradient goes back to the previous rank, and the next rank's gradient of what
    this rank sent is added to its last tokens. k/v: (B, Hk, n, D); returns the halo's k/v (B, Hk, h, D), zero
    where a head needs fewer than h tokens (no query of this shard reads those)."""

    @staticmethod
    def forward(ctx, key, value, shard: _ContextShard, q_heads: int):
        batch, kv_heads, length, dim = key.shape
        sent_lengths = kv_halo_lengths(shard.halo_out_halves, q_heads, kv_heads)
        received_lengths = kv_halo_lengths(shard.halo_in_halves, q_heads, kv_heads)
        ctx.shard, ctx.lengths = shard, (sent_lengths, received_lengths)
        sent = _pack(torch.stack([key, value]), sent_lengths)  # the heads' suffixes, flat
        received = key.new_empty(2 * batch * sum(received_lengths) * dim)
        _exchange(sent, shard.next, received, shard.previous, shard.parallel.group)
        halo = _unpack(received, received_lengths, (2, batch, kv_heads, shard.halo_in, dim))  # (2, B, Hk, h, D)
        return halo[0], halo[1]

    @staticmethod
    def backward(ctx, grad_key, grad_value):
        shard, (sent_lengths, received_lengths) = ctx.shard, ctx.lengths
        batch, kv_heads, _, dim = grad_key.shape
        sent = _pack(torch.stack([grad_key, grad_value]), received_lengths)  # back to the previous rank
        received = grad_key.new_empty(2 * batch * sum(sent_lengths) * dim)
        _exchange(sent, shard.previous, received, shard.next, shard.parallel.group)
        # the gradient of what this rank did not send is zero here (it flows in directly)
        grads = _unpack(received, sent_lengths, (2, batch, kv_heads, shard.length, dim))  # (2, B, Hk, n, D)
        return grads[0], grads[1], None, None


def _pack(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """The last `lengths[j]` tokens of each head j of x (2, B, H, L, D), one flat contiguous tensor."""
    parts = [x[:, :, head, x.shape[3] - length :].reshape(-1) for head, length in enumerate(lengths) if length]
    return torch.cat(parts) if parts else x.new_empty(0)


def _unpack(flat: torch.Tensor, lengths: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of `_pack` into zeros of `shape` (2, B, H, L, D): head j's tokens end each row."""
    out = flat.new_zeros(shape)
    offset, (_, batch, _, total, dim) = 0, shape
    for head, length in enumerate(lengths):
        if length:
            size = 2 * batch * length * dim
            out[:, :, head, total - length :] = flat[offset : offset + size].view(2, batch, length, dim)
            offset += size
    return out


def _exchange(sent: torch.Tensor, to: int, received: torch.Tensor, source: int, group) -> None:
    """Send `sent` to rank `to` while receiving `received` from rank `source`; an empty tensor is not sent."""
    ops = []
    if sent.numel():
        ops.append(dist.P2POp(dist.isend, sent, to, group))
    if received.numel():
        ops.append(dist.P2POp(dist.irecv, received, source, group))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def _group_ids(layout: S2Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) for each half: one integer per (document, group), unique in its row (`s2_layout.token_groups`)."""
    return tuple(token_groups(layout, shifted)[0] for shifted in (False, True))


def shard_layout(layout: S2Layout, parallel: ContextParallel) -> S2Layout:
    """The layout of this rank's shard of `layout` (the whole rows), with the halo lengths every rank agrees on.

    Raises:
        `ValueError`: N is not a multiple of P, or a group would span more than two ranks (with the fix named).
    """
    size, rank = parallel.size, parallel.rank
    n_total, group = layout.seq_len, layout.group_size
    if n_total % size:
        raise ValueError(
            f"context_parallel_size={size} must divide the row length: rows of {n_total} tokens do not split evenly. "
            f"Pad rows to a multiple of {size} (the collator's pad_to_multiple_of), or choose max_length accordingly."
        )
    length = n_total // size
    if group // 2 > length:
        raise ValueError(
            f"context_parallel_size={size} leaves {length} tokens per rank, fewer than half an S² group "
            f"(s2_group_size={group}): a group would span more than two ranks. Use a context_parallel_size of at most "
            f"{max(1, 2 * n_total // group)}, or a smaller s2_group_size."
        )
    ids = _group_ids(layout)  # per half (B, N)
    rank_of = torch.arange(n_total, device=layout.valid.device) // length  # (N,)
    _check_spans(ids, layout.valid, rank_of, size, layout.shift == "roll", group)
    cyclic = layout.shift == "roll"
    # per half: what this rank receives, and what the next rank receives from it (the other ranks' are theirs)
    halo_in_halves, halo_out_halves = (
        _halo(ids, layout.valid, r % size, length, size, cyclic) for r in (rank, rank + 1)
    )
    halo_in = max(halo_in_halves)
    start = rank * length
    window_index = torch.arange(start - halo_in, start + length, device=layout.valid.device) % n_total  # (h + n,)
    valid = layout.valid[:, window_index]
    groups = tuple(_runs(ids_half[:, window_index], valid) for ids_half in ids)
    window = S2Layout(
        group,
        "segments",  # the groups are given: nothing is rolled or shifted on the window
        False,
        valid,
        torch.zeros_like(layout.doc[:, window_index]),
        layout.local[:, window_index],
        empty=not bool(valid.any()),
        groups=groups,
    )
    shard = _ContextShard(parallel, start, length, halo_in_halves, halo_out_halves, window)
    own = slice(start, start + length)
    return replace(
        layout,
        valid=layout.valid[:, own],
        doc=layout.doc[:, own],
        local=layout.local[:, own],
        regular=False,
        groups=None,
        shard=shard,
        _derived={},
    )


def _runs(ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, L) ids -> one id per run of consecutive real tokens with the same (document, group), counted from 1 in
    each row (a padding token takes the id of the run before it). The window's groups are its runs: a group of the
    previous shard that is not continued across the boundary (one the halo holds for another row or half of the
    heads) stays apart from this shard's tokens of the same group, on every backend."""
    runs = torch.zeros_like(ids)
    for row in range(ids.shape[0]):
        real = valid[row].nonzero().squeeze(-1)  # (T,)
        keys = ids[row, real]
        starts = torch.ones_like(keys, dtype=torch.bool)
        starts[1:] = keys[1:] != keys[:-1]
        runs[row, real] = starts.long()
        runs[row] = runs[row].cumsum(0)
    return runs


def _halo(ids, valid, rank: int, length: int, size: int, cyclic: bool) -> tuple[int, int]:
    """For each half of the heads, how many of the previous rank's last tokens rank `rank` needs: those of the run
    (document, group) that its first real token continues (groups are consecutive in causal order, the roll's
    wrapped one included, so no other group crosses the boundary)."""
    if rank == 0 and not cyclic:
        return 0, 0
    previous = (rank - 1) % size
    own = slice(rank * length, (rank + 1) * length)
    before = slice(previous * length, (previous + 1) * length)
    halves = []
    for ids_half in ids:
        first = length
        for row in range(ids_half.shape[0]):
            mine = valid[row, own].nonzero()
            if not mine.numel():
                continue
            key = ids_half[row, own][mine[0, 0]]  # the group of this shard's first real token
            tokens, real = ids_half[row, before], valid[row, before]
            other = (real & (tokens != key)).nonzero()  # the run ends at the last real token of another group
            start = int(other[-1]) + 1 if other.numel() else 0
            needed = (real[start:] & (tokens[start:] == key)).nonzero()
            if needed.numel():
                first = min(first, start + int(needed[0]))
        halves.append(length - first)
    return halves[0], halves[1]


def _check_spans(ids, valid, rank_of, size: int, cyclic: bool, group: int) -> None:
    """Every group's real tokens lie on one rank or two neighbours (cyclically under the roll)."""
    for ids_half in ids:
        for row in range(ids_half.shape[0]):
            real = valid[row]
            pairs = torch.unique(ids_half[row][real] * size + rank_of[real])  # one per (group, rank)
            groups, ranks = pairs // size, pairs % size
            _, counts = torch.unique_consecutive(groups, return_counts=True)
            spans = torch.split(ranks, counts.tolist())
            for ranks_of_group in spans:
                low, high = int(ranks_of_group[0]), int(ranks_of_group[-1])
                neighbours = high - low <= 1 or (cyclic and len(ranks_of_group) == 2 and (low, high) == (0, size - 1))
                if len(ranks_of_group) > 2 or not neighbours:
                    raise ValueError(
                        f"context_parallel_size={size}: an S² group of up to {group} tokens spans ranks "
                        f"{ranks_of_group.tolist()}, but a shard only receives keys and values from the rank before "
                        "it. Use fewer ranks (longer shards) or a smaller s2_group_size."
                    )
