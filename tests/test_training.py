"""The training recipe end to end on the builtin tiny model: both stages, the adapter round trip, resuming,
and every bad input caught before a training step."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longlora_hub.data import load_raw_dataset, pack_documents, to_prompt_completion
from longlora_hub.testing import build_tiny_tokenizer
from longlora_hub.training import TokensPerSecondCallback

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sft_recipe", ROOT / "recipes" / "sft.py")
sft = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sft)

TINY_EXTEND = str(ROOT / "recipes" / "configs" / "tiny" / "extend.yaml")
TINY_LONGQA = str(ROOT / "recipes" / "configs" / "tiny" / "longqa.yaml")


def run(config, output_dir, *overrides):
    args = ["--config", config, "--output_dir", str(output_dir), "--disable_tqdm", "true", *overrides]
    return sft.main(args)


def short(*extra):
    return ("--max_length", "512", "--context_length", "512", "--max_steps", "6", "--save_steps", "3", *extra)


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_extend_stage_adapter_round_trip(tmp_path, capsys):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "extend"
    trainer = run(TINY_EXTEND, out, *short("--logging_steps", "1"))
    # what trained, on the PEFT model the trainer ran (tests/test_trainable.py spells the names out for every mode)
    from .test_trainable import expected_names, requires_grad

    assert requires_grad(trainer.model) == expected_names("longlora")
    history = losses(trainer)
    assert history[-1] < history[0], history
    assert "'tokens_per_second'" in capsys.readouterr().out  # the per-interval rate in every log line

    names = sorted(p.name for p in out.iterdir())
    assert "adapter_config.json" in names and "adapter_model.safetensors" in names
    assert "trainable_params.bin" not in names
    saved = load_file(out / "adapter_model.safetensors")
    assert any("embed_tokens" in key for key in saved)
    assert sum("layernorm" in key for key in saved) == 4 and any(key.endswith("model.norm.weight") for key in saved)
    assert not any("lm_head" in key for key in saved)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert Path(adapter_config["base_model_name_or_path"]) == out / "base"

    ids = torch.randint(3, 300, (1, 512), generator=torch.Generator().manual_seed(0))
    trained = trainer.model.eval()
    with torch.no_grad():
        want = trained(ids).logits
        base = AutoModelForCausalLM.from_pretrained(out / "base", trust_remote_code=True)
        assert base.config.max_position_embeddings == 512 and base.config.rope_parameters["factor"] == 2.0
        got = PeftModel.from_pretrained(base, out).eval()(ids).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        auto = AutoPeftModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        torch.testing.assert_close(auto(ids).logits, want, atol=1e-5, rtol=0)


def test_the_former_mode_name_and_more_modules_to_save(tmp_path):
    """`trainable: lora_plus` still trains (it is `longlora` now, and recorded so), and `lora_modules_to_save` adds
    lm_head to the embedding and norms; the adapter merges to the trained model's logits."""
    from longlora_hub.merge import merge_adapter
    from longlora_hub.push import _training_section

    out = tmp_path / "run"
    with pytest.warns(FutureWarning, match="trainable: lora_plus is now called longlora"):
        trainer = run(
            TINY_EXTEND,
            out,
            *short("--max_steps", "1", "--trainable", "lora_plus", "--lora_modules_to_save", "lm_head"),
        )
    assert json.loads((out / "longlora_hub.json").read_text())["trainable"] == "longlora"
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["modules_to_save"] == [
        "embed_tokens",
        "input_layernorm",
        "post_attention_layernorm",
        "norm",
        "lm_head",
    ]
    saved = load_file(out / "adapter_model.safetensors")
    assert any("lm_head" in key for key in saved) and any("embed_tokens" in key for key in saved)

    from transformers import AutoModelForCausalLM

    merged = merge_adapter(out, tmp_path / "merged")
    ids = torch.randint(3, 300, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trainer.model.eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged, trust_remote_code=True).eval()(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert json.loads((merged / "longlora_hub.json").read_text())["trainable"] == "longlora"
    # a run recorded before the rename: its card and its merge name the mode by its current name
    assert "| trainable | longlora |" in _training_section({"trainable": "lora_plus"}, {})


def test_a_merge_records_the_current_name_of_a_former_mode(tmp_path):
    from longlora_hub.merge import merge_adapter
    from longlora_hub.testing import sharded_base_and_adapter

    _, adapter = sharded_base_and_adapter(tmp_path / "pair", num_shards=1)
    (adapter / "longlora_hub.json").write_text(json.dumps({"kind": "adapter", "trainable": "lora_plus"}))
    merged = merge_adapter(adapter, tmp_path / "merged")
    assert json.loads((merged / "longlora_hub.json").read_text())["trainable"] == "longlora"


def test_longqa_stage_masks_the_prompt(tmp_path):
    trainer = run(TINY_LONGQA, tmp_path / "qa", "--max_steps", "2")
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["labels"][0]
    answer = labels[labels != -100]
    # only the completion (" The pass key is N." + EOS) is scored
    text = trainer.processing_class.decode(answer)
    assert "pass key is" in text and "memorize" not in text.lower(), text
    assert text.endswith(trainer.processing_class.eos_token)


def test_resume_reaches_the_same_weights(tmp_path, monkeypatch):
    full = run(TINY_EXTEND, tmp_path / "full", *short("--logging_steps", "1"))

    def interrupt(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt("simulated crash after checkpoint-3")

    monkeypatch.setattr(TokensPerSecondCallback, "on_save", interrupt, raising=False)
    with pytest.raises(KeyboardInterrupt):
        run(TINY_EXTEND, tmp_path / "resumed", *short("--logging_steps", "1"))
    monkeypatch.undo()
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    assert checkpoint.is_dir()
    resumed = run(
        TINY_EXTEND, tmp_path / "resumed", *short("--logging_steps", "1", "--resume_from_checkpoint", str(checkpoint))
    )
    want = load_file(tmp_path / "full" / "adapter_model.safetensors")
    got = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=key)
    assert losses(resumed)[-1] == pytest.approx(losses(full)[-1], abs=1e-4)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (("--trainable", "qlora"), "qlora needs a CUDA GPU"),
        (("--s2_group_size", "2000"), "does not fit max_length"),
        (("--s2_group_size", "7"), "s2_group_size must be an even number of tokens >= 2"),
        (("--stage", "pretrain"), "stage must be one of"),
        (("--max_length", "2048", "--context_length", "1024"), "above context_length"),
        (("--model_name_or_path", "/nonexistent/model"), "Cannot read the model"),
        (("--dataset_name", "builtin:nothing"), "Unknown builtin dataset"),
    ],
)
def test_bad_configuration_fails_before_training(tmp_path, overrides, message):
    if "qlora" in overrides and torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run(TINY_EXTEND, tmp_path / "bad", *overrides)
    assert not list((tmp_path / "bad").glob("checkpoint-*"))


def test_unknown_yaml_key_lists_the_valid_ones(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(Path(TINY_EXTEND).read_text() + "\nlora_rank: 8\n")
    with pytest.raises(SystemExit, match="lora_rank") as error:
        run(str(config), tmp_path / "out")
    assert "lora_r" in str(error.value) and "s2_group_size_ratio" in str(error.value)


def test_data_that_cannot_fill_a_row(tmp_path):
    doc = tmp_path / "short.txt"
    doc.write_text("Only a few words here.")
    with pytest.raises(ValueError, match="not enough for one row of 512"):
        run(TINY_EXTEND, tmp_path / "out", *short("--dataset_name", "", "--data_files", str(doc)))


def test_longqa_examples_longer_than_max_length(tmp_path):
    with pytest.raises(ValueError, match="All 64 examples are longer than max_length=512"):
        run(TINY_LONGQA, tmp_path / "out", *short())


def test_longqa_without_the_needed_fields(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(ValueError, match="instruction/output"):
        run(TINY_LONGQA, tmp_path / "out", *short("--dataset_name", "", "--data_files", str(rows)))


def test_packing_rows_are_exact_and_documents_can_stay_apart():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer = build_tiny_tokenizer()
    docs = load_raw_dataset("builtin:documents", num_builtin_rows=6)
    rows = pack_documents(docs, tokenizer, 200)
    assert len(rows) > 3 and all(len(ids) == 200 for ids in rows["input_ids"])
    flat = [t for ids in rows["input_ids"] for t in ids]
    assert flat.count(tokenizer.eos_token_id) >= 5  # 6 documents joined with EOS (the last may be cut off)
    apart = pack_documents(docs, tokenizer, 200, keep_documents_apart=True)
    assert apart["input_ids"] == rows["input_ids"]
    assert all(sum(lengths) == 200 for lengths in apart["seq_lengths"])
    # the positions TRL's padding-free collator builds from `seq_lengths`
    all_positions = DataCollatorForLanguageModeling.get_position_ids_from_packed_seq_lengths(apart["seq_lengths"])
    for ids, positions in zip(apart["input_ids"], all_positions, strict=True):
        positions = positions.tolist()
        assert positions[0] == 0  # a document cut by the previous row continues here from position 0
        for i in range(1, 200):  # a new document starts right after each EOS
            expected = 0 if ids[i - 1] == tokenizer.eos_token_id else positions[i - 1] + 1
            assert positions[i] == expected
    streamed_apart = list(pack_documents(docs.to_iterable_dataset(), tokenizer, 200, keep_documents_apart=True))
    assert [row["seq_lengths"] for row in streamed_apart] == apart["seq_lengths"]
    streamed = list(pack_documents(docs.to_iterable_dataset(), tokenizer, 200))
    assert [row["input_ids"] for row in streamed] == rows["input_ids"]


def test_prompt_completion_formats():
    from datasets import Dataset

    alpaca = Dataset.from_list([{"instruction": "Read this.", "input": "", "output": "Done."}])
    row = to_prompt_completion(alpaca)[0]
    assert row == {"prompt": "[INST]Read this.[/INST]", "completion": "Done."}
    chat = to_prompt_completion(alpaca, use_chat_template=True)[0]
    assert chat["prompt"][0]["role"] == "user" and chat["completion"][0]["content"] == "Done."
    ready = Dataset.from_list([{"prompt": "p", "completion": "c"}])
    assert to_prompt_completion(ready)[0] == {"prompt": "p", "completion": "c"}
    with pytest.raises(ValueError, match="instruction"):
        to_prompt_completion(alpaca, template="no placeholder")


def test_extend_stage_reads_hub_data_files(hub, tmp_path):
    """`data_files: hf://datasets/...` (globs too) goes through datasets' Hub filesystem, here against the local Hub
    server; a wrong path is a clear error naming the expected form."""
    from huggingface_hub import HfApi

    from longlora_hub.data import load_raw_dataset
    from longlora_hub.synthetic import long_documents

    local = tmp_path / "docs"
    local.mkdir()
    documents = long_documents(6)
    for index, name in enumerate(("a", "b")):
        rows = [{"text": text} for text in documents[index * 3 : index * 3 + 3]]
        (local / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    api = HfApi()
    api.create_repo("me/docs", repo_type="dataset")
    api.upload_folder(folder_path=local, path_in_repo="data", repo_id="me/docs", repo_type="dataset")
    loaded = load_raw_dataset(data_files=["hf://datasets/me/docs/data/*.jsonl"])
    assert sorted(loaded["text"]) == sorted(documents)
    streamed = load_raw_dataset(data_files=["hf://datasets/me/docs/data/a.jsonl"], streaming=True)
    assert [row["text"] for row in streamed] == documents[:3]
    with pytest.raises(ValueError, match="hf://datasets/USER/REPO/PATH"):
        load_raw_dataset(data_files=["hf://datasets/me/docs/missing.jsonl"])

    trainer = run(
        TINY_EXTEND,
        tmp_path / "run",
        *short(
            "--max_steps", "1", "--dataset_name", "", "--data_files", "hf://datasets/me/docs/data/*.jsonl"
        ),  # fmt: skip
    )
    assert trainer.state.global_step == 1


@pytest.mark.gpu
def test_qlora_trains_and_its_adapter_merges_into_the_full_precision_base(tmp_path):
    """qlora: 4-bit NF4 base (bitsandbytes), LoRA + embeddings + norms in full precision; the adapter then merges
    into the unquantized base like any other (the usual QLoRA practice) and loads back."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from longlora_hub.merge import merge_adapter

    trainer = run(
        TINY_EXTEND, tmp_path / "run", *short("--max_steps", "3", "--trainable", "qlora", "--use_cpu", "false")
    )
    assert trainer.state.global_step == 3 and all(torch.isfinite(torch.tensor(losses(trainer))))
    merged = merge_adapter(tmp_path / "run", tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(merged, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(torch.randint(3, 300, (1, 128))).logits
    assert torch.isfinite(logits).all()
