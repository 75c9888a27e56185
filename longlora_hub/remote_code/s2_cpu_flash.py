"""S²-Attn on regular rows with the sdpa backend on CPU: torch's flash kernel called per group, writing into one
tensor per result.

On CPU, `F.scaled_dot_product_attention` runs torch's flash kernel, which allocates each call's output and, in the
backward, zero-filled gradients shaped like the call's inputs. Called per group through SDPA, every call's output
is kept for the backward next to the joined output, and every call's gradients live until the split's backward
cats them: both the output and the gradients then exist twice. `S2FlashCPU` calls the same kernel
(`aten::_scaled_dot_product_flash_attention_for_cpu` and its backward) on strided views of q/k/v, copies each
call's output into ONE (B, N, Hq, D) tensor and each call's gradients into ONE gradient per input (in the input's
own layout), and frees each call's results before the next call. Beyond the output and the gradients (what full
attention holds too), the backward then holds one call's blocks at a time: its three gradients and the contiguous
copy of its output gradient that the kernel makes, plus the kernel's scratch. A call covers about as many
(group, head) pairs as torch has threads: the backward kernel runs one pair per thread, so fewer pairs would idle
threads and more would only cost memory. It also spans at least _FLASH_MIN_TOKENS tokens: many small calls lose
much more time than a few large ones when other jobs share the cores. The forward uses the same calls, so that
every block either pass allocates has the same size and glibc can reuse the freed ones.

This file is shipped as remote code: it imports only torch, transformers and its sibling files.
"""

from dataclasses import dataclass
from functools import partial

import torch
from torch.autograd.function import once_differentiable

from .s2_dense import group_runs
from .s2_layout import S2Layout, group_plan

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


def cpu_flash_usable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> bool:
    """Whether `S2FlashCPU` can run: CPU tensors of one floating dtype and head size, each row of D contiguous,
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
    for ranges, count in group_runs(plan, group):
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


def flash_calls(layout: S2Layout, q_heads: int, kv_heads: int, pairs: int) -> tuple[_FlashCall, ...]:
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
        plan = layout.cached(f"plan{int(shifted)}", partial(group_plan, layout.seq_len, group, layout.shift, shifted))
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


class S2FlashCPU(torch.autograd.Function):
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


__all__ = ["S2FlashCPU", "cpu_flash_usable", "flash_calls"]
