r"""Passkey retrieval, the long-context test of the LongLoRA paper (after Mohtashami & Jaggi's landmark attention).

A prompt of a given length (in tokens of the model's tokenizer) hides one pass key K in repeated filler text:

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz ...
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. The grass is ...
    The pass key is K. Remember it. K is the pass key.
    The grass is green. The sky is blue. ...
    What is the pass key? The pass key is

The model continues the prompt greedily for as many tokens as the answer " K" has, and a trial counts only when
those tokens are exactly the answer's. As in the reference, nothing after them is generated or judged: a model that
would go on with more digits after K's tokens still passes. K is uniform in [1, 50000). The parts are joined with
newlines as in the reference script; unlike it, the filler is cut at sentence boundaries rather than at a character
count, so that a prompt can be sized in tokens of any tokenizer.

Depth is where the needle sits: the index of its first token over the prompt's length. Depths near 0 or 1 are
clamped to the closest the fixed parts allow (just after the task description, just before the question). Trial `t`
draws its key (and, without fixed depths, its depth) from a generator seeded with `(seed, t)`, so every length and
depth of a run sees the same keys and a run is reproducible.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

TASK_DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you "
    "about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
KEY_RANGE = (1, 50000)  # keys are drawn from [1, 50000), like the reference
LENGTH_TOLERANCE = 0.05
_SENTENCES = tuple(sentence.strip() for sentence in re.findall(r"[^.]+\.", FILLER))


def needle(key: int) -> str:
    """The sentence that holds the pass key."""
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def filler(sentences: int) -> str:
    """The first `sentences` sentences of the filler repeated without end."""
    return " ".join(_SENTENCES[i % len(_SENTENCES)] for i in range(sentences))


@dataclass
class PasskeyPrompt:
    r"""
    One passkey prompt, tokenized.

    Args:
        text (`str`): The prompt.
        input_ids (`list[int]`): Its tokens (with the tokenizer's special tokens, e.g. BOS).
        answer_ids (`list[int]`): The tokens that continue the prompt with `" K"`: the exact answer.
        key (`int`): The pass key K.
        length (`int`): The length asked for, in tokens.
        depth (`float`): The depth asked for, in [0, 1].
        needle_index (`int`): The index of the needle's first token in `input_ids`.
    """

    text: str
    input_ids: list[int]
    answer_ids: list[int]
    key: int
    length: int
    depth: float
    needle_index: int

    @property
    def needle_depth(self) -> float:
        """Where the needle actually is: its first token's index over the prompt's length."""
        return self.needle_index / len(self.input_ids)


def _render(prefix_sentences: int, suffix_sentences: int, key: int) -> tuple[str, int]:
    """The prompt text and the character index where the needle starts."""
    prefix = filler(prefix_sentences)
    text = "\n".join([TASK_DESCRIPTION, prefix, needle(key), filler(suffix_sentences), QUESTION])
    return text, len(TASK_DESCRIPTION) + 1 + len(prefix) + 1


def _encode(tokenizer: Any, text: str, char_index: int) -> tuple[list[int], int]:
    """The tokens of `text` and the index of the token where character `char_index` starts."""
    try:
        encoding = tokenizer(text, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        encoding = None
    if encoding is not None and "offset_mapping" in encoding:
        ids = list(encoding["input_ids"])
        offsets = encoding["offset_mapping"]
        # special tokens have empty spans; the first real token that ends past the needle's start holds it
        index = next((i for i, (a, b) in enumerate(offsets) if b > a and b > char_index), len(ids))
        return ids, index
    ids = list(tokenizer(text)["input_ids"])
    return ids, len(tokenizer(text[:char_index])["input_ids"])


def answer_ids(tokenizer: Any, prompt_text: str, prompt_ids: Sequence[int], key: int) -> list[int]:
    r"""
    The tokens a model must generate after the prompt to answer `key`.

    They are the tokens that `prompt + " K"` has beyond the prompt's, so they are what the model's own tokenization
    of the continuation gives (e.g. `"▁", "1", "2"` for Llama 2's digit splitting, `" 123", "45"` for Llama 3). If
    the tokenizer merges across the boundary, the tokens of `" K"` alone are used.
    """
    full = list(tokenizer(f"{prompt_text} {key}")["input_ids"])
    if full[: len(prompt_ids)] == list(prompt_ids) and len(full) > len(prompt_ids):
        return full[len(prompt_ids) :]
    return list(tokenizer(f" {key}", add_special_tokens=False)["input_ids"])


def build_passkey_prompt(tokenizer: Any, length: int, depth: float, key: int) -> PasskeyPrompt:
    r"""
    Build a passkey prompt of about `length` tokens with the needle at `depth`.

    The prompt never exceeds `length` tokens and is within 5% of it; the needle's first token is at `depth` of the
    prompt as closely as whole filler sentences allow (and no closer to the edges than the task description and the
    question permit).

    Args:
        tokenizer (`PreTrainedTokenizerBase`):
            The model's tokenizer: lengths are counted in its tokens, special tokens included.
        length (`int`):
            The prompt length to reach, in tokens.
        depth (`float`):
            Where the needle goes, in [0, 1].
        key (`int`):
            The pass key.

    Returns:
        `PasskeyPrompt`: The prompt, its tokens, the answer's tokens and the needle's position.

    Raises:
        `ValueError`: If `depth` is outside [0, 1], or `length` is too short for the fixed parts of the prompt.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"A passkey depth is a fraction in [0, 1], got {depth}.")

    def measure(prefix: int, suffix: int) -> tuple[str, list[int], int]:
        text, needle_char = _render(prefix, suffix, key)
        ids, index = _encode(tokenizer, text, needle_char)
        return text, ids, index

    _, fixed_ids, fixed_index = measure(0, 0)
    sample = 60
    per_sentence = max((len(measure(0, sample)[1]) - len(fixed_ids)) / sample, 1e-3)
    if length < len(fixed_ids):
        raise ValueError(
            f"A passkey prompt of {length} tokens is too short: without any filler it already takes "
            f"{len(fixed_ids)} tokens of this tokenizer. Use lengths of at least {len(fixed_ids)}."
        )

    def prefix_for(total: int, target_index: float, index_at_zero: int) -> int:
        return min(total, max(0, round((target_index - index_at_zero) / per_sentence)))

    # 1. the amount of filler: tokens are nearly additive over sentences, so a few corrections converge
    total = max(0, round((length - len(fixed_ids)) / per_sentence))
    prefix = prefix_for(total, depth * length, fixed_index)
    text, ids, index = measure(prefix, total - prefix)
    for _ in range(10):
        step = round((length - len(ids)) / per_sentence)
        if step == 0:
            break
        total = max(0, total + step)
        prefix = prefix_for(total, depth * length, fixed_index)
        text, ids, index = measure(prefix, total - prefix)
    # 2. the needle's place: move sentences between the two sides of the needle
    for _ in range(10):
        step = round((depth * len(ids) - index) / per_sentence)
        moved = min(total, max(0, prefix + step))
        if moved == prefix:
            break
        prefix = moved
        text, ids, index = measure(prefix, total - prefix)
    # 3. never longer than asked: a model evaluated at its maximum length must not be handed more
    while len(ids) > length and total > 0:
        if total == prefix:  # no filler after the needle left: take it from before
            prefix -= 1
        total -= 1
        text, ids, index = measure(prefix, total - prefix)
    if abs(len(ids) - length) > LENGTH_TOLERANCE * length:
        raise ValueError(
            f"Could not build a passkey prompt within {LENGTH_TOLERANCE:.0%} of {length} tokens (got {len(ids)}); "
            "the tokenizer splits the filler too irregularly."
        )
    return PasskeyPrompt(
        text=text,
        input_ids=ids,
        answer_ids=answer_ids(tokenizer, text, ids, key),
        key=key,
        length=length,
        depth=depth,
        needle_index=index,
    )


@dataclass(frozen=True)
class PasskeyTrial:
    r"""
    One (length, depth, key) to test.

    Args:
        length (`int`): Prompt length in tokens.
        depth (`float`): Needle depth in [0, 1].
        trial (`int`): The trial index; its key is the same at every length and depth.
        key (`int`): The pass key.
    """

    length: int
    depth: float
    trial: int
    key: int


def plan_trials(
    lengths: Sequence[int], depths: Sequence[float] | None = None, trials: int = 10, seed: int = 0
) -> list[PasskeyTrial]:
    r"""
    Every trial of a run: `trials` keys for each length and depth.

    Args:
        lengths (`Sequence[int]`):
            Prompt lengths, in tokens.
        depths (`Sequence[float]`, *optional*):
            Needle depths in [0, 1]; without them each trial draws one uniform random depth (used at every length).
        trials (`int`, *optional*, defaults to `10`):
            Keys per length (and depth).
        seed (`int`, *optional*, defaults to `0`):
            Seeds the keys and the random depths.

    Returns:
        `list[PasskeyTrial]`: Ordered by length, then depth, then trial.
    """
    if trials < 1:
        raise ValueError(f"--trials must be at least 1, got {trials}.")
    if depths is not None and any(not 0.0 <= depth <= 1.0 for depth in depths):
        raise ValueError(f"Passkey depths are fractions in [0, 1], got {list(depths)}.")
    draws = []
    for trial in range(trials):
        # a generator per trial (string seeds are hashed with SHA-512: the same on every run and platform)
        rng = random.Random(f"longlora-hub passkey {seed} {trial}")
        draws.append((rng.randrange(*KEY_RANGE), rng.random()))
    plan = []
    for length in lengths:
        if depths is None:
            plan += [PasskeyTrial(length, depth, trial, key) for trial, (key, depth) in enumerate(draws)]
        else:
            for depth in depths:
                plan += [PasskeyTrial(length, float(depth), trial, key) for trial, (key, _) in enumerate(draws)]
    return plan


def is_exact_match(generated: Sequence[int], answer: Sequence[int]) -> bool:
    """A trial passes only if the generated tokens are exactly the answer's tokens."""
    return list(generated) == list(answer)


def _depth_cell(depth: float, depths: Sequence[float] | None, bins: int) -> tuple[float, list[float] | None]:
    """The heatmap row of a trial: its fixed depth, or the centre of its bin when depths are random."""
    if depths is not None:
        return depth, None
    index = min(int(depth * bins), bins - 1)
    return round((index + 0.5) / bins, 6), [round(index / bins, 6), round((index + 1) / bins, 6)]


def summarize_passkey(
    records: list[dict[str, Any]], lengths: Sequence[int], depths: Sequence[float] | None, depth_bins: int = 5
) -> dict[str, Any]:
    r"""
    Accuracy per length and per (length, depth) from per-trial records.

    With random depths the trials are grouped into `depth_bins` equal bins, each cell labelled by its bin's centre
    and carrying its `depth_range`; a bin no trial fell into has no cell (the table and the heatmap still show it,
    as empty: see [`~longlora_hub.evaluation.report.passkey_grid`]).

    Returns:
        `dict[str, Any]`: `accuracy` (length -> fraction correct), `overall_accuracy`, `prompt_tokens` (length ->
        mean prompt length) and `cells` (a list of `length`, `depth`, `trials`, `correct`, `accuracy`).
    """
    accuracy, prompt_tokens = {}, {}
    cells: dict[tuple[int, float], dict[str, Any]] = {}
    for length in lengths:
        rows = [record for record in records if record["length"] == length]
        accuracy[str(length)] = sum(record["correct"] for record in rows) / len(rows)
        prompt_tokens[str(length)] = round(sum(record["prompt_tokens"] for record in rows) / len(rows), 1)
        for record in rows:
            depth, depth_range = _depth_cell(record["depth"], depths, depth_bins)
            cell = cells.setdefault(
                (length, depth), {"length": length, "depth": depth, "trials": 0, "correct": 0, "accuracy": 0.0}
            )
            if depth_range is not None:
                cell["depth_range"] = depth_range
            cell["trials"] += 1
            cell["correct"] += int(record["correct"])
            cell["accuracy"] = cell["correct"] / cell["trials"]
    return {
        "accuracy": accuracy,
        "overall_accuracy": sum(record["correct"] for record in records) / len(records),
        "prompt_tokens": prompt_tokens,
        "cells": sorted(cells.values(), key=lambda cell: (cell["length"], cell["depth"])),
    }


def _batches(plan: list[PasskeyTrial], batch_size: int) -> list[list[int]]:
    """Indices of consecutive trials of one length, at most `batch_size` at a time (prompts of different lengths in
    one batch would make the shorter ones mostly padding)."""
    batches: list[list[int]] = []
    for index, trial in enumerate(plan):
        if not batches or len(batches[-1]) == batch_size or plan[batches[-1][0]].length != trial.length:
            batches.append([])
        batches[-1].append(index)
    return batches


def run_passkey(
    model: Any,
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float] | None = None,
    trials: int = 10,
    seed: int = 0,
    batch_size: int = 1,
    device: Any | None = None,
    depth_bins: int = 5,
    progress: bool = True,
) -> dict[str, Any]:
    r"""
    Run the passkey test: greedy decoding, exact match of the answer's tokens.

    Args:
        model (`PreTrainedModel` or `PeftModel`):
            A causal LM with `generate` (put in eval mode here: full attention).
        tokenizer (`PreTrainedTokenizerBase`):
            The model's tokenizer.
        lengths (`Sequence[int]`):
            Prompt lengths in tokens.
        depths (`Sequence[float]`, *optional*):
            Needle depths in [0, 1]; a seeded random depth per trial without them.
        trials (`int`, *optional*, defaults to `10`):
            Keys per length (and depth).
        seed (`int`, *optional*, defaults to `0`):
            Seeds keys and random depths.
        batch_size (`int`, *optional*, defaults to `1`):
            Prompts per `generate` call (left-padded; prompts of one batch share a length).
        device (`torch.device` or `str`, *optional*):
            Where the prompts go; defaults to the device of the model's input embeddings (its first shard).
        depth_bins (`int`, *optional*, defaults to `5`):
            Bins of the per-depth accuracy when depths are random.
        progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar on stderr.

    Returns:
        `dict[str, Any]`: `lengths`, `depths` (`None` when random), `depth_bins`, `trials`, `seed`, the summary of
        [`summarize_passkey`], and `records` (one per trial: `length`, `depth`, `trial`, `key`, `prompt_tokens`,
        `needle_depth`, `answer`, `prediction`, `prediction_ids`, `correct`).
    """
    import torch

    from ..log import progress_bar
    from .loading import model_device

    plan = plan_trials(lengths, depths, trials, seed)
    if device is None:
        device = model_device(model)
    if hasattr(model, "eval"):
        model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        pad = 0  # only ever under the attention mask's zeros
    records: list[dict[str, Any]] = []
    bar = progress_bar("passkey", total=len(plan), desc="passkey", unit="prompt", disable=not progress)
    with torch.no_grad():
        for batch in _batches(plan, batch_size):
            # built batch by batch: building them all first (dozens of tokenizations each) kept a run of many
            # trials silent for minutes before its first one
            prompts = {i: build_passkey_prompt(tokenizer, plan[i].length, plan[i].depth, plan[i].key) for i in batch}
            width = max(len(prompts[i].input_ids) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids = prompts[i].input_ids
                input_ids[row, width - len(ids) :] = torch.tensor(ids)  # left padding: every prompt ends at `width`
                attention_mask[row, width - len(ids) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max(len(prompts[i].answer_ids) for i in batch),
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad,
            )
            for row, i in enumerate(batch):
                prompt, trial = prompts[i], plan[i]
                generated = output[row, width : width + len(prompt.answer_ids)].tolist()
                records.append(
                    {
                        **asdict(trial),
                        "prompt_tokens": len(prompt.input_ids),
                        "needle_depth": round(prompt.needle_depth, 4),
                        "answer": str(trial.key),
                        "prediction": tokenizer.decode(generated, skip_special_tokens=True).strip(),
                        "prediction_ids": generated,
                        "correct": is_exact_match(generated, prompt.answer_ids),
                    }
                )
            bar.update(len(batch))
    bar.close()
    return {
        "lengths": list(lengths),
        "depths": None if depths is None else [float(depth) for depth in depths],
        "depth_bins": depth_bins if depths is None else None,
        "trials": trials,
        "seed": seed,
        **summarize_passkey(records, lengths, depths, depth_bins),
        "records": records,
    }


__all__ = [
    "FILLER",
    "KEY_RANGE",
    "QUESTION",
    "TASK_DESCRIPTION",
    "PasskeyPrompt",
    "PasskeyTrial",
    "answer_ids",
    "build_passkey_prompt",
    "filler",
    "is_exact_match",
    "needle",
    "plan_trials",
    "run_passkey",
    "summarize_passkey",
]
