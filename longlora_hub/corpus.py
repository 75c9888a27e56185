"""A generated pretraining corpus with long-range structure, and a tokenizer trained on it: what the tiny base model
of the demo and of the study is pretrained on, with nothing downloaded.

Four kinds of documents, mixed:

- `passkey`: the passkey-retrieval prompt of `longlora_hub.evaluation.passkey` (same task text, filler and needle)
  followed by its answer, at a random length and depth: the base learns to retrieve within its context, so that
  what extension adds (retrieval beyond it) can be measured;
- `registry`: people keep numbers; later sentences ask for them and answer: predicting an answer needs the sentence
  that stated it, often far back;
- `echo`: a list of distinct random words, then the same list again, twice. Every repeated word can only be
  predicted by finding the earlier copy (what an "induction head" does, and what retrieval builds on);
- `prose`: short sentences from a small grammar, so that perplexity measures language modelling too.

`long_corpus_documents` draws passkey, registry and prose documents of about 250 to 1,500 tokens: the data of the
context extension and of the study's evaluation, where a longer context lets the model see facts stated further back.

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
KINDS = {"passkey": 0.3, "registry": 0.2, "echo": 0.4, "prose": 0.1}
WORDS = tuple(sorted({*NAMES, *ADJECTIVES, *NOUNS, *(place.split()[-1] for place in PLACES)}))  # 48 words


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
    """Facts stated first, then prose with questions about them (half of the sentences), each answered."""
    names = rng.sample(NAMES, rng.randint(2, 5))
    facts = {name: rng.randrange(*KEY_RANGE) for name in names}
    parts = [f"{name} keeps the number {number}." for name, number in facts.items()]
    for _ in range(sentences):
        if rng.random() < 0.5:
            name = rng.choice(names)
            parts.append(f"What number does {name} keep? {name} keeps the number {facts[name]}.")
        else:
            parts.append(prose_sentence(rng))
    return " ".join(parts)


def echo_document(rng: random.Random, sentences: int) -> str:
    """5 to 30 distinct words, up to `sentences` // 3 sentences of prose, then the same words twice more."""
    listed = " ".join(rng.sample(WORDS, rng.randint(5, 30)))
    middle = " ".join(prose_sentence(rng) for _ in range(rng.randint(0, sentences // 3)))
    return f"Copy this: {listed}. {middle} Again: {listed}. And again: {listed}."


DOCUMENT_MAKERS = {
    "passkey": passkey_document,
    "registry": registry_document,
    "echo": echo_document,
    "prose": lambda rng, sentences: " ".join(prose_sentence(rng) for _ in range(sentences)),
}


def corpus_documents(
    num_documents: int,
    seed: int = 0,
    min_sentences: int = 2,
    max_sentences: int = 24,
    kinds: dict[str, float] | None = None,
) -> list[str]:
    r"""
    Generate `num_documents` documents of `min_sentences` to `max_sentences` sentences each (besides a passkey
    document's fixed parts, a registry's facts and an echo's lists), kinds drawn with the weights `kinds`
    (default `KINDS`).

    At the default sizes a document is about 120 tokens of the corpus tokenizer on average, and up to about 330.
    """
    if not 1 <= min_sentences <= max_sentences:
        raise ValueError(f"Need 1 <= min_sentences <= max_sentences, got {min_sentences} and {max_sentences}.")
    kinds = KINDS if kinds is None else kinds
    if not kinds or set(kinds) - set(DOCUMENT_MAKERS):
        raise ValueError(f"Document kinds are among {sorted(DOCUMENT_MAKERS)}, got {sorted(kinds)}.")
    rng = random.Random(f"longlora-hub corpus {seed}")
    names, weights = list(kinds), list(kinds.values())
    documents = []
    for _ in range(num_documents):
        sentences = rng.randint(min_sentences, max_sentences)
        documents.append(DOCUMENT_MAKERS[rng.choices(names, weights)[0]](rng, sentences))
    return documents


LONG_KINDS = {"passkey": 0.4, "registry": 0.4, "prose": 0.2}


def long_corpus_documents(num_documents: int, seed: int = 0) -> list[str]:
    """Documents of about 250 to 1,500 tokens (30 to 120 sentences): passkey prompts with the needle anywhere in
    them and registries whose questions come back to facts stated hundreds of tokens earlier."""
    return corpus_documents(num_documents, seed=seed, min_sentences=30, max_sentences=120, kinds=LONG_KINDS)


HELD_OUT_SEED = 1000  # the evaluation documents of the demo and the study: never a training seed


def held_out_tokens(tokenizer, max_tokens: int) -> list[int]:
    """The first `max_tokens` tokens of held-out long documents (seed `HELD_OUT_SEED`), each tokenized without
    special tokens and followed by EOS: the perplexity data of the demo and of the study."""
    tokens: list[int] = []
    for document in long_corpus_documents(max(4, max_tokens // 300), seed=HELD_OUT_SEED):
        tokens += tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(tokens) >= max_tokens:
            break
    return tokens[:max_tokens]


def build_corpus_tokenizer(vocab_size: int = 512, seed: int = 1234):
    r"""
    A byte-level BPE tokenizer trained on 3,000 generated documents, splitting digits one by one (as Llama's
    tokenizer does, so a key is copied digit by digit). Deterministic for a given `vocab_size` and `seed`.

    Returns:
        `PreTrainedTokenizerFast`: with `<s>` (BOS, id 1), `</s>` (EOS, id 2) and `<unk>` (id 0).
    """
    from .testing import train_bpe_tokenizer

    return train_bpe_tokenizer(corpus_documents(3000, seed=seed), vocab_size, split_digits=True)


__all__ = [
    "HELD_OUT_SEED",
    "KINDS",
    "LONG_KINDS",
    "build_corpus_tokenizer",
    "corpus_documents",
    "held_out_tokens",
    "long_corpus_documents",
]
