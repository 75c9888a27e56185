"""The generated pretraining corpus and its tokenizer: deterministic, the passkey documents are the evaluation's own
prompts with their answers, registry answers match the facts stated before, and the builtin base has its shape."""

import re

import pytest

from longlora_hub.corpus import build_corpus_tokenizer, corpus_documents
from longlora_hub.evaluation.passkey import QUESTION, TASK_DESCRIPTION


def test_corpus_is_deterministic_and_mixed():
    first, again, other = corpus_documents(200, seed=3), corpus_documents(200, seed=3), corpus_documents(200, seed=4)
    assert first == again and first != other
    passkey = [doc for doc in first if doc.startswith(TASK_DESCRIPTION)]
    registry = [doc for doc in first if " keeps the number " in doc.split(".")[0]]
    assert 40 < len(passkey) < 110 and 60 < len(registry) < 130
    with pytest.raises(ValueError, match="min_sentences"):
        corpus_documents(1, min_sentences=5, max_sentences=4)


def test_passkey_documents_answer_their_own_key():
    for doc in corpus_documents(100, seed=0):
        if doc.startswith(TASK_DESCRIPTION):
            key = re.search(r"The pass key is (\d+)\. Remember it\.", doc).group(1)
            assert doc.endswith(f"{QUESTION} {key}.")


def test_registry_answers_match_the_stated_facts():
    checked = 0
    for doc in corpus_documents(100, seed=1):
        facts = dict(re.findall(r"(\w+) keeps the number (\d+) at ", doc))
        for name, number in re.findall(r"What number does \w+ keep\? (\w+) keeps the number (\d+)\.", doc):
            assert facts[name] == number
            checked += 1
    assert checked > 20


def test_tokenizer_splits_digits_and_is_deterministic():
    tokenizer = build_corpus_tokenizer()
    assert len(tokenizer) == 512 and tokenizer.eos_token_id == 2 and tokenizer.bos_token_id == 1
    assert [t for t in tokenizer.tokenize(" 40917") if t.isdigit()] == list("40917")
    assert build_corpus_tokenizer().get_vocab() == tokenizer.get_vocab()


def test_builtin_5m_base_and_corpus_dataset(tmp_path):
    from transformers import AutoModelForCausalLM

    from longlora_hub.data import load_raw_dataset
    from longlora_hub.training import _builtin_base

    folder = _builtin_base("builtin:tiny-llama-5m", tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert 4.5e6 < model.num_parameters() < 6e6 and model.config.max_position_embeddings == 256
    rows = load_raw_dataset("builtin:corpus", num_builtin_rows=12)
    assert rows["text"][:12] == corpus_documents(12)
