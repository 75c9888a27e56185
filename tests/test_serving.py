"""The serving tier: `merge --architecture llama` output runs in llama.cpp with its extended context.

The engine is llama.cpp through `llama-cpp-python`, built from its PyPI sdist, and the checkpoint is turned into a GGUF
by llama.cpp's own `convert_hf_to_gguf.py` from that same sdist (unpacked into `.venv/serving/llama.cpp` by
`make test-serving`; `LONGLORA_HUB_LLAMA_CPP` points elsewhere). Nothing is downloaded while the tests run.

Both checks tokenize once with the Hugging Face tokenizer and give llama.cpp token ids, so only the model is compared:
the logits of the prompt and the greedy continuation must be transformers' own. llama.cpp keeps its KV cache in f16
unless told otherwise; these tests ask for f32 so the two engines compute in the same precision (with the default f16
cache the SmolLM2 logits differ by about 1e-2, enough to swap two near-tied tokens).

The tiny model cannot use the project's byte-level BPE tokenizer (`longlora_hub.testing.build_tiny_tokenizer`):
llama.cpp's converter identifies a byte-level BPE tokenizer by the hash of how it splits a fixed text, and refuses
one it does not know ("BPE pre-tokenizer was not recognized"). A Llama-2-style tokenizer (BPE with byte fallback, the
layout of Llama 2's `tokenizer.json`) goes through the converter's Llama path, which needs no hash, so the tiny model
gets one of those, trained in code.

`make test-serving` runs this tier (installing llama-cpp-python first) and sets `LONGLORA_HUB_REQUIRE_SERVING=1`, so it
cannot pass by skipping. It is not part of `make test` (building llama.cpp takes minutes): a plain `pytest` skips it,
and `pytest -m serving` or naming this file runs it, skipping without the engine or the converter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from longlora_hub.testing import FILLER, sharded_base_and_adapter

pytestmark = [pytest.mark.serving, pytest.mark.slow]

CONVERTER_ENV = "LONGLORA_HUB_LLAMA_CPP"
REQUIRE_ENV = "LONGLORA_HUB_REQUIRE_SERVING"
GGML_TYPE_F32 = 0  # ggml's type id for float32, for llama.cpp's KV cache (`type_k`, `type_v`)

TINY_BASE_CONTEXT, TINY_CONTEXT = 256, 1024  # Position Interpolation x4
TINY_PROMPT, TINY_NEW = 600, 24  # the prompt runs past the base's 256 positions
REAL_CONTEXT = 32768  # SmolLM2's 8192, x4
REAL_PROMPT, REAL_NEW = 3000, 16
# measured with the f32 KV cache: tiny 3e-6 (logits up to 3.5), SmolLM2 6e-5 (logits up to 31); with Position
# Interpolation switched off in llama.cpp the same logits move by 2.6 (tiny) and 15 (SmolLM2)
TINY_ATOL, REAL_ATOL = 1e-4, 1e-3
# greedy tokens are compared up to the first step where transformers' best two logits are closer than this: there a
# difference of a few REAL_ATOL may pick either token, and every later token depends on that pick
NEAR_TIE = 2e-3


def llama_cpp_folder() -> Path:
    """The unpacked llama.cpp sources: `convert_hf_to_gguf.py`, with its `conversion/` and `gguf-py/` next to it."""
    return Path(os.environ.get(CONVERTER_ENV) or Path(sys.prefix) / "serving" / "llama.cpp")


def asked_for(config: pytest.Config) -> bool:
    """The tier runs when it is asked for: `-m serving`, this file named, or `make test-serving`; a plain `pytest` (and
    so `make test`) leaves it out even where llama-cpp-python is installed, as it is not part of `make test`."""
    markexpr = config.getoption("markexpr") or ""
    named = any(Path(str(arg).split("::")[0]).name == Path(__file__).name for arg in config.args)
    return os.environ.get(REQUIRE_ENV) == "1" or named or ("serving" in markexpr and "not serving" not in markexpr)


@pytest.fixture(scope="module")
def llama_cpp(request):
    """The `llama_cpp` module, when the tier is asked for and the engine and the converter are both there."""
    if not asked_for(request.config):
        pytest.skip("the serving tier runs on request: `make test-serving`, `pytest -m serving` or this file named")
    missing = []
    try:
        import llama_cpp
    except ImportError:
        missing.append("the llama_cpp module (pip install 'longlora-hub[serving]')")
    if not (llama_cpp_folder() / "convert_hf_to_gguf.py").is_file():
        missing.append(f"llama.cpp's convert_hf_to_gguf.py in {llama_cpp_folder()} (set ${CONVERTER_ENV})")
    if missing:
        message = "the serving tier needs " + " and ".join(missing) + ": run `make test-serving`"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(message)
        pytest.skip(message)
    return llama_cpp


def to_gguf(checkpoint: Path, output: Path) -> Path:
    """llama.cpp's converter, run as llama.cpp documents it (its own `gguf-py`), float32 so nothing is rounded."""
    command = [
        sys.executable,
        str(llama_cpp_folder() / "convert_hf_to_gguf.py"),
        str(checkpoint),
        "--outtype",
        "f32",
        "--outfile",
        str(output),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0 and output.is_file(), f"convert_hf_to_gguf.py failed:\n{done.stderr[-3000:]}"
    return output


def gguf_metadata(path: Path) -> tuple[dict, set[str]]:
    """The GGUF's scalar and string metadata, read with the `gguf` package, and its tensor names."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {}
    for name, field in reader.fields.items():
        value = field.contents()
        if not isinstance(value, list):
            fields[name] = value
    return fields, {tensor.name for tensor in reader.tensors}


def open_llama(llama_cpp, path: Path, n_ctx: int, **kwargs):
    return llama_cpp.Llama(
        str(path),
        n_ctx=n_ctx,
        n_threads=os.cpu_count() or 1,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        verbose=False,
        **kwargs,
    )


def llama_cpp_greedy(llm, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens from llama.cpp's own sampler (temperature 0), continuing a prompt already in its cache."""
    tokens = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        tokens.append(token)
        if len(tokens) == new_tokens:
            return tokens
    return tokens


def transformers_greedy(model, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens (no EOS stop, so there are always `new_tokens`) and the logits of every step."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    assert len(tokens) == new_tokens
    return tokens, torch.stack([step[0] for step in out.logits]).float()


def llama2_style_tokenizer(texts: list[str], vocab_size: int):
    """A BPE tokenizer laid out as Llama 2's `tokenizer.json` (spaces as "▁", 256 `<0xNN>` byte-fallback tokens,
    `<unk>`, `<s>`, `</s>` as ids 0, 1, 2), trained in code; llama.cpp's converter reads it without a pre-tokenizer
    hash."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]

    def llama_pipeline(model) -> Tokenizer:
        tokenizer = Tokenizer(model)
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        return tokenizer

    draft = llama_pipeline(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # the byte tokens are trained in as special tokens only to reserve their ids; the final tokenizer keeps them as
    # plain vocabulary, as Llama 2 does, with only <unk>, <s> and </s> special
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_tokens, show_progress=False)
    draft.train_from_iterator(texts, trainer=trainer)
    trained = json.loads(draft.to_str())["model"]
    merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split(" ")) for pair in trained["merges"]]
    model = models.BPE(vocab=trained["vocab"], merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tokenizer = llama_pipeline(model)
    tokenizer.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=1 << 20
    )


# ---------------------------------------------------------------------------------------------------------------
# a tiny merged model: context 256 -> 1024 (linear x4)


@pytest.fixture(scope="module")
def tiny(llama_cpp, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama base with a trained-looking adapter (LoRA, embeddings, norms), converted to 4x its context,
    merged as a stock Llama and converted to GGUF. Weights drawn with std 0.1 (not 0.02): the logits spread enough to
    compare."""
    from longlora_hub.convert import convert_checkpoint
    from longlora_hub.merge import merge_adapter

    folder = tmp_path_factory.mktemp("serving-tiny")
    base, adapter = sharded_base_and_adapter(
        folder, num_shards=2, max_position_embeddings=TINY_BASE_CONTEXT, initializer_range=0.1
    )
    for path in base.glob("tokenizer*"):
        path.unlink()
    llama2_style_tokenizer([FILLER] * 8, vocab_size=384).save_pretrained(base)
    extended = convert_checkpoint(base, folder / "extended", TINY_CONTEXT)
    merged = merge_adapter(adapter, folder / "merged", base=extended, architecture="llama")
    return merged, to_gguf(merged, folder / "merged-f32.gguf")


def test_tiny_gguf_carries_the_linear_scaling(tiny, llama_cpp):
    """The merged config holds the extended context and the PI factor; the converter writes them as llama.cpp's linear
    RoPE scaling, and llama.cpp loads them as its training context and frequency scale."""
    merged, gguf = tiny
    config = json.loads((merged / "config.json").read_text())
    assert config["max_position_embeddings"] == TINY_CONTEXT
    assert config["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    fields, _ = gguf_metadata(gguf)
    assert fields["general.architecture"] == "llama"
    assert fields["llama.context_length"] == TINY_CONTEXT
    assert fields["llama.rope.scaling.type"] == "linear"
    assert fields["llama.rope.scaling.factor"] == pytest.approx(4.0)
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    # linear scaling needs no original context: the converter writes it for YaRN only, and the base's context is
    # what the extended one and the factor say
    assert "llama.rope.scaling.original_context_length" not in fields
    assert fields["llama.context_length"] / fields["llama.rope.scaling.factor"] == TINY_BASE_CONTEXT
    assert fields["tokenizer.ggml.model"] == "llama"
    llm = open_llama(llama_cpp, gguf, n_ctx=TINY_CONTEXT)
    try:
        assert llama_cpp.llama_model_n_ctx_train(llm.model) == TINY_CONTEXT
        assert llama_cpp.llama_model_rope_freq_scale_train(llm.model) == pytest.approx(0.25)
        assert llm.n_ctx() == TINY_CONTEXT
    finally:
        llm.close()


def test_tiny_llama_cpp_equals_transformers_past_the_base_context(tiny, llama_cpp):
    """A 600-token prompt (the base saw 256 positions): llama.cpp's logits at every prompt position equal
    transformers' on the merged checkpoint, and so do the 24 greedy tokens. Without the interpolation (llama.cpp told
    to scale frequencies by 1) the logits are far off, so the agreement is the scaling at work."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged, gguf = tiny
    prompt = AutoTokenizer.from_pretrained(merged)(FILLER * 20)["input_ids"][:TINY_PROMPT]
    assert len(prompt) == TINY_PROMPT
    model = AutoModelForCausalLM.from_pretrained(merged).eval()  # a stock LlamaForCausalLM, no remote code
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        want_logits = model(torch.tensor([prompt])).logits[0].numpy()
    want_tokens, _ = transformers_greedy(model, prompt, TINY_NEW)

    llm = open_llama(llama_cpp, gguf, n_ctx=TINY_CONTEXT, logits_all=True)
    try:
        llm.eval(prompt)
        got_logits = np.array(llm.scores[:TINY_PROMPT])
        got_tokens = llama_cpp_greedy(llm, prompt, TINY_NEW)
    finally:
        llm.close()
    difference = np.abs(got_logits - want_logits).max()
    print(f"tiny: llama.cpp vs transformers, {TINY_PROMPT} prompt positions: max |logit difference| {difference:.2e}")
    assert difference < TINY_ATOL
    assert got_tokens == want_tokens

    unscaled = open_llama(llama_cpp, gguf, n_ctx=TINY_CONTEXT, logits_all=True, rope_freq_scale=1.0)
    try:
        unscaled.eval(prompt)
        without_pi = np.abs(np.array(unscaled.scores[:TINY_PROMPT]) - want_logits).max()
    finally:
        unscaled.close()
    print(f"tiny: the same without Position Interpolation: {without_pi:.2e}")
    assert without_pi > 1000 * TINY_ATOL


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct: context 8192 -> 32768 (linear x4), with an adapter merged in


@pytest.fixture(scope="module")
def smollm2_served(llama_cpp, tmp_path_factory) -> tuple[Path, Path, Path]:
    """SmolLM2 converted to 32k, a fresh longlora adapter (LoRA + embeddings + norms) with every trainable tensor
    moved (LoRA B away from zero, embeddings and norms scaled by 1 +- 1%), merged as a stock Llama (untied: the
    embedding was trained) and converted to GGUF."""
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    from longlora_hub.convert import convert_checkpoint
    from longlora_hub.merge import merge_adapter
    from longlora_hub.real_model import is_ready, smollm2_checkpoint
    from longlora_hub.trainable import lora_config

    if not is_ready() and os.environ.get("LONGLORA_HUB_REQUIRE_REAL") != "1":
        pytest.skip("the real-model checkpoint is not made: run `make real-model` (or `make test-serving`)")
    smollm2 = smollm2_checkpoint()
    folder = tmp_path_factory.mktemp("serving-smollm2")
    extended = convert_checkpoint(smollm2, folder / "32k", REAL_CONTEXT)
    model = LlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    peft_model = get_peft_model(model, lora_config("longlora"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if not parameter.requires_grad or "lora_A" in name:
                continue
            noise = torch.randn(parameter.shape, generator=generator)
            if "lora_B" in name:
                parameter.add_(noise * 0.01)
            else:  # the trainable copies of the embedding and the norms
                parameter.mul_(1 + 0.01 * noise)
    peft_model.save_pretrained(folder / "adapter")
    del model, peft_model
    merged = merge_adapter(folder / "adapter", folder / "merged", base=extended, architecture="llama")
    return smollm2, merged, to_gguf(merged, folder / "merged-f32.gguf")


def test_smollm2_gguf_carries_the_linear_scaling(smollm2_served, llama_cpp):
    from safetensors import safe_open

    smollm2, merged, gguf = smollm2_served
    name = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(smollm2 / "model.safetensors", "pt") as base, safe_open(merged / "model.safetensors", "pt") as out:
        assert not torch.equal(base.get_tensor(name), out.get_tensor(name))  # the merge changed the weights
        assert "lm_head.weight" in out.keys()
    fields, tensors = gguf_metadata(gguf)
    assert fields["llama.context_length"] == REAL_CONTEXT
    assert fields["llama.rope.scaling.type"] == "linear"
    assert fields["llama.rope.scaling.factor"] == pytest.approx(4.0)
    assert fields["llama.rope.freq_base"] == pytest.approx(100000.0)
    assert fields["tokenizer.ggml.pre"] == "smollm"  # SmolLM2's tokenizer is one llama.cpp knows
    assert {"token_embd.weight", "output.weight"} <= tensors  # untied, as the merge wrote it


def test_smollm2_llama_cpp_equals_transformers(smollm2_served, llama_cpp):
    """3000 tokens of license text into llama.cpp with its full 32k context: the next-token logits equal
    transformers' within 1e-3 and the greedy tokens are the same (up to the first near-tie, see NEAR_TIE; at least
    half of them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longlora_hub.real_model import license_texts

    _, merged, gguf = smollm2_served
    text = "\n\n".join(path.read_text(encoding="utf-8") for path in license_texts())
    prompt = AutoTokenizer.from_pretrained(merged)(text, add_special_tokens=False)["input_ids"][:REAL_PROMPT]
    assert len(prompt) == REAL_PROMPT
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    want_tokens, want_logits = transformers_greedy(model, prompt, REAL_NEW)
    del model

    llm = open_llama(llama_cpp, gguf, n_ctx=REAL_CONTEXT)
    try:
        assert llm.n_ctx() == REAL_CONTEXT
        llm.eval(prompt)
        pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        got_logits = np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).copy()
        got_tokens = llama_cpp_greedy(llm, prompt, REAL_NEW)
    finally:
        llm.close()
    difference = np.abs(got_logits - want_logits[0].numpy()).max()
    top2 = want_logits.topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    compared = next((step for step, margin in enumerate(margins) if margin < NEAR_TIE), REAL_NEW)
    print(
        f"SmolLM2: llama.cpp vs transformers after {REAL_PROMPT} tokens: max |logit difference| {difference:.2e}; "
        f"top-2 margins {[round(margin, 3) for margin in margins]}; tokens compared {compared}/{REAL_NEW}"
    )
    assert difference < REAL_ATOL
    assert compared >= REAL_NEW // 2, "the prompt leads to near-ties too early to compare; pick another prompt"
    assert got_tokens[:compared] == want_tokens[:compared]
