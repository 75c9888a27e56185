"""Synthetic long-context QA rows that need no download, with controlled lengths and answer depths.

Three retrieval tasks, the kind long-context models are probed with:

- `passkey`: one pass key hidden in filler text; the question asks for it.
- `kv_retrieval`: many `key -> value` statements spread through the text; the question asks for one key's value.
- `which_document`: several numbered documents, each stating one fact; the question asks which document
  states a given fact.

Lengths are counted in tokens of the given tokenizer exactly as the builder counts `num_tokens` (prompt +
completion + special tokens + EOS), and every row stays within its target (it falls short by at most about one
filler sentence). The depth is where the needle sits in the context (0 = start, 1 = end). The filler is sentences
of a text corpus you give, or a built-in set.

`longlora_hub.synthetic` keeps the simpler generators the tiny training recipes use; this module is the builder's.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from typing import Any

from .process import count_tokens

SYNTHETIC_TASKS = ("passkey", "kv_retrieval", "which_document")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
BUILTIN_FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
    "A light rain fell over the hills during the night.",
    "The river runs slowly past the old stone bridge.",
    "Someone left a bicycle leaning against the fence.",
    "The bakery on the corner opens before sunrise.",
    "Clouds gathered in the west but the wind carried them away.",
    "A cat slept on the warm windowsill all afternoon.",
    "The train to the coast was a few minutes late.",
    "Children played football in the park until dusk.",
    "The library keeps its oldest maps in a locked room.",
    "Fresh snow covered the path up the mountain.",
    "The market sold apples, pears and late plums.",
    "An old clock in the hall struck the hour.",
    "Boats rocked gently in the small harbour.",
    "The garden smelled of cut grass and lavender.",
    "A long road wound through fields of wheat.",
    "The lamp on the desk flickered and then steadied.",
    "Birds gathered on the wires before flying south.",
    "The museum added a new room for ancient coins.",
    "Tea was served in thin white cups.",
    "The streets were quiet on the morning of the holiday.",
)
_NAMES = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Oscar")
_PLACES = ("the library", "the harbour", "the old mill", "the market", "the station", "the garden", "the tower")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def corpus_sentences(text: str) -> list[str]:
    """Split a corpus into sentences (on `.`, `!`, `?` followed by whitespace), dropping empty ones."""
    sentences = [" ".join(part.split()) for part in _SENTENCE_END.split(text)]
    sentences = [sentence for sentence in sentences if sentence]
    if not sentences:
        raise ValueError("the filler corpus holds no sentence")
    return sentences


class _Filler:
    """Filler sentences with their token counts (each counted with the space that joins it to the text)."""

    def __init__(self, sentences: Sequence[str], tokenizer):
        self.sentences = list(dict.fromkeys(sentences))
        empty = [""] * len(self.sentences)
        # a sentence's own count minus the one token of EOS that count_tokens always adds
        self.counts = [n - 1 for n in count_tokens(tokenizer, [" " + s for s in self.sentences], empty)]

    def draw(self, budget: int, rng: random.Random) -> tuple[list[str], list[int]]:
        """Random sentences whose counts add up to at most `budget`."""
        chosen, counts, total = [], [], 0
        smallest = min(self.counts)
        while total + smallest <= budget:
            index = rng.randrange(len(self.sentences))
            if total + self.counts[index] > budget:
                continue  # too long for what is left; a shorter one will come
            chosen.append(self.sentences[index])
            counts.append(self.counts[index])
            total += self.counts[index]
        return chosen, counts


def _place(filler: list[str], needles: list[tuple[float, str]]) -> str:
    """Insert needles `(fraction, text)` among the filler sentences, at `round(fraction * len(filler))`; needles
    at the same place keep their list order."""
    pieces = list(filler)
    ordered = sorted(needles, key=lambda needle: needle[0])  # stable: equal fractions keep their order
    # insert from the back, so that the insertion points (computed on the filler alone) stay valid
    for fraction, text in reversed(ordered):
        pieces.insert(round(min(max(fraction, 0.0), 1.0) * len(filler)), text)
    return " ".join(pieces)


def _task_parts(task: str, depth: float, rng: random.Random, length: int) -> dict[str, Any]:
    """Intro, needles (the one asked about at `depth`), question and answer of one row."""
    if task == "passkey":
        key = rng.randrange(10_000, 10_000_000)
        return {
            "intro": "There is a pass key hidden in the long text below. Find it and remember it; I will ask for it "
            "at the end.",
            "needles": [(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")],
            "question": "What is the pass key?",
            "answer": f"The pass key is {key}.",
        }
    if task == "kv_retrieval":
        count = max(4, min(64, length // 256))
        keys = [f"{rng.getrandbits(32):08x}" for _ in range(count)]
        values = [rng.randrange(10_000, 10_000_000) for _ in range(count)]
        spread = [(index + 0.5) / count for index in range(count)]
        needles = [(depth, f"The value of key {keys[0]} is {values[0]}.")]
        needles += [(spread[i], f"The value of key {keys[i]} is {values[i]}.") for i in range(1, count)]
        return {
            "intro": "The text below gives the values of many keys among unrelated sentences. Remember each key and "
            "its value; I will ask for one of them at the end.",
            "needles": needles,
            "question": f"What is the value of key {keys[0]}?",
            "answer": f"The value of key {keys[0]} is {values[0]}.",
        }
    if task == "which_document":
        count = max(2, min(8, length // 512))
        target = min(count - 1, int(depth * count))
        names = rng.sample(_NAMES, count)
        facts = [f"{name} keeps the number {rng.randrange(100, 100_000)} at {rng.choice(_PLACES)}." for name in names]
        # headers first: at equal fractions a document's header must come before its fact
        needles = [(index / count, f"\n\nDocument {index + 1}:\n") for index in range(count)]
        needles.append((depth, facts[target]))
        needles += [((i + 0.5) / count, facts[i]) for i in range(count) if i != target]
        return {
            "intro": f"Below are {count} numbered documents. Read them all; I will ask which document states a "
            "given fact.",
            "needles": needles,
            "question": f"Which document says that {facts[target][:-1]}? Answer with the document number.",
            "answer": f"Document {target + 1} says that {facts[target][:-1]}.",
        }
    raise ValueError(f"unknown synthetic task {task!r}; the tasks are {SYNTHETIC_TASKS}")


def synthetic_rows(
    num_rows: int,
    tokenizer=None,
    lengths: Sequence[int] = (1024,),
    depths: Sequence[float] = DEFAULT_DEPTHS,
    tasks: Sequence[str] = SYNTHETIC_TASKS,
    corpus: str | None = None,
    prompt_template: str = "{instruction}",
    seed: int = 0,
) -> Iterator[dict[str, Any]]:
    r"""
    Generate synthetic retrieval rows of controlled length and needle depth.

    Row `i` gets task `tasks[i % T]`, length `lengths[(i // T) % L]` and depth `depths[(i // (T * L)) % D]`, so
    the first `T * L * D` rows cover every combination once. Each row is random on its own (seeded by `seed` and
    `i`), so row `i` is the same whatever `num_rows` is.

    Args:
        num_rows (`int`): How many rows.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): Lengths are in its tokens; without one, in words.
        lengths (`Sequence[int]`, *optional*, defaults to `(1024,)`): Target lengths, as `count_tokens` counts
            them with `prompt_template` applied.
        depths (`Sequence[float]`, *optional*): Needle depths in [0, 1].
        tasks (`Sequence[str]`, *optional*): Among `SYNTHETIC_TASKS`.
        corpus (`str`, *optional*): Text whose sentences are the filler; the built-in filler otherwise.
        prompt_template (`str`, *optional*, defaults to `"{instruction}"`): The template the builder will wrap
            the instruction in, so that the length is that of the final prompt.
        seed (`int`, *optional*, defaults to `0`): The seed.

    Yields:
        `dict`: `instruction`, `completion`, `source` (`"synthetic"`), `task`, `where` (`synthetic:i`), and the
        generation facts `num_tokens`, `target_tokens`, `depth` (the needle's actual depth, in tokens).
    """
    unknown = set(tasks) - set(SYNTHETIC_TASKS)
    if unknown or not tasks:
        raise ValueError(f"unknown synthetic task(s) {sorted(unknown)}; the tasks are {SYNTHETIC_TASKS}")
    if not lengths or any(length < 1 for length in lengths):
        raise ValueError(f"synthetic lengths must be positive, got {list(lengths)}")
    if not depths or any(not 0 <= depth <= 1 for depth in depths):
        raise ValueError(f"needle depths must be in [0, 1], got {list(depths)}")
    filler = _Filler(corpus_sentences(corpus) if corpus is not None else BUILTIN_FILLER, tokenizer)

    def measure(instruction: str, answer: str) -> int:
        return count_tokens(tokenizer, [prompt_template.replace("{instruction}", instruction)], [answer])[0]

    for index in range(num_rows):
        task = tasks[index % len(tasks)]
        length = lengths[(index // len(tasks)) % len(lengths)]
        depth = depths[(index // (len(tasks) * len(lengths))) % len(depths)]
        rng = random.Random(f"longqa-synthetic:{seed}:{index}")
        parts = _task_parts(task, depth, rng, length)

        def render(sentences: list[str], parts=parts) -> str:
            return f"{parts['intro']}\n{_place(sentences, parts['needles'])}\n{parts['question']}"

        base = measure(render([]), parts["answer"])
        if base > length:
            raise ValueError(
                f"a {task} row needs {base} tokens before any filler, more than the target length {length}; use "
                "longer synthetic lengths."
            )
        sentences, counts = filler.draw(length - base, rng)
        instruction = render(sentences)
        total = measure(instruction, parts["answer"])
        while total > length and sentences:
            # joining sentences can merge or split tokens at the seams: trim from the side that keeps the depth
            before = sum(counts[: round(depth * len(sentences))])
            drop = 0 if before > depth * sum(counts) else len(sentences) - 1
            del sentences[drop], counts[drop]
            instruction = render(sentences)
            total = measure(instruction, parts["answer"])
        context_tokens = sum(counts)
        needle_at = round(depth * len(sentences))
        actual_depth = sum(counts[:needle_at]) / context_tokens if context_tokens else depth
        yield {
            "instruction": instruction,
            "completion": parts["answer"],
            "source": "synthetic",
            "task": task,
            "where": f"synthetic:{index}",
            "num_tokens": total,
            "target_tokens": length,
            "depth": round(actual_depth, 4),
        }


__all__ = ["BUILTIN_FILLER", "DEFAULT_DEPTHS", "SYNTHETIC_TASKS", "corpus_sentences", "synthetic_rows"]
