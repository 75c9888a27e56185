"""Synthetic long-context data that needs no download: the tiny recipes, the demo and the tests train on it.

- `long_documents`: plain text with long-range structure (facts stated early and recalled much later), for the
  context-extension stage: predicting a recalled fact needs the context where it was stated.
- `passkey_examples`: the passkey-retrieval task of the LongLoRA evaluation, as LongAlpaca-style
  `instruction`/`output` rows for the supervised stage.
"""

from __future__ import annotations

import random

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NAMES = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Oscar")
PLACES = ("the library", "the harbour", "the old mill", "the market", "the station", "the garden", "the tower")


def long_documents(num_documents: int, sentences: int = 200, seed: int = 0) -> list[str]:
    """Documents of about `sentences` sentences; each states a few facts, then fills, then recalls them."""
    rng = random.Random(seed)
    documents = []
    for _ in range(num_documents):
        facts = {name: (rng.randrange(1, 50000), rng.choice(PLACES)) for name in rng.sample(NAMES, 4)}
        parts = [f"{name} keeps the number {number} at {place}. " for name, (number, place) in facts.items()]
        while len(parts) < sentences:
            if rng.random() < 0.15:
                name = rng.choice(list(facts))
                number, place = facts[name]
                parts.append(f"Remember that {name} keeps the number {number} at {place}. ")
            else:
                parts.append(rng.choice(FILLER.split(". ")).strip(". ") + ". ")
        documents.append("".join(parts).strip())
    return documents


def passkey_examples(num_examples: int, filler_repeats: int = 20, seed: int = 0) -> list[dict[str, str]]:
    """Passkey retrieval rows: filler text with one pass key at a random depth, and the key as the answer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_examples):
        key = rng.randrange(1, 50000)
        before = rng.randrange(filler_repeats + 1)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
        text = FILLER * before + needle + FILLER * (filler_repeats - before)
        instruction = (
            "There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            f"{text}What is the pass key?"
        )
        rows.append({"instruction": instruction, "output": f"The pass key is {key}."})
    return rows


__all__ = ["FILLER", "long_documents", "passkey_examples"]
