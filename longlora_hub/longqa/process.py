"""Processing steps of the LongQA builder: token counts, length buckets, exact and near-duplicate removal, the
seeded train/validation split and the statistics. Each step is a plain function of its inputs, so each is tested
on its own.

Near-duplicates are found with MinHash over word shingles and locality-sensitive hashing, written here with numpy
and fixed seeds so that a build is reproducible bit for bit. Two rows are near-duplicates when their prompts AND
their completions are both near-identical: LongAlpaca asks several questions about the same paper, and those rows
share almost all their prompt text but are not duplicates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

NUM_PERM = 64  # hash functions per signature (per prompt and per completion)
SHINGLE_WORDS = 5
BANDS = 16  # LSH bands; each band takes NUM_PERM // BANDS values of both signatures
DEFAULT_NEAR_DUP_THRESHOLD = 0.8
LENGTH_BUCKET_EDGES = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
_MASK64 = (1 << 64) - 1


def count_tokens(
    tokenizer, prompts: Sequence[str], completions: Sequence[str], chars_per_call: int = 1_000_000
) -> list[int]:
    r"""
    The length of each training example, as the LongQA training stage measures it.

    With a tokenizer: the tokens of `prompt + completion` with the tokenizer's special tokens, plus one for the
    EOS that TRL appends; this is what `longlora_hub.training.drop_too_long` compares with `max_length`, so a row
    kept here fits there. Without a tokenizer: the whitespace-separated words of both, a rough stand-in.

    Args:
        tokenizer (`PreTrainedTokenizerBase` or `None`): A fast tokenizer encodes each call's batch in parallel.
        prompts (`Sequence[str]`): The prompts.
        completions (`Sequence[str]`): The completions, one per prompt.
        chars_per_call (`int`, *optional*, defaults to `1_000_000`): Texts are encoded in calls of about this many
            characters: an encoding keeps offsets and token strings for every token (~100 bytes each), so one call
            over a batch of book-length rows would need gigabytes for numbers of which only the count is kept.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if tokenizer is None:
        return [len(p.split()) + len(c.split()) for p, c in zip(prompts, completions, strict=True)]
    lengths: list[int] = []
    pending: list[str] = []
    size = 0

    def flush() -> None:
        encoded = tokenizer(pending, add_special_tokens=True, return_attention_mask=False, verbose=False)
        lengths.extend(len(ids) + 1 for ids in encoded["input_ids"])
        pending.clear()

    for prompt, completion in zip(prompts, completions, strict=True):
        pending.append(prompt + completion)
        size += len(pending[-1])
        if size >= chars_per_call:
            flush()
            size = 0
    if pending:
        flush()
    return lengths


def _short_size(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens and tokens % 1024 == 0 else str(tokens)


def length_bucket(num_tokens: int, edges: Sequence[int] = LENGTH_BUCKET_EDGES) -> str:
    """The bucket label of a length: `"0-1k"`, `"1k-2k"`, ..., `">128k"` (upper bounds inclusive)."""
    lower = 0
    for edge in edges:
        if num_tokens <= edge:
            return f"{_short_size(lower)}-{_short_size(edge)}"
        lower = edge
    return f">{_short_size(lower)}"


def length_buckets(lengths: Iterable[int], edges: Sequence[int] = LENGTH_BUCKET_EDGES) -> dict[str, int]:
    """How many lengths fall in each bucket, every bucket listed (in order) even when empty."""
    counts = {length_bucket(edge, edges): 0 for edge in edges}
    counts[length_bucket(edges[-1] + 1, edges)] = 0
    for length in lengths:
        counts[length_bucket(length, edges)] += 1
    return counts


def exact_key(prompt: str, completion: str) -> str:
    """A digest of the exact text of a row (prompt and completion kept apart, so moving text across the two is a
    different row)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(prompt.encode("utf-8", "surrogatepass"))
    digest.update(b"\x00")
    digest.update(completion.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


# Words are runs of letters and digits: ASCII punctuation and whitespace become separators, ASCII letters lower
# case, and every non-ASCII byte stays part of a word (so accented and non-Latin words survive).
_BYTE_TABLE = bytes((ord(chr(b).lower()) if chr(b).isalnum() else 32) if b < 128 else b for b in range(256))
_BASE = np.uint64(0x100000001B3)  # odd, so invertible modulo 2**64
_BASE_INVERSE = np.uint64(pow(int(_BASE), -1, 1 << 64))
_SHINGLE_MULTIPLIERS = np.array([0x9E3779B97F4A7C15 * (2 * i + 1) & _MASK64 for i in range(16)], dtype=np.uint64)
_PERM_RNG = np.random.default_rng(0x5EED)  # fixed: signatures must not change between runs or processes
_PERM_A = _PERM_RNG.integers(0, 1 << 63, size=NUM_PERM, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
_PERM_B = _PERM_RNG.integers(0, 1 << 63, size=NUM_PERM, dtype=np.uint64)
_powers: dict[str, np.ndarray] = {}


def _power_table(name: str, base: np.uint64, size: int) -> np.ndarray:
    """base**0 .. base**(size-1) modulo 2**64, grown on demand and cached (per process)."""
    table = _powers.get(name)
    if table is None or len(table) < size:
        size = max(size, 2 * len(table) if table is not None else 1 << 16)
        table = np.empty(size, dtype=np.uint64)
        table[0] = 1
        table[1:] = np.cumprod(np.full(size - 1, base, dtype=np.uint64))
        _powers[name] = table
    return table


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the output, so sums of word hashes look random."""
    values = values ^ (values >> np.uint64(30))
    values = values * np.uint64(0xBF58476D1CE4E5B9)
    values = values ^ (values >> np.uint64(27))
    values = values * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def word_hashes(text: str) -> np.ndarray:
    r"""
    A 64-bit hash of every word of `text`, in order (see `_BYTE_TABLE` for what a word is).

    Vectorised with a prefix sum of polynomial byte hashes, `H[i] = sum(b[j] * B**j, j < i)`: the hash of the word
    `[s, e)` is `(H[e] - H[s]) * B**-s`, the same wherever the word occurs. All arithmetic wraps modulo 2**64.
    """
    data = text.lower().encode("utf-8", "surrogatepass").translate(_BYTE_TABLE)
    codes = np.frombuffer(data, dtype=np.uint8)
    if codes.size == 0:
        return np.empty(0, dtype=np.uint64)
    is_word = np.concatenate(([False], codes != 32, [False]))
    edges = np.flatnonzero(is_word[1:] != is_word[:-1])
    starts, ends = edges[0::2], edges[1::2]
    if starts.size == 0:
        return np.empty(0, dtype=np.uint64)
    powers = _power_table("base", _BASE, codes.size + 1)
    prefix = np.zeros(codes.size + 1, dtype=np.uint64)
    np.cumsum(codes.astype(np.uint64) * powers[: codes.size], out=prefix[1:])
    inverse = _power_table("inverse", _BASE_INVERSE, codes.size + 1)
    return (prefix[ends] - prefix[starts]) * inverse[starts]


def shingle_hashes(text: str, shingle: int = SHINGLE_WORDS) -> np.ndarray:
    """The distinct hashes of the `shingle`-word windows of `text` (one window of all words when it is shorter)."""
    words = word_hashes(text)
    if words.size == 0:
        return words
    width = min(shingle, words.size)
    count = words.size - width + 1
    combined = np.zeros(count, dtype=np.uint64)
    for offset in range(width):
        combined += words[offset : offset + count] * _SHINGLE_MULTIPLIERS[offset]
    return np.unique(_mix(combined))


def minhash_signature(text: str, shingle: int = SHINGLE_WORDS, chunk: int = 4096) -> np.ndarray:
    r"""
    The MinHash signature (`NUM_PERM` unsigned 64-bit values) of the word shingles of `text`.

    The fraction of equal values in two signatures estimates the Jaccard similarity of the two shingle sets.
    The hash functions are fixed (seeded), so signatures are the same in every run and every process. Text with
    no word gets all-ones, which only matches another text with no word.
    """
    shingles = shingle_hashes(text, shingle)
    signature = np.full(NUM_PERM, np.iinfo(np.uint64).max, dtype=np.uint64)
    for begin in range(0, shingles.size, chunk):
        block = shingles[begin : begin + chunk, None] * _PERM_A[None, :] + _PERM_B[None, :]
        block ^= block >> np.uint64(32)
        np.minimum(signature, block.min(axis=0), out=signature)
    return signature


def estimate_jaccard(first: np.ndarray, second: np.ndarray) -> float:
    """The Jaccard similarity estimated from two MinHash signatures."""
    return float(np.mean(np.asarray(first) == np.asarray(second)))


class Deduplicator:
    r"""
    Finds exact and near-duplicate rows, keeping the first of each group (in the order rows are offered).

    Near-duplicates: LSH over `BANDS` bands, each band made of a slice of the prompt's signature together with
    the same slice of the completion's, so a candidate pair already agrees on both; a candidate is a duplicate
    when the estimated Jaccard similarity of the prompts and of the completions both reach `threshold`. Pairs at
    0.8/0.8 are found with probability ~0.95, pairs at 0.9/0.9 with probability > 0.999.

    Args:
        threshold (`float`, *optional*, defaults to `0.8`): The similarity above which rows are near-duplicates;
            `None` keeps exact deduplication only.
    """

    def __init__(self, threshold: float | None = DEFAULT_NEAR_DUP_THRESHOLD):
        if threshold is not None and not 0 < threshold <= 1:
            raise ValueError(f"the near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.exact: dict[str, int] = {}
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(BANDS)]
        self.signatures: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _band_keys(self, prompt_sig: np.ndarray, completion_sig: np.ndarray) -> list[bytes]:
        rows = NUM_PERM // BANDS
        return [
            prompt_sig[band * rows : (band + 1) * rows].tobytes()
            + completion_sig[band * rows : (band + 1) * rows].tobytes()
            for band in range(BANDS)
        ]

    def add(
        self,
        row_id: int,
        key: str,
        prompt_sig: np.ndarray | None = None,
        completion_sig: np.ndarray | None = None,
    ) -> tuple[str, int] | None:
        r"""
        Offer a row; `None` when it is new (and now kept), else `("exact" | "near", id of the kept row)`.

        Args:
            row_id (`int`): The row's id, returned for later rows that duplicate it.
            key (`str`): `exact_key` of the row.
            prompt_sig, completion_sig (`np.ndarray`, *optional*): `minhash_signature`s; needed for near-duplicates.
        """
        if key in self.exact:
            return "exact", self.exact[key]
        if self.threshold is not None and prompt_sig is not None and completion_sig is not None:
            prompt_sig = np.asarray(prompt_sig, dtype=np.uint64)
            completion_sig = np.asarray(completion_sig, dtype=np.uint64)
            keys = self._band_keys(prompt_sig, completion_sig)
            checked: set[int] = set()
            for band, band_key in enumerate(keys):
                for other in self.buckets[band].get(band_key, ()):
                    if other in checked:
                        continue
                    checked.add(other)
                    other_prompt, other_completion = self.signatures[other]
                    if (
                        estimate_jaccard(prompt_sig, other_prompt) >= self.threshold
                        and estimate_jaccard(completion_sig, other_completion) >= self.threshold
                    ):
                        return "near", other
            for band, band_key in enumerate(keys):
                self.buckets[band].setdefault(band_key, []).append(row_id)
            self.signatures[row_id] = (prompt_sig, completion_sig)
        self.exact[key] = row_id
        return None


def split_indices(num_rows: int, validation_size: float, seed: int) -> tuple[list[int], list[int]]:
    r"""
    A seeded train/validation split of `range(num_rows)`, both parts in a seeded random order.

    The same `(num_rows, validation_size, seed)` always gives the same split; another seed gives another.

    Args:
        num_rows (`int`): How many rows.
        validation_size (`float`): The validation fraction in [0, 1); any positive fraction gives at least one
            validation row when there are at least two rows, so a small build still has a validation split.
        seed (`int`): The seed.

    Returns:
        `(train, validation)`: lists of row indices.
    """
    if not 0 <= validation_size < 1:
        raise ValueError(f"validation_size must be in [0, 1), got {validation_size}")
    order = np.random.default_rng(seed).permutation(num_rows).tolist()
    count = 0
    if validation_size > 0 and num_rows >= 2:
        count = min(num_rows - 1, max(1, round(num_rows * validation_size)))
    return order[count:], order[:count]


def short_rows_for_ratio(num_long: int, ratio: float) -> int:
    """How many short rows make them `ratio` of the output next to `num_long` long rows (0.25: 9k long -> 3k)."""
    if not 0 <= ratio < 1:
        raise ValueError(f"the short ratio must be in [0, 1), got {ratio}")
    return round(ratio * num_long / (1 - ratio))


def _summary(lengths: list[int]) -> dict[str, Any]:
    if not lengths:
        return {"rows": 0, "tokens": 0, "mean_tokens": 0, "min_tokens": 0, "max_tokens": 0}
    values = np.asarray(lengths)
    return {
        "rows": len(lengths),
        "tokens": int(values.sum()),
        "mean_tokens": round(float(values.mean()), 1),
        "min_tokens": int(values.min()),
        "median_tokens": int(np.median(values)),
        "max_tokens": int(values.max()),
    }


def row_stats(sources: Sequence[str], tasks: Sequence[str], lengths: Sequence[int]) -> dict[str, Any]:
    r"""
    Statistics of the kept rows: overall, by source, by task, by source and task, and length buckets.

    Args:
        sources, tasks, lengths (`Sequence`): One entry per row (`source`, `task`, `num_tokens` columns).
    """
    by_source: dict[str, list[int]] = {}
    by_task: dict[str, list[int]] = {}
    by_pair: dict[str, list[int]] = {}
    for source, task, length in zip(sources, tasks, lengths, strict=True):
        by_source.setdefault(source, []).append(length)
        by_task.setdefault(task, []).append(length)
        by_pair.setdefault(f"{source}/{task}", []).append(length)
    return {
        "all": _summary(list(lengths)),
        "by_source": {name: _summary(values) for name, values in sorted(by_source.items())},
        "by_task": {name: _summary(values) for name, values in sorted(by_task.items())},
        "by_source_task": {name: _summary(values) for name, values in sorted(by_pair.items())},
        "length_buckets": length_buckets(lengths),
    }


__all__ = [
    "BANDS",
    "DEFAULT_NEAR_DUP_THRESHOLD",
    "LENGTH_BUCKET_EDGES",
    "NUM_PERM",
    "SHINGLE_WORDS",
    "Deduplicator",
    "count_tokens",
    "estimate_jaccard",
    "exact_key",
    "length_bucket",
    "length_buckets",
    "minhash_signature",
    "row_stats",
    "shingle_hashes",
    "short_rows_for_ratio",
    "split_indices",
    "word_hashes",
]
