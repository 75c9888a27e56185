"""The generated pretraining corpus and its tokenizer: deterministic, the passkey documents are the evaluation's own
prompts with their answers, registry answers match the facts stated before, echoes repeat their list exactly, long
documents are long, and the builtin bases have their shapes."""

import re

import pytest

from longlora_hub.corpus import build_corpus_tokenizer, corpus_documents, long_corpus_documents
from longlora_hub.evaluation.passkey import QUESTION, TASK_DESCRIPTION


def test_corpus_is_deterministic_and_mixed():
    first, again, other = corpus_documents(200, seed=3), corpus_documents(200, seed=3), corpus_documents(200, seed=4)
    assert first == again and first != other
    passkey = [doc for doc in first if doc.startswith(TASK_DESCRIPTION)]
    registry = [doc for doc in first if " keeps the number " in doc.split(".")[0]]
    echo = [doc for doc in first if doc.startswith("Copy this: ")]
    assert 40 < len(passkey) < 80 and 20 < len(registry) < 60 and 60 < len(echo) < 100
    with pytest.raises(ValueError, match="min_sentences"):
        corpus_documents(1, min_sentences=5, max_sentences=4)


def test_passkey_documents_answer_their_own_key():
    for doc in corpus_documents(100, seed=0):
        if doc.startswith(TASK_DESCRIPTION):
            key = re.search(r"The pass key is (\d+)\. Remember it\.", doc).group(1)
            assert doc.endswith(f"{QUESTION} {key}.")


def test_registry_answers_match_the_stated_facts():
    checked = 0
    for doc in corpus_documents(300, seed=1):
        facts = dict(re.findall(r"(\w+) keeps the number (\d+)\.", doc.split("What number")[0]))
        for name, number in re.findall(r"What number does \w+ keep\? (\w+) keeps the number (\d+)\.", doc):
            assert facts[name] == number
            checked += 1
    assert checked > 20


def test_echo_documents_repeat_their_list_exactly():
    echoes = [doc for doc in corpus_documents(100, seed=2) if doc.startswith("Copy this: ")]
    assert len(echoes) > 20
    for doc in echoes:
        listed = re.match(r"Copy this: ([^.]+)\.", doc).group(1)
        words = listed.split()
        assert 5 <= len(words) <= 30 and len(set(words)) == len(words)
        assert doc.endswith(f"Again: {listed}. And again: {listed}.")


def test_long_documents_fill_an_extended_context():
    tokenizer = build_corpus_tokenizer()
    lengths = [len(tokenizer(doc)["input_ids"]) for doc in long_corpus_documents(30, seed=0)]
    assert min(lengths) > 200 and sum(lengths) / len(lengths) > 500
    assert long_corpus_documents(3, seed=0) == long_corpus_documents(3, seed=0) != long_corpus_documents(3, seed=1)
    with pytest.raises(ValueError, match="kinds"):
        corpus_documents(1, kinds={"poetry": 1.0})


def test_tokenizer_splits_digits_and_is_deterministic():
    tokenizer = build_corpus_tokenizer()
    assert len(tokenizer) == 512 and tokenizer.eos_token_id == 2 and tokenizer.bos_token_id == 1
    assert [t for t in tokenizer.tokenize(" 40917") if t.isdigit()] == list("40917")
    assert build_corpus_tokenizer().get_vocab() == tokenizer.get_vocab()


def test_builtin_3m_base_and_corpus_dataset(tmp_path):
    from transformers import AutoModelForCausalLM

    from longlora_hub.data import load_raw_dataset
    from longlora_hub.training import _builtin_base

    folder = _builtin_base("builtin:tiny-llama-3m", tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert 3.2e6 < model.num_parameters() < 3.7e6 and model.config.max_position_embeddings == 256
    rows = load_raw_dataset("builtin:corpus", num_builtin_rows=12)
    assert rows["text"][:12] == corpus_documents(12)
    rows = load_raw_dataset("builtin:corpus-long", num_builtin_rows=3)
    assert rows["text"] == long_corpus_documents(3)


def test_shipped_pretrained_base_is_a_stock_llama_with_the_corpus_tokenizer():
    """The asset loads without remote code, has the documented shape, and its tokenizer is the corpus tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    from longlora_hub.training import PRETRAINED_TINY, _builtin_base

    assert _builtin_base("builtin:tiny-llama-pretrained", PRETRAINED_TINY.parent / "unused") == PRETRAINED_TINY
    config = AutoConfig.from_pretrained(PRETRAINED_TINY)
    assert config.model_type == "llama" and config.max_position_embeddings == 256 and config.num_hidden_layers == 4
    assert not hasattr(config, "s2_attention") and "auto_map" not in config.to_dict()
    tokenizer = AutoTokenizer.from_pretrained(PRETRAINED_TINY)
    assert tokenizer.get_vocab() == build_corpus_tokenizer().get_vocab()
    assert (PRETRAINED_TINY / "model.safetensors").stat().st_size < 8_000_000
