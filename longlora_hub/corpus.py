"""A generated pretraining corpus with long-range structure, and a tokenizer trained on it: what the tiny base model
of the demo and of the study is pretrained on, with nothing downloaded.

Three kinds of documents, mixed:

- `passkey`: the passkey-retrieval prompt of `longlora_hub.evaluation.passkey` (same task text, filler and needle)
  followed by its answer, at a random length and depth: the base learns to retrieve within its context, so that
  what extension adds (retrieval beyond it) can be measured;
- `registry`: people keep numbers at places; later sentences ask for them and answer: predicting an answer needs
  the sentence that stated it, often far back;
- `prose`: short sentences from a small grammar, so that perplexity measures language modelling too.

Everything is a pure function of the seed.
"""

from __future__ import annotations

import random

from .evaluation.passkey import KEY_RANGE, QUESTION, TASK_DESCRIPTION, filler, needle

NAMES = (
    "Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Oscar", "Peggy",
    "Rupert", "Sybil", "Trent", "Victor", "Walter",
)  # fmt: skip
PLACES = (
    "the library", "the harbour", "the old mill", "the market", "the station", "the garden", "the tower",
    "the bakery", "the school", "the bridge",
)  # fmt: skip
ADJECTIVES = ("green", "blue", "yellow", "quiet", "old", "bright", "small", "heavy", "cold", "warm")
NOUNS = ("grass", "sky", "sun", "river", "road", "house", "tree", "boat", "cloud", "wall")
VERBS = ("walks to", "looks at", "paints", "finds", "leaves", "builds", "opens", "watches")
INTERJECTIONS = ("Here we go.", "There and back again.", "The day goes on.", "Nothing happens.")
KINDS = {"passkey": 0.35, "registry": 0.45, "prose": 0.2}


def prose_sentence(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.4:
        return f"The {rng.choice(NOUNS)} is {rng.choice(ADJECTIVES)}."
    if roll < 0.8:
        return f"{rng.choice(NAMES)} {rng.choice(VERBS)} the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}."
    return rng.choice(INTERJECTIONS)


def passkey_document(rng: random.Random, sentences: int) -> str:
    """The evaluation's passkey prompt with `sentences` filler sentences around the needle, then the answer."""
    key = rng.randrange(*KEY_RANGE)
    before = rng.randrange(sentences + 1)
    parts = [TASK_DESCRIPTION, filler(before), needle(key), filler(sentences - before), QUESTION]
    return "\n".join(parts) + f" {key}."


def registry_document(rng: random.Random, sentences: int) -> str:
    """Facts stated first, then prose with questions about them, each answered."""
    names = rng.sample(NAMES, rng.randint(2, 4))
    facts = {name: (rng.randrange(*KEY_RANGE), rng.choice(PLACES)) for name in names}
    parts = [f"{name} keeps the number {number} at {place}." for name, (number, place) in facts.items()]
    for _ in range(sentences):
        if rng.random() < 0.2:
            name = rng.choice(names)
            number, place = facts[name]
            if rng.random() < 0.5:
                parts.append(f"What number does {name} keep? {name} keeps the number {number}.")
            else:
                parts.append(f"Where does {name} keep it? {name} keeps it at {place}.")
        else:
            parts.append(prose_sentence(rng))
    return " ".join(parts)


def corpus_documents(num_documents: int, seed: int = 0, min_sentences: int = 4, max_sentences: int = 40) -> list[str]:
    r"""
    Generate `num_documents` documents of `min_sentences` to `max_sentences` sentences each (besides a passkey
    document's fixed parts and a registry's facts), kinds mixed as in `KINDS`.

    At the default sizes a document is about 200 tokens of the corpus tokenizer on average, and up to about 330.
    """
    if not 1 <= min_sentences <= max_sentences:
        raise ValueError(f"Need 1 <= min_sentences <= max_sentences, got {min_sentences} and {max_sentences}.")
    rng = random.Random(f"longlora-hub corpus {seed}")
    kinds, weights = list(KINDS), list(KINDS.values())
    documents = []
    for _ in range(num_documents):
        sentences = rng.randint(min_sentences, max_sentences)
        kind = rng.choices(kinds, weights)[0]
        if kind == "passkey":
            documents.append(passkey_document(rng, sentences))
        elif kind == "registry":
            documents.append(registry_document(rng, sentences))
        else:
            documents.append(" ".join(prose_sentence(rng) for _ in range(sentences)))
    return documents


def build_corpus_tokenizer(vocab_size: int = 512, seed: int = 1234):
    r"""
    A byte-level BPE tokenizer trained on 3,000 generated documents, splitting digits one by one (as Llama's
    tokenizer does, so a key is copied digit by digit). Deterministic for a given `vocab_size` and `seed`.

    Returns:
        `PreTrainedTokenizerFast`: with `<s>` (BOS, id 1), `</s>` (EOS, id 2) and `<unk>` (id 0).
    """
    from .testing import train_bpe_tokenizer

    return train_bpe_tokenizer(corpus_documents(3000, seed=seed), vocab_size, split_digits=True)


__all__ = ["KINDS", "build_corpus_tokenizer", "corpus_documents"]
