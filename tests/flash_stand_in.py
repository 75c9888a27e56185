"""A pure-torch stand-in for flash-attn 2's `flash_attn_varlen_func`, so that the flash_attention_2 path of S² runs
on CPU in the test suite. Test-only: nothing here is shipped.

It has the real function's signature and, for what S² uses (varlen, causal, GQA/MQA, dropout, softmax scale), its
semantics: causal masks are aligned at the bottom right (flash-attn >= 2.1), a query row with nothing to attend to
gives zeros, and the result has q's dtype. It refuses what the kernel refuses, with flash-attn's messages, and what
the kernel silently trusts (cu_seqlens that do not cover the tokens, a max_seqlen below the longest sequence), since
on a GPU those would be wrong results, not errors. Features S² never uses (sliding windows, softcap, ALiBi, paged
KV, returning the probabilities) are refused rather than imitated.

The maths is plain torch per sequence (matmul, softmax in float32, or float64 for float64 inputs), so autograd
gives the gradients.
"""

import inspect
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from longlora_hub.remote_code import s2_attention as s2_module
from longlora_hub.remote_code import s2_flash

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
PARITY_DTYPES = (torch.float32, torch.float64)  # accepted with strict=False only
MAX_HEAD_DIM = 256


def _check(condition: bool, message: str) -> None:
    """Raise like the kernel's TORCH_CHECK: a RuntimeError with its message."""
    if not condition:
        raise RuntimeError(message)


def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, strict: bool) -> None:
    """The kernel's input checks, plus those of what it trusts without checking."""
    dtypes = KERNEL_DTYPES if strict else KERNEL_DTYPES + PARITY_DTYPES
    _check(q.dtype in dtypes, "FlashAttention only support fp16 and bf16 data type")
    _check(k.dtype == q.dtype, "query and key must have the same dtype")
    _check(v.dtype == q.dtype, "query and value must have the same dtype")
    for name, cu_seqlens in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _check(isinstance(cu_seqlens, torch.Tensor), f"{name} must be a tensor")
        _check(cu_seqlens.dtype == torch.int32, f"{name} must have dtype int32")
        _check(cu_seqlens.device == q.device, f"{name} must be on the same device as q ({q.device})")
        _check(cu_seqlens.dim() == 1 and cu_seqlens.is_contiguous(), f"{name} must be contiguous")
    _check(k.device == q.device and v.device == q.device, "q, k and v must be on the same device")
    # the real op's schema declares `int`: a tensor (one more host sync per call) is refused there too
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        _check(type(value) is int, f"{name} must be a Python int, got {type(value).__name__}")
    # the C++ kernel's check; the Python wrapper would copy such an input first, hiding a full copy per call
    _check(all(x.stride(-1) == 1 for x in (q, k, v)), "Input tensor must have contiguous last dimension")
    _check(q.dim() == 3, "q must have shape (total_q, num_heads, head_size)")
    total_q, num_heads, head_size = q.shape
    _check(k.dim() == 3 and k.shape[2] == head_size, "k must have shape (total_k, num_heads_k, head_size)")
    _check(v.shape == k.shape, "v must have shape (total_k, num_heads_k, head_size)")
    total_k, num_heads_k = k.shape[:2]
    _check(head_size <= MAX_HEAD_DIM, f"FlashAttention forward only supports head dimension at most {MAX_HEAD_DIM}")
    _check(
        num_heads_k > 0 and num_heads % num_heads_k == 0,
        "Number of heads in key/value must divide number of heads in query",
    )
    batch = cu_seqlens_q.numel() - 1
    _check(batch > 0, "batch size must be positive")
    _check(cu_seqlens_k.numel() == batch + 1, "cu_seqlens_k must have shape (batch_size + 1)")
    for name, cu_seqlens, total, max_seqlen in (
        ("q", cu_seqlens_q, total_q, max_seqlen_q),
        ("k", cu_seqlens_k, total_k, max_seqlen_k),
    ):
        bounds = cu_seqlens.tolist()
        lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
        _check(
            bounds[0] == 0 and bounds[-1] == total and min(lengths) >= 0,
            f"cu_seqlens_{name} must rise from 0 to total_{name}={total}, got {bounds}",
        )
        _check(max(lengths) <= max_seqlen, f"max_seqlen_{name}={max_seqlen} is below the longest sequence")


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
    *,
    strict=True,
):
    """Attention over the sequences packed in q (total_q, Hq, D) and k/v (total_k, Hk, D), sequence i being rows
    [cu_seqlens[i], cu_seqlens[i + 1]); query head h reads key/value head h // (Hq / Hk). `causal`: query i of a
    sequence of Lq queries and Lk keys sees the keys j <= i + Lk - Lq (bottom-right aligned). `dropout_p` drops
    probabilities (scaling the others by 1 / (1 - p)), fresh each call. `deterministic` changes nothing here.

    `strict=False` (not flash-attn's) also accepts float32 and float64, for parity checks far below bf16's
    precision. Returns (total_q, Hq, D) in q's dtype."""
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, strict)
    unsupported = {
        "window_size": tuple(window_size) != (-1, -1),
        "softcap": softcap != 0.0,
        "alibi_slopes": alibi_slopes is not None,
        "return_attn_probs": return_attn_probs,
        "block_table": block_table is not None,
    }
    refused = [name for name, used in unsupported.items() if used]
    if refused:
        raise NotImplementedError(f"the flash-attn stand-in does not implement {', '.join(refused)}")
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_rep = q.shape[1] // k.shape[1]
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outputs = []
    # a kernel is not autocast: its arithmetic is its own whatever the caller's autocast state
    with torch.autocast(q.device.type, enabled=False):
        for bounds in zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:], strict=True):
            outputs.append(_attend_one(q, k, v, *bounds, compute, n_rep, softmax_scale, causal, dropout_p))
    return torch.cat(outputs).to(q.dtype)  # (total_q, Hq, D)


def _attend_one(q, k, v, start_q, end_q, start_k, end_k, compute, n_rep, softmax_scale, causal, dropout_p):
    """One sequence of the varlen batch: rows [start_q, end_q) of q against [start_k, end_k) of k/v."""
    query = q[start_q:end_q].to(compute).transpose(0, 1)  # (Hq, Lq, D)
    key, value = (x[start_k:end_k].to(compute).repeat_interleave(n_rep, 1).transpose(0, 1) for x in (k, v))
    scores = torch.matmul(query * softmax_scale, key.transpose(-1, -2))  # (Hq, Lq, Lk)
    len_q, len_k = scores.shape[-2:]
    keep = torch.ones(len_q, len_k, dtype=torch.bool, device=q.device)  # (Lq, Lk)
    if causal:
        keep = keep.tril(len_k - len_q)
    # a finite fill and `* keep`: masked keys weigh exactly 0, a row with no key gives 0, and no NaN arises
    probs = torch.softmax(scores.masked_fill(~keep, torch.finfo(compute).min), dim=-1) * keep  # (Hq, Lq, Lk)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, value).transpose(0, 1)  # (Lq, Hq, D)


# flash-attn's own signature: the stand-in's without `strict`
_SIGNATURE = inspect.signature(flash_attn_varlen_func)
_SIGNATURE = _SIGNATURE.replace(parameters=[p for p in _SIGNATURE.parameters.values() if p.name != "strict"])


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    strict=True,
):
    """flash-attn 2's batched form: q (B, Lq, Hq, D), k/v (B, Lk, Hk, D), every row one sequence. The varlen
    function over B equal sequences; returns (B, Lq, Hq, D)."""
    batch, q_len, k_len = q.shape[0], q.shape[1], k.shape[1]
    cu_q, cu_k = (torch.arange(0, (batch + 1) * n, n, dtype=torch.int32, device=q.device) for n in (q_len, k_len))
    out = flash_attn_varlen_func(
        *(x.reshape(-1, *x.shape[2:]) for x in (q, k, v)),
        cu_q,
        cu_k,
        q_len,
        k_len,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        strict=strict,
    )  # (B*Lq, Hq, D)
    return out.view(batch, q_len, *out.shape[1:])


@dataclass
class FlashCall:
    """What one call to the kernel was given."""

    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype]  # q, k, v
    heads: tuple[int, int]  # Hq, Hk
    cu_seqlens_q: list[int]
    cu_seqlens_k: list[int]
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool
    softmax_scale: float | None
    dropout_p: float


@dataclass
class FlashStandIn:
    """The kernel S² gets while patched in: runs [`flash_attn_varlen_func`] and records every call."""

    strict: bool = True
    calls: list[FlashCall] = field(default_factory=list)
    # what `inspect.signature` reports: transformers reads the kernel's parameters to decide which to pass
    __signature__ = _SIGNATURE

    def __call__(self, *args, **kwargs):
        bound = _SIGNATURE.bind(*args, **kwargs)  # a TypeError for what the real function would not take either
        bound.apply_defaults()
        given = bound.arguments
        self.calls.append(
            FlashCall(
                dtypes=(given["q"].dtype, given["k"].dtype, given["v"].dtype),
                heads=(given["q"].shape[1], given["k"].shape[1]),
                cu_seqlens_q=_as_list(given["cu_seqlens_q"]),
                cu_seqlens_k=_as_list(given["cu_seqlens_k"]),
                max_seqlen_q=given["max_seqlen_q"],
                max_seqlen_k=given["max_seqlen_k"],
                causal=given["causal"],
                softmax_scale=given["softmax_scale"],
                dropout_p=given["dropout_p"],
            )
        )
        return flash_attn_varlen_func(*args, **{**kwargs, "strict": self.strict})


def _as_list(cu_seqlens) -> list[int]:
    """cu_seqlens as recorded: its values, whatever was passed (the checks judge it afterwards)."""
    return cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)


def use_flash_stand_in(monkeypatch: pytest.MonkeyPatch, strict: bool = True) -> FlashStandIn:
    """Make S²'s flash_attention_2 path call the stand-in (until the test ends) and return it, with its calls.
    With `strict=False` S² is also told that the kernel takes float32/float64, so that it hands them over uncast."""
    stand_in = FlashStandIn(strict)
    # a checkpoint loaded earlier with trust_remote_code registered the `s2_*` names to its own copy of this module:
    # register this package's again, so that the generic functions read what is patched here
    s2_module._register()
    monkeypatch.setattr(s2_flash, "_flash_varlen_func", lambda: stand_in)
    if not strict:
        monkeypatch.setattr(s2_flash, "_FLASH_KERNEL_DTYPES", KERNEL_DTYPES + PARITY_DTYPES)
    return stand_in
