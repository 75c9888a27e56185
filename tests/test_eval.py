"""Evaluation: perplexity windows and numbers, the chunked loss, data formats, passkey prompts and scoring, and the
`eval ppl` / `eval passkey` commands with every error they promise."""

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from longlora_hub.cli_eval import eval_group
from longlora_hub.convert import convert_checkpoint
from longlora_hub.evaluation.passkey import (
    KEY_RANGE,
    build_passkey_prompt,
    is_exact_match,
    needle,
    plan_trials,
    run_passkey,
)
from longlora_hub.evaluation.perplexity import (
    Window,
    evaluate_perplexity,
    load_tokens,
    plan_windows,
    s2_evaluation,
    token_nll,
)
from longlora_hub.evaluation.report import markdown_table
from longlora_hub.synthetic import long_documents
from longlora_hub.testing import LargestTensor, build_tiny_tokenizer, tiny_llama

BASE_CONTEXT = 256  # tiny_llama's max_position_embeddings
EXTENDED_CONTEXT = 1024


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("eval") / "tiny-llama"
    tiny_llama(0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def longlora_dir(base_dir) -> Path:
    """A LlamaLongLoRA checkpoint extended 4x with Position Interpolation (remote code, loaded with
    trust_remote_code)."""
    return convert_checkpoint(base_dir, base_dir.parent / "tiny-longlora", EXTENDED_CONTEXT)


@pytest.fixture(scope="module")
def adapter_dir(base_dir) -> Path:
    """A PEFT LoRA adapter on the tiny base, with non-zero LoRA weights so it changes the model."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from longlora_hub.trainable import lora_config

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora_config("lora"))
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(std=0.5)
    folder = base_dir.parent / "adapter"
    model.save_pretrained(folder)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    return folder


@pytest.fixture(scope="module")
def documents(tokenizer):
    docs = long_documents(2, sentences=60, seed=3)
    ids = [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in docs]
    joined = ids[0] + [tokenizer.eos_token_id] + ids[1]
    return SimpleNamespace(texts=docs, ids=ids, joined=np.array(joined))


def invoke(*args: str):
    return CliRunner().invoke(eval_group, [str(arg) for arg in args], catch_exceptions=False)


def write_bin(path: Path, ids) -> Path:
    np.asarray(ids, dtype=np.uint16).tofile(path)
    return path


# -----------------------------------------------------------------------------------------------------------------
# windows and numbers


def test_longlora_windows_follow_the_reference():
    # the reference starts windows at range(0, len - seq_len, stride) and scores every window in full
    windows = plan_windows(20, 8, 4, "longlora")
    assert windows == [Window(0, 8, 1), Window(4, 12, 5), Window(8, 16, 9)]
    assert [list(w.scored) for w in windows] == [list(range(1, 8)), list(range(5, 12)), list(range(9, 16))]
    assert plan_windows(9, 8, 4, "longlora") == [Window(0, 8, 1)]  # seq_len + 1 tokens: exactly one window
    assert len(plan_windows(10_000, 1024, 256, "longlora")) == len(range(0, 10_000 - 1024, 256))


def test_press_windows_score_every_token_once():
    windows = plan_windows(18, 8, 4, "press")
    assert windows == [Window(0, 8, 1), Window(4, 12, 8), Window(8, 16, 12), Window(12, 18, 16)]
    for num_tokens, seq_len, stride in [(18, 8, 4), (100, 16, 15), (101, 16, 5), (57, 10, 1), (30, 29, 7)]:
        windows = plan_windows(num_tokens, seq_len, stride, "press")
        scored = [t for w in windows for t in w.scored]
        assert scored == list(range(1, num_tokens))  # each token but the first, once, in order
        assert all(w.end - w.start <= seq_len and w.start < w.score_start for w in windows)
        # after the first window every scored token has at least seq_len - stride tokens of context
        assert all(w.score_start - w.start >= seq_len - stride for w in windows[1:])


def test_window_errors():
    with pytest.raises(ValueError, match="holds 8 tokens, fewer than the 9"):
        plan_windows(8, 8, 4, "longlora")
    with pytest.raises(ValueError, match="below --seq-len"):
        plan_windows(100, 8, 8, "press")  # non-overlapping windows leave every window's first token unscored
    with pytest.raises(ValueError, match="protocol"):
        plan_windows(100, 8, 4, "nope")


class UnigramLM(torch.nn.Module):
    """A fake causal LM whose loss on a token depends on the token only: NLL(k) = -log(probs[k])."""

    def __init__(self, probs):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=len(probs))
        self.lm_head = torch.nn.Linear(1, len(probs), bias=False)
        self.lm_head.weight.data = torch.tensor(probs, dtype=torch.float32).log()[:, None]
        self.model = lambda input_ids, **kwargs: SimpleNamespace(
            last_hidden_state=torch.ones(*input_ids.shape, 1, device=input_ids.device)
        )

    def forward(self, input_ids, **kwargs):  # what the check of the chunked loss compares with
        return SimpleNamespace(logits=self.lm_head(self.model(input_ids).last_hidden_state))


def test_protocols_on_known_losses():
    probs = [0.1, 0.2, 0.3, 0.4]
    nll = [-np.log(p) for p in probs]
    tokens = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    model = UnigramLM(probs)
    # longlora, seq_len 4, stride 2: windows [0,4) [2,6) [4,8) score tokens 1-3, 3-5, 5-7
    got = evaluate_perplexity(model, tokens, 4, stride=2, protocol="longlora", progress=False)
    windows = [[1, 2, 3], [3, 0, 1], [1, 2, 3]]
    expected = np.mean([np.mean([nll[k] for k in window]) for window in windows])
    assert got["windows"] == 3 and got["scored_tokens"] == 9
    assert got["loss"] == pytest.approx(expected, abs=1e-6)
    assert got["perplexity"] == pytest.approx(np.exp(expected), rel=1e-6)
    # press: every token after the first once, over 4 windows (the last one [6, 10))
    got = evaluate_perplexity(model, tokens, 4, stride=2, protocol="press", batch_size=3, progress=False)
    expected = np.mean([nll[k] for k in tokens[1:]])
    assert got["windows"] == 4 and got["scored_tokens"] == 9
    assert got["loss"] == pytest.approx(expected, abs=1e-6)
    assert got["perplexity"] == pytest.approx(np.exp(expected), rel=1e-6)


def test_chunked_loss_matches_unchunked_and_never_builds_full_logits():
    model = tiny_llama(0)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        chunked = token_nll(model, ids, chunk_size=48)
        full = token_nll(model, ids, chunk_size=None)
        reference = model(ids, labels=ids).loss  # transformers' own shifted loss
    assert chunked.shape == (2, 199)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=0)
    assert chunked.mean().item() == pytest.approx(reference.item(), abs=1e-5)

    n, chunk = 256, 32
    ids = torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), LargestTensor() as probe:
        token_nll(model, ids, chunk_size=chunk)
    assert probe.largest < (n - 1) * vocab / 2
    with torch.no_grad(), LargestTensor() as naive:
        token_nll(model, ids, chunk_size=None)
    assert naive.largest >= (n - 1) * vocab  # the probe does see a full logits tensor when one is built


def test_memorised_text_has_perplexity_near_one():
    vocab = 384
    generator = torch.Generator().manual_seed(0)
    text = torch.randperm(vocab - 3, generator=generator)[:96] + 3  # distinct tokens: each one fixes the next
    untrained = evaluate_perplexity(tiny_llama(0), text.numpy(), 32, stride=8, progress=False)["perplexity"]
    assert vocab / 2 < untrained < vocab * 2

    model = tiny_llama(0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        starts = torch.randint(0, len(text) - 31, (8,), generator=generator)
        batch = torch.stack([text[start : start + 32] for start in starts])
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for protocol in ("longlora", "press"):
        trained = evaluate_perplexity(model, text.numpy(), 32, stride=8, protocol=protocol, progress=False)
        assert trained["perplexity"] < 1.5, (protocol, trained)
    assert not model.training  # evaluation runs in eval mode (full attention, no dropout)


def test_s2_evaluation_uses_the_training_path_without_dropout_and_restores_the_model():
    from .helpers import longlora_from

    model = longlora_from(tiny_llama(0, attention_dropout=0.3))
    ids = torch.randint(3, 384, (1, 128), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = token_nll(model, ids)
        with s2_evaluation(model):
            assert model.training and model.model.s2_active()
            assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)
            s2 = token_nll(model, ids)
            again = token_nll(model, ids)  # no dropout: the same numbers twice
    torch.testing.assert_close(s2, again, atol=0, rtol=0)
    assert not torch.allclose(s2, full)  # S² groups see less context than full attention
    # G = 32: the first G/2 tokens see all their context in both head halves, so their losses do not change
    torch.testing.assert_close(s2[:, :16], full[:, :16], atol=1e-5, rtol=0)
    assert not model.training and model.model.layers[0].self_attn.attention_dropout == 0.3
    with pytest.raises(ValueError, match="only LlamaLongLoRA"), s2_evaluation(tiny_llama(0)):
        pass


# -----------------------------------------------------------------------------------------------------------------
# data


def test_data_formats_give_the_same_tokens_and_perplexity(tmp_path, tokenizer, documents, base_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": text, "meta": i} for i, text in enumerate(documents.texts)]
    files = {
        "bin": write_bin(tmp_path / "data.bin", documents.joined),
        "jsonl": tmp_path / "data.jsonl",
        "parquet": tmp_path / "data.parquet",
        "folder": tmp_path / "dataset",
    }
    files["jsonl"].write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), files["parquet"])
    files["folder"].mkdir()
    pq.write_table(pa.Table.from_pylist(rows), files["folder"] / "test.parquet")  # a Hub-style dataset folder
    (tmp_path / "one.txt").write_text(documents.texts[0])
    single = write_bin(tmp_path / "one.bin", documents.ids[0])

    bin_tokens = load_tokens(files["bin"])
    assert isinstance(bin_tokens, np.memmap) and bin_tokens.dtype == np.uint16
    for kind, path in files.items():
        np.testing.assert_array_equal(load_tokens(path, tokenizer), documents.joined, err_msg=kind)
    np.testing.assert_array_equal(load_tokens(tmp_path / "one.txt", tokenizer), documents.ids[0])
    np.testing.assert_array_equal(load_tokens(single), documents.ids[0])
    assert len(load_tokens(files["jsonl"], tokenizer, max_tokens=50)) == 50

    def perplexity(data) -> float:
        out = tmp_path / "result.json"
        result = invoke("ppl", base_dir, "--data", data, "--seq-len", 128, "--stride", 300, "-o", out)
        assert result.exit_code == 0, result.output
        return json.loads(out.read_text())["results"][0]["perplexity"]

    values = {kind: perplexity(path) for kind, path in files.items()}
    assert len(set(values.values())) == 1, values
    assert perplexity(tmp_path / "one.txt") == perplexity(single)


# -----------------------------------------------------------------------------------------------------------------
# passkey


def test_passkey_prompts_hold_one_key_at_the_asked_depth_and_length(tokenizer):
    for length in (2048, 4096):
        for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
            key = 31337
            prompt = build_passkey_prompt(tokenizer, length, depth, key)
            assert prompt.text.count(needle(key)) == 1
            assert re.findall(r"\d+", prompt.text) == [str(key), str(key)]  # only in the needle, which says it twice
            assert prompt.text.endswith("What is the pass key? The pass key is")
            assert 0.95 * length <= len(prompt.input_ids) <= length
            assert prompt.input_ids == tokenizer(prompt.text)["input_ids"]
            assert abs(prompt.needle_depth - depth) <= 0.05, (length, depth, prompt.needle_depth)
            needle_ids = tokenizer(needle(key), add_special_tokens=False)["input_ids"]
            at = prompt.needle_index
            assert prompt.input_ids[at : at + len(needle_ids)] == needle_ids
            assert tokenizer.decode(prompt.answer_ids).strip() == str(key)
    with pytest.raises(ValueError, match="too short"):
        build_passkey_prompt(tokenizer, 64, 0.5, 1)


def test_passkey_trials_are_seeded():
    plan = plan_trials([1024, 2048], depths=None, trials=10, seed=0)
    assert plan == plan_trials([1024, 2048], depths=None, trials=10, seed=0)
    keys = [trial.key for trial in plan if trial.length == 1024]
    assert keys == [trial.key for trial in plan if trial.length == 2048]  # the same keys at every length
    assert len(set(keys)) == 10 and all(KEY_RANGE[0] <= key < KEY_RANGE[1] for key in keys)
    assert keys != [trial.key for trial in plan_trials([1024], trials=10, seed=1)]
    depths = [trial.depth for trial in plan if trial.length == 1024]
    assert len(set(depths)) == 10 and all(0 <= depth < 1 for depth in depths)
    fixed = plan_trials([1024], depths=[0.0, 0.5], trials=3, seed=0)
    assert [(t.depth, t.trial) for t in fixed] == [(0.0, 0), (0.0, 1), (0.0, 2), (0.5, 0), (0.5, 1), (0.5, 2)]


class OracleLM(torch.nn.Module):
    """A fake model that reads the key from the prompt and answers it, if `knows(needle position)`; otherwise it
    answers `wrong(key)`."""

    def __init__(self, tokenizer, knows=lambda where: True, wrong=lambda key: key + 1):
        super().__init__()
        self.tokenizer, self.knows, self.wrong = tokenizer, knows, wrong

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        new = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            key = int(re.search(r"The pass key is (\d+)\.", prompt).group(1))
            where = prompt.index("The pass key is") / len(prompt)
            answer = self.tokenizer(f" {key if self.knows(where) else self.wrong(key)}", add_special_tokens=False)
            tokens = (answer["input_ids"] + [self.tokenizer.eos_token_id] * max_new_tokens)[:max_new_tokens]
            new.append(torch.tensor(tokens))
        return torch.cat([input_ids, torch.stack(new)], dim=1)


def test_passkey_scoring_is_exact_match(tokenizer):
    assert is_exact_match([5, 6], [5, 6]) and not is_exact_match([5, 7], [5, 6]) and not is_exact_match([5], [5, 6])
    run = dict(lengths=[512, 1024], depths=[0.25, 0.75], trials=3, batch_size=2, progress=False)
    perfect = run_passkey(OracleLM(tokenizer), tokenizer, **run)
    assert perfect["overall_accuracy"] == 1.0 and perfect["accuracy"] == {"512": 1.0, "1024": 1.0}
    shallow = run_passkey(OracleLM(tokenizer, knows=lambda where: where < 0.5), tokenizer, **run)
    assert {(c["length"], c["depth"]): c["accuracy"] for c in shallow["cells"]} == {
        (512, 0.25): 1.0,
        (512, 0.75): 0.0,
        (1024, 0.25): 1.0,
        (1024, 0.75): 0.0,
    }
    assert all(cell["trials"] == 3 for cell in shallow["cells"])
    # the last digit wrong: the answer starts right, but every one of its tokens must match
    last_digit = run_passkey(
        OracleLM(tokenizer, knows=lambda where: False, wrong=lambda key: key ^ 1), tokenizer, **run
    )
    assert last_digit["overall_accuracy"] == 0.0
    # like the reference, exactly as many tokens as the answer has are generated: what would follow is not judged
    longer = run_passkey(OracleLM(tokenizer, knows=lambda where: False, wrong=lambda key: key * 10), tokenizer, **run)
    assert longer["overall_accuracy"] == 1.0
    table = markdown_table({"task": "passkey", "model": "m", "lengths": [512, 1024], "depths": [0.25, 0.75], **run,
                            "results": shallow})  # fmt: skip
    assert "| 512 | 100% | 0% | 50% |" in table


def test_passkey_is_deterministic_on_a_real_model(tokenizer):
    model = tiny_llama(0, max_position_embeddings=EXTENDED_CONTEXT)
    first = run_passkey(model, tokenizer, [256, 512], trials=3, seed=7, progress=False)
    second = run_passkey(model, tokenizer, [256, 512], trials=3, seed=7, progress=False)
    assert first == second
    assert [record["key"] for record in first["records"]][:3] == [trial.key for trial in plan_trials([256], None, 3, 7)]
    assert all(len(cell["depth_range"]) == 2 for cell in first["cells"])  # random depths are binned
    other = run_passkey(model, tokenizer, [256], trials=3, seed=8, progress=False)
    assert [r["key"] for r in other["records"]] != [r["key"] for r in first["records"][:3]]


# -----------------------------------------------------------------------------------------------------------------
# the commands


def test_cli_ppl_writes_the_results_json(tmp_path, longlora_dir, documents):
    data = write_bin(tmp_path / "data.bin", documents.joined)
    out = tmp_path / "ppl.json"
    lengths = ("--seq-len", "128,256", "--seq-len", 512, "--stride", 400)
    result = invoke("ppl", longlora_dir, "--data", data, *lengths, "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    for key in ("model", "adapter", "revision", "protocol", "lengths", "results", "versions", "data", "stride"):
        assert key in report, key
    assert report["task"] == "perplexity" and report["protocol"] == "longlora" and report["model"] == str(longlora_dir)
    assert report["model_class"] == "LlamaLongLoRAForCausalLM" and report["max_position_embeddings"] == 1024
    assert report["lengths"] == [128, 256, 512] and [row["seq_len"] for row in report["results"]] == [128, 256, 512]
    assert set(report["versions"]) >= {"torch", "transformers", "peft", "longlora-hub"}
    assert all(np.isfinite(row["perplexity"]) and row["windows"] >= 1 for row in report["results"])
    assert "| 512 |" in result.output  # the Markdown table

    # --s2: the S² pattern (training-mode forward) gives different numbers from full attention
    s2_out = tmp_path / "s2.json"
    assert invoke("ppl", longlora_dir, "--data", data, *lengths[2:], "--s2", "-o", s2_out).exit_code == 0
    s2 = json.loads(s2_out.read_text())
    assert s2["s2"] is True and s2["results"][0]["perplexity"] != report["results"][2]["perplexity"]

    press_out = tmp_path / "press.json"
    args = ("--data", data, "--seq-len", 256, "--stride", 200, "--protocol", "press", "--batch-size", 2)
    args += ("-o", press_out)
    assert invoke("ppl", longlora_dir, *args).exit_code == 0
    press = json.loads(press_out.read_text())
    assert press["protocol"] == "press" and press["results"][0]["scored_tokens"] == len(documents.joined) - 1


def test_cli_passkey_writes_json_and_heatmap(tmp_path, longlora_dir):
    out, plot = tmp_path / "passkey.json", tmp_path / "heatmap.png"
    args = ("--lengths", "256,512", "--depths", "0,0.5,1", "--trials", 1, "--plot", plot, "-o", out)
    result = invoke("passkey", longlora_dir, *args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["task"] == "passkey" and report["lengths"] == [256, 512] and report["depths"] == [0.0, 0.5, 1.0]
    for key in ("model", "adapter", "revision", "protocol", "versions", "trials", "seed"):
        assert key in report, key
    assert set(report["results"]["accuracy"]) == {"256", "512"}
    assert len(report["results"]["cells"]) == 6 and len(report["results"]["records"]) == 6
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    assert "| Length (tokens) | depth 0% | depth 50% | depth 100% | all |" in result.output

    again = tmp_path / "again.json"
    rerun = invoke("passkey", longlora_dir, *args[:-1], again)
    assert rerun.exit_code == 0, rerun.output
    assert json.loads(again.read_text())["results"] == report["results"]  # same seed, same numbers


def test_cli_adapter(tmp_path, base_dir, adapter_dir, documents):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_bin(tmp_path / "data.bin", documents.joined)

    def perplexity(*args) -> dict:
        out = tmp_path / "out.json"
        result = invoke("ppl", *args, "--data", data, "--seq-len", 128, "--stride", 300, "-o", out)
        assert result.exit_code == 0, result.output
        return json.loads(out.read_text())

    with_adapter = perplexity(base_dir, "--adapter", adapter_dir)
    assert with_adapter["adapter"] == str(adapter_dir) and with_adapter["model"] == str(base_dir)
    base_only = perplexity(base_dir)
    assert with_adapter["results"][0]["perplexity"] != base_only["results"][0]["perplexity"]
    # MODEL may be the adapter folder itself: its base comes from adapter_config.json
    adapter_as_model = perplexity(adapter_dir)
    assert adapter_as_model["base_model"] == str(base_dir)
    assert adapter_as_model["results"][0]["perplexity"] == with_adapter["results"][0]["perplexity"]

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    expected = evaluate_perplexity(peft_model, documents.joined, 128, stride=300, progress=False)
    assert with_adapter["results"][0]["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)


def test_cli_errors(tmp_path, base_dir, longlora_dir, adapter_dir, documents):
    data = write_bin(tmp_path / "data.bin", documents.joined)

    def fails(*args, match: str):
        result = invoke(*args)
        assert result.exit_code == 1, result.output
        assert re.search(match, result.output), result.output

    # a length beyond the data
    short = write_bin(tmp_path / "short.bin", documents.joined[:300])
    fails("ppl", longlora_dir, "--data", short, "--seq-len", 512, match="holds 300 tokens.*--seq-len 299")
    # a length beyond the model's position embeddings: the maximum and the fix
    fails("ppl", base_dir, "--data", data, "--seq-len", 512, match=r"at most 256 tokens.*longlora-hub convert")
    fails("passkey", base_dir, "--lengths", 1024, match=r"at most 256 tokens.*--context-length 1024")
    # an adapter whose base is gone
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "deleted-base")
    (orphan / "adapter_config.json").write_text(json.dumps(config))
    fails("ppl", orphan, "--data", data, "--seq-len", 128, match=r"base model of the adapter.*not found.*--adapter")
    fails("ppl", base_dir, "--adapter", tmp_path, "--data", data, "--seq-len", 128, match="No adapter_config.json")
    # missing data
    fails("ppl", base_dir, "--data", tmp_path / "missing.bin", "--seq-len", 128, match="No data file at")
    fails("ppl", base_dir, "--data", tmp_path / "missing.jsonl", "--seq-len", 128, match="No data file at")
    # S² on a model without it
    fails("ppl", base_dir, "--data", data, "--seq-len", 128, "--s2", match="only LlamaLongLoRA")
    # a passkey length too short for the prompt
    fails("passkey", longlora_dir, "--lengths", 64, match="too short")


# -----------------------------------------------------------------------------------------------------------------
# what is checked before an evaluation starts, and what an evaluation cannot lose


@pytest.fixture
def no_loading(monkeypatch):
    """Make loading the model fail loudly: an error meant to come before the evaluation must come before this."""
    from longlora_hub.evaluation import loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(loading, "load_model", refuse)


def test_output_paths_are_checked_before_the_evaluation(tmp_path, longlora_dir, documents, no_loading):
    data = write_bin(tmp_path / "data.bin", documents.joined)
    (tmp_path / "a-file").write_text("not a folder")
    ppl = ("ppl", longlora_dir, "--data", data, "--seq-len", 128)
    passkey = ("passkey", longlora_dir, "--lengths", 256, "--trials", 1)
    cases = [
        ((*ppl, "--output", tmp_path / "a-file" / "r.json"), r"a-file is a file, not a folder; pass another path"),
        ((*passkey, "--output", tmp_path / "a-file" / "r.json"), r"a-file is a file, not a folder"),
        ((*passkey, "--plot", tmp_path / "heatmap.xyz", "-o", tmp_path / "r.json"), r"end it in \.png"),
        ((*passkey, "--plot", tmp_path / "BAD"), r"--plot .*BAD is not an image file.*end it in \.png"),
        ((*passkey, "--plot", tmp_path / "a-file" / "h.png"), r"a-file is a file, not a folder"),
        ((*passkey, "--plot", tmp_path / "x.png", "-o", tmp_path / "x.png"), "pass two different files"),
    ]
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code == 1, result.output
        assert re.search(message, result.output), result.output
    assert not (tmp_path / "r.json").exists()


def test_results_are_written_before_the_plot(tmp_path, longlora_dir, monkeypatch):
    from longlora_hub.evaluation import report

    def broken_plot(result, path):
        raise OSError("No space left on device")

    monkeypatch.setattr(report, "plot_passkey_heatmap", broken_plot)
    out = tmp_path / "r.json"
    result = invoke("passkey", longlora_dir, "--lengths", 256, "--depths", 0.5, "--trials", 1, "--plot",
                    tmp_path / "h.png", "-o", out)  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "Could not write the heatmap" in result.output and f"the results are in {out}" in result.output
    assert json.loads(out.read_text())["results"]["accuracy"].keys() == {"256"}


def test_a_device_this_machine_lacks_is_refused_first(tmp_path, base_dir, documents, monkeypatch):
    from longlora_hub.evaluation import loading

    data = write_bin(tmp_path / "data.bin", documents.joined)
    monkeypatch.setattr(loading, "load_config", lambda source: pytest.fail("the device is checked first"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, message in [
        ("cuda", r"--device cuda needs a CUDA GPU, but .*; use --device cpu"),
        ("cuda:0", r"--device cuda:0 needs a CUDA GPU"),
        ("gpu", r"--device gpu is not a device name; use auto, cpu, cuda"),
    ]:
        result = invoke("ppl", base_dir, "--data", data, "--seq-len", 128, "--device", device)
        assert result.exit_code == 1 and re.search(message, result.output), result.output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    result = invoke("passkey", base_dir, "--lengths", 128, "--device", "cuda:2")
    assert result.exit_code == 1 and "names GPU 2, but this machine has 2 (cuda:0 to cuda:1)" in result.output


def test_an_adapter_of_another_model_is_refused_cleanly(tmp_path, base_dir, documents, tokenizer):
    from peft import get_peft_model

    from longlora_hub.trainable import lora_config

    data = write_bin(tmp_path / "data.bin", documents.joined)
    other = tmp_path / "other-base"
    tiny_llama(0, hidden_size=32, intermediate_size=64).save_pretrained(other)
    get_peft_model(tiny_llama(0, hidden_size=32, intermediate_size=64), lora_config("lora")).save_pretrained(
        tmp_path / "other-adapter"
    )
    result = invoke("ppl", base_dir, "--adapter", tmp_path / "other-adapter", "--data", data, "--seq-len", 128)
    assert result.exit_code == 1, result.output
    assert re.search(r"does not fit .*: size mismatch for .*lora_A.* and \d+ more\. It was trained on another model",
                     result.output), result.output  # fmt: skip
    assert result.output.count("size mismatch") == 1  # one message, not torch's list of every tensor


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ('["a", "list"]', r"config\.json holds a JSON list, not an object.*restore it"),
        (
            {"rope_parameters": {"rope_type": "linear", "factor": 0}},
            r"RoPE factor must be a positive number .*got 0 for 'linear' RoPE; fix",
        ),
        ({"rope_parameters": {"rope_type": "linear", "factor": -4.0}}, r"positive number .*got -4\.0 for 'linear'"),
        ({"rope_parameters": "linear"}, r"rope_parameters must be an object such as .*got 'linear'"),
    ],
)
def test_invalid_configs_are_clean_errors(tmp_path, base_dir, documents, change, message):
    folder = Path(shutil.copytree(base_dir, tmp_path / "model"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(change if isinstance(change, str) else json.dumps(config | change))
    data = write_bin(tmp_path / "data.bin", documents.joined)
    for args in (("ppl", folder, "--data", data, "--seq-len", 128), ("passkey", folder, "--lengths", 128)):
        result = invoke(*args)
        assert result.exit_code == 1 and re.search(message, result.output), result.output


def test_an_adapter_config_that_is_not_an_object_is_a_clean_error(tmp_path, base_dir, documents):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("[]")
    data = write_bin(tmp_path / "data.bin", documents.joined)
    result = invoke("ppl", base_dir, "--adapter", adapter, "--data", data, "--seq-len", 128)
    assert result.exit_code == 1 and "holds a JSON list, not an object" in result.output, result.output


def test_passkey_prompts_are_built_as_the_run_goes(tokenizer, monkeypatch):
    """A run of many trials starts at once: prompts are built batch by batch, not all before the first trial."""
    from longlora_hub.evaluation import passkey

    built = []
    real_build = passkey.build_passkey_prompt

    def counting_build(*args, **kwargs):
        built.append(args)
        return real_build(*args, **kwargs)

    class FirstTrial(Exception):
        pass

    class StopAtFirstGenerate:
        def generate(self, **kwargs):
            raise FirstTrial

    monkeypatch.setattr(passkey, "build_passkey_prompt", counting_build)
    with pytest.raises(FirstTrial):
        run_passkey(StopAtFirstGenerate(), tokenizer, [256], trials=300, batch_size=2, device="cpu", progress=False)
    assert len(built) == 2  # the first batch's prompts only


# -----------------------------------------------------------------------------------------------------------------
# plots: matplotlib's own Figure, every depth bin, an optional extra


def _binned_result(depths_hit: list[float], lengths=(256, 512), bins: int = 5) -> dict:
    """A passkey result with random depths in `bins` bins, one trial per depth in `depths_hit` at each length."""
    from longlora_hub.evaluation.passkey import summarize_passkey

    records = [
        {"length": length, "depth": depth, "correct": index % 2 == 0, "prompt_tokens": length}
        for length in lengths
        for index, depth in enumerate(depths_hit)
    ]
    summary = summarize_passkey(records, list(lengths), None, bins)
    return {"task": "passkey", "model": "m", "lengths": list(lengths), "depths": None, "depth_bins": bins,
            "trials": len(depths_hit), "results": summary}  # fmt: skip


def test_heatmap_draws_every_depth_bin_and_marks_the_empty_ones():
    from longlora_hub.evaluation.report import passkey_grid, passkey_heatmap_figure

    result = _binned_result([0.05, 0.3, 0.35, 0.7, 0.95])  # no trial in 40%-60%
    assert {cell["depth"] for cell in result["results"]["cells"]} == {0.1, 0.3, 0.7, 0.9}  # the JSON: no empty cell
    lengths, labels, grid = passkey_grid(result)
    assert labels == ["0%–20%", "20%–40%", "40%–60%", "60%–80%", "80%–100%"]
    assert grid[2] == [None, None] and grid[1] == [0.5, 0.5] and grid[0] == [1.0, 1.0]
    table = markdown_table(result)
    assert (
        "| depth 20%–40% | depth 40%–60% | depth 60%–80% |" in table
        and "| 256 | 100% | 50% | – | 0% | 100% | 60% |" in table
    )

    figure = passkey_heatmap_figure(result)
    axes = figure.axes[0]
    assert [tick.get_text() for tick in axes.get_yticklabels()] == labels
    hatched = [patch for patch in axes.patches if patch.get_hatch()]
    assert sorted((patch.get_x(), patch.get_y()) for patch in hatched) == [(-0.5, 1.5), (0.5, 1.5)]
    assert [text.get_text() for text in axes.texts].count("n/a") == len(lengths)
    # fixed depths keep their rows as before
    cells = [{"length": 256, "depth": 0.0, "accuracy": 1.0}, {"length": 256, "depth": 0.5, "accuracy": 0.0}]
    fixed = {"task": "passkey", "model": "m", "lengths": [256], "depths": [0.5, 0.0], "trials": 1,
             "results": {"accuracy": {"256": 0.5}, "cells": cells}}  # fmt: skip
    assert passkey_grid(fixed)[1:] == (["0%", "50%"], [[1.0], [0.0]])


def test_plots_leave_the_callers_matplotlib_alone(tmp_path):
    """No `matplotlib.use`, no pyplot figures: a heatmap drawn from a notebook or a GUI leaves its backend and its
    figures as they were."""
    import matplotlib
    import matplotlib.pyplot as plt

    from longlora_hub.evaluation.report import plot_passkey_heatmap

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend the caller chose, not Agg
    try:
        path = plot_passkey_heatmap(_binned_result([0.1, 0.5, 0.9]), tmp_path / "heatmap.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == []
    finally:
        matplotlib.use(before)


def test_matplotlib_is_optional_and_named_when_missing(tmp_path, longlora_dir, monkeypatch):
    import subprocess
    import sys

    from longlora_hub.evaluation.report import plot_passkey_heatmap

    # importing the package, its evaluation and its LongQA builder never imports matplotlib
    code = (
        "import sys, longlora_hub.cli, longlora_hub.evaluation, longlora_hub.longqa.build, longlora_hub.push; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"needs matplotlib, an optional dependency.*longlora-hub\[plots\]"):
        plot_passkey_heatmap(_binned_result([0.5]), tmp_path / "h.png")
    result = invoke("passkey", longlora_dir, "--lengths", 256, "--trials", 1, "--plot", tmp_path / "h.png")
    assert result.exit_code == 1 and "pip install 'longlora-hub[plots]'" in result.output, result.output
    assert "Or leave out --plot" in result.output
    # without --plot nothing needs it
    assert invoke("passkey", longlora_dir, "--lengths", 256, "--trials", 1).exit_code == 0


# -----------------------------------------------------------------------------------------------------------------
# --device auto, --dtype auto


def test_device_auto_is_the_cpu_without_cuda_and_a_device_map_with_it(base_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from longlora_hub.evaluation.loading import load_model, resolve_device, resolve_source

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "auto"

    asked = {}

    class Stop(Exception):
        pass

    def record(name, **kwargs):
        asked.update(kwargs)
        raise Stop

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", record)
    with pytest.raises(Stop):
        load_model(resolve_source(str(base_dir)), device="auto", dtype="auto")
    # transformers/accelerate place (and, when one GPU is too small, split) the model; the checkpoint's dtype
    assert asked["device_map"] == "auto" and asked["dtype"] == "auto"


def test_dtype_auto_is_the_checkpoints_dtype(tmp_path, tokenizer, documents, monkeypatch):
    from longlora_hub.evaluation.loading import load_model, resolve_source

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    folder = tmp_path / "bf16"
    tiny_llama(0).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load_model(resolve_source(str(folder)), device="auto", dtype="auto")
    assert loaded.model.dtype == torch.bfloat16 and next(loaded.model.parameters()).device.type == "cpu"
    assert loaded.info["dtype"] == "bfloat16" and loaded.info["device"] == "cpu"

    data = write_bin(tmp_path / "data.bin", documents.joined)
    for dtype, expected in (("auto", "bfloat16"), ("float32", "float32")):
        out = tmp_path / f"{dtype}.json"
        result = invoke("ppl", folder, "--data", data, "--seq-len", 128, "--stride", 300, "--dtype", dtype, "-o", out)
        assert result.exit_code == 0, result.output
        report = json.loads(out.read_text())
        assert (report["dtype"], report["device"]) == (expected, "cpu")
        assert np.isfinite(report["results"][0]["perplexity"])


# -----------------------------------------------------------------------------------------------------------------
# what forward does to the logits, the chunked loss does too


def _tiny(config_class, model_class, **extra):
    config = config_class(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False, **extra)  # fmt: skip
    torch.manual_seed(0)
    model = model_class(config).eval()
    model.lm_head.weight.data *= 200  # logits of a trained model's size: a cap of 2 or a scale then matters
    return model


@pytest.mark.parametrize("architecture", ["gemma2", "cohere", "granite"])
def test_chunked_loss_applies_the_models_output_transform(architecture):
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
        GraniteConfig,
        GraniteForCausalLM,
    )

    from longlora_hub.evaluation.perplexity import logit_transform

    model = {
        "gemma2": lambda: _tiny(Gemma2Config, Gemma2ForCausalLM, head_dim=16, final_logit_softcapping=2.0),
        "cohere": lambda: _tiny(CohereConfig, CohereForCausalLM, logit_scale=0.25),
        "granite": lambda: _tiny(GraniteConfig, GraniteForCausalLM, logits_scaling=8.0),
    }[architecture]()
    assert logit_transform(model) is not None
    ids = torch.randint(3, 384, (2, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids, labels=ids).loss.item()  # the model's own forward and loss
        head_only = torch.nn.functional.cross_entropy(
            model.lm_head(model.model(ids).last_hidden_state[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()
        ).item()
        chunked = token_nll(model, ids, chunk_size=32)
    assert abs(head_only - reference) > 0.1  # without the transform the loss would be wrong
    assert chunked.mean().item() == pytest.approx(reference, abs=1e-4)
    result = evaluate_perplexity(model, ids[0].numpy(), 64, stride=40, chunk_size=16, progress=False)
    assert np.isfinite(result["perplexity"])


def test_an_unknown_output_transform_is_refused():
    from transformers import LlamaForCausalLM

    class ScaledLogits(LlamaForCausalLM):  # a remote-code model with a logit scale nobody told us about
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = output.logits * 3.0
            return output

    model = ScaledLogits(tiny_llama(0).config).eval()
    tokens = np.random.default_rng(0).integers(3, 384, 300)
    with pytest.raises(ValueError, match=r"ScaledLogits \(llama\) computes its logits in a way .* does not reproduce"):
        evaluate_perplexity(model, tokens, 128, stride=100, progress=False)
    # an unscaled Llama passes the same check
    assert np.isfinite(evaluate_perplexity(tiny_llama(0), tokens, 128, stride=100, progress=False)["perplexity"])
