"""What `recipes/sft.py` does with a mistake in its configuration, its data, its checkpoints or its output_dir: a
message that names the fix, before the model is converted or loaded, and never a run of another model than the one
asked for. On the builtin tiny model; the few full runs stop after one or two steps."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import pytest

from longlora_hub.testing import build_tiny_tokenizer
from longlora_hub.training import (
    CONVERSION_RECORD,
    DataArguments,
    LongLoRAArguments,
    ModelArguments,
    build_dataset,
    prepare_base,
    resume_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sft_recipe", ROOT / "recipes" / "sft.py")
sft = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sft)

TINY_EXTEND = ROOT / "recipes" / "configs" / "tiny" / "extend.yaml"
TINY_LONGQA = ROOT / "recipes" / "configs" / "tiny" / "longqa.yaml"
ONE_STEP = ("--max_length", "512", "--context_length", "512", "--max_steps", "1", "--save_steps", "1")


def run(output_dir: Path, *overrides: str, config: Path = TINY_EXTEND, yaml: str = ""):
    if yaml:  # keys appended to the recipe, as a user would write them
        edited = output_dir.parent / f"{output_dir.name}.yaml"
        edited.write_text(config.read_text() + "\n" + yaml + "\n")
        config = edited
    return sft.main(["--config", str(config), "--output_dir", str(output_dir), "--disable_tqdm", "true", *overrides])


def documents(path: Path, count: int = 6) -> Path:
    from longlora_hub.synthetic import long_documents

    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in long_documents(count)))
    return path


# ----------------------------------------------------------------------------------------------------------
# the configuration


@pytest.mark.parametrize(
    "yaml,overrides,error,message",
    [
        ("s2_group_size_ratio: [0.25]", (), ValueError, r"s2_group_size_ratio must be a number, got \[0.25\].*0.25 \("),
        ("lora_r: 8.5", (), ValueError, "lora_r must be a whole number, got 8.5.*lora_r: 8"),
        ("lora_target_modules: {q_proj: 1}", (), ValueError, "lora_target_modules must be a name or a list of names"),
        ("model_revision: 20240101", (), ValueError, 'model_revision must be text.*quote it: model_revision: "2024'),
        ("", ("--max_length", "0"), ValueError, "max_length must be a whole number of tokens, at least 2, got 0"),
        ("", ("--max_length", "-5"), ValueError, "max_length must be a whole number of tokens, at least 2, got -5"),
        ("", ("--lora_r", "8.5"), SystemExit, r"argument --lora_r/--lora-r: invalid int value: '8.5'; see .*--help"),
        ("", ("--lora_rank", "8"), SystemExit, r"Unknown command-line argument: --lora_rank \(did you mean --lora_r\?"),
        ("", ("--lora-dropuot=0.1",), SystemExit, r"--lora_dropuot \(did you mean --lora_dropout\?"),
        ("", ("extra.yaml",), SystemExit, "pass the YAML as --config FILE"),
        ("", ("--resume_from_checkpoint", "true"), ValueError, "holds no checkpoint-N folder to resume from"),
        ("", ("--resume_from_checkpoint", "/no/such/run/checkpoint-9"), ValueError, "no checkpoint folder at /no/such"),
        ("", ("--context_parallel_size", "0"), ValueError, "context_parallel_size must be at least 1, got 0"),
        (
            "s2_attention: false",
            ("--context_parallel_size", "2"),
            ValueError,
            "s2_attention is false.*set s2_attention",
        ),
        (
            "",
            ("--context_parallel_size", "2"),
            ValueError,
            r"must divide the number of processes, 1.*--num_processes 2",
        ),
    ],
)
def test_configuration_errors_name_the_fix_before_anything_is_written(tmp_path, yaml, overrides, error, message):
    out = tmp_path / "run"
    with pytest.raises(error, match=message) as raised:
        run(out, *overrides, yaml=yaml)
    if error is SystemExit and "Unknown" in message:
        assert "Valid keys: " in str(raised.value) and "lora_alpha" in str(raised.value)
    assert not out.exists()  # nothing converted, downloaded or written


@pytest.mark.parametrize(
    "overrides,message",
    [
        (("--max_length", "510"), r"max_length=510 must be a multiple of context_parallel_size=4.*max_length: 508"),
        (("--s2_group_size", "384"), r"128 tokens of a row per process, fewer than half an S² group.*at most 2"),
    ],
)
def test_context_parallel_settings_that_cannot_split_rows(tmp_path, overrides, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        run(out, "--context_parallel_size", "4", "--context_length", "1024", "--max_length", "512", *overrides)
    assert not out.exists()


def test_context_parallel_pads_longqa_rows_to_a_multiple_of_its_size():
    from longlora_hub.training import check_arguments

    args = sft.TrlParser((ModelArguments, LongLoRAArguments, DataArguments, sft.SFTConfig)).parse_yaml_file(TINY_LONGQA)
    model_args, ll_args, data_args, training_args = args
    ll_args.context_parallel_size = 2
    training_args.output_dir = "/nonexistent/run"
    # a single process: the last check (the number of processes) refuses, after the padding was set
    with pytest.raises(ValueError, match="must divide the number of processes"):
        check_arguments(model_args, ll_args, data_args, training_args)
    assert training_args.pad_to_multiple_of == 2
    training_args.pad_to_multiple_of = 3
    with pytest.raises(ValueError, match="pad_to_multiple_of=3 must be a multiple of context_parallel_size=2"):
        check_arguments(model_args, ll_args, data_args, training_args)


def test_a_lone_string_where_a_list_is_expected_is_a_one_item_list(tmp_path):
    """`data_files: docs.jsonl` and `lora_target_modules: q_proj` in YAML, which list fields once took apart
    character by character."""
    data = documents(tmp_path / "docs.jsonl")
    yaml = f"dataset_name: null\ndata_files: {data}\nlora_target_modules: q_proj\n"
    trainer = run(tmp_path / "run", *ONE_STEP, yaml=yaml)
    assert trainer.state.global_step == 1
    assert trainer.model.peft_config["default"].target_modules == {"q_proj"}
    assert json.loads((tmp_path / "run" / "longlora_hub.json").read_text())["data"] == ["docs.jsonl"]


def test_command_line_errors_are_one_line_and_exit_status_1(tmp_path):
    """`python recipes/sft.py`: no traceback and no 9 kB usage text in front of the one line that matters."""
    for flags, message in (
        (["--max_length", "0"], "error: max_length must be a whole number of tokens, at least 2, got 0"),
        (["--lora_r", "8.5"], "argument --lora_r/--lora-r: invalid int value: '8.5'"),
    ):
        command = [sys.executable, str(ROOT / "recipes" / "sft.py"), "--config", str(TINY_EXTEND), *flags]
        command += ["--output_dir", str(tmp_path / "run")]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 1, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and "usage:" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------------
# the data


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"text": "one"}\n{"text": "two"}\n{"text": "three\n', r"bad.jsonl, line 3: not valid JSON \(.* at column"),
        ('{"text": "one"}\n\n{"text": "two"} {"text": "three"}\n', r"bad.jsonl, line 3: not valid JSON \(Extra data"),
        ('["one", "two"]\n', "bad.jsonl, line 1: a JSON array, not an object"),
        ('{"text": "one"}\nnull\n', "bad.jsonl, line 2: a JSON null, not an object"),
        ('{"text": "one"}\n"two"\n', "bad.jsonl, line 2: a JSON string, not an object"),
        ("", r"bad.jsonl holds no rows \(it is empty\); remove it from data_files"),
        ("\n  \n", r"bad.jsonl holds no rows \(it is empty\)"),
        (b"\xff\xfe\x00{", "bad.jsonl.*not valid JSON"),
        ('[\n  {"text": "one"},\n  {"text": "two",}\n]\n', r"bad.jsonl, line 3: not valid JSON \(Expecting"),
        ('[\n  {"text": "one"},\n  7\n]\n', "bad.jsonl: item 1 of the list is a JSON number, not an object"),
    ],
)
def test_bad_data_files_are_named_before_the_model_is_converted(tmp_path, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    good = documents(tmp_path / "good.jsonl")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        run(out, *ONE_STEP, "--dataset_name", "", "--data_files", str(good), str(bad))
    assert not (out / "base").exists()  # found before the conversion and the model load


def test_an_empty_data_file_in_the_longqa_stage(tmp_path):
    empty = tmp_path / "qa.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"qa.jsonl holds no rows \(it is empty\)"):
        run(tmp_path / "run", "--dataset_name", "", "--data_files", str(empty), config=TINY_LONGQA)


def test_data_spread_over_lines_as_one_json_document_still_loads(tmp_path):
    """What datasets accepts stays accepted: a pretty-printed list of rows, blank lines between rows."""
    from longlora_hub.data import check_json_rows, load_raw_dataset

    listed = tmp_path / "rows.json"
    listed.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=2))
    spaced = tmp_path / "spaced.jsonl"
    spaced.write_text('{"text": "c"}\n\n{"text": "d"}\n')
    assert check_json_rows(listed) == 2 and check_json_rows(spaced) == 2
    assert load_raw_dataset(data_files=str(spaced))["text"] == ["c", "d"]


def test_an_s2_group_above_every_example_warns(capsys):
    """longqa rows are padded to the longest example of their batch, not to max_length: a fixed group size above
    every example makes each row one group, where S²-Attn saves nothing."""
    tokenizer = build_tiny_tokenizer()
    data = DataArguments(dataset_name="builtin:passkey", builtin_rows=8)
    build_dataset(data, LongLoRAArguments(stage="longqa", s2_group_size=1024), tokenizer, 1024)
    said = capsys.readouterr()
    assert "[longlora-hub] warning: s2_group_size=1024 is above the longest example" in said.err and not said.out
    build_dataset(data, LongLoRAArguments(stage="longqa"), tokenizer, 1024)
    build_dataset(data, LongLoRAArguments(stage="longqa", s2_group_size=1024, s2_attention=False), tokenizer, 1024)
    assert "warning" not in capsys.readouterr().err


@pytest.fixture
def restored_verbosity():
    """The package's log level and the warning filters as they were before the test."""
    from longlora_hub import log

    level = log.get_verbosity()
    with warnings.catch_warnings():
        yield
    log.set_verbosity(level)


@pytest.mark.parametrize("rank,printed", [(None, True), ("0", True), ("1", False), ("7", False)])
def test_only_the_main_process_prints_the_runs_messages(rank, printed, monkeypatch, capsys, restored_verbosity):
    """Every process of a run reads the same data: the others would repeat the main one's messages and warnings (and
    the warnings of renamed keys), so they print errors only."""
    from longlora_hub.training import set_process_verbosity

    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    warnings.simplefilter("always", FutureWarning)  # every time, unless the replicas' filter (put first) drops it
    set_process_verbosity()
    tokenizer = build_tiny_tokenizer()
    data = DataArguments(dataset_name="builtin:passkey", builtin_rows=8)
    build_dataset(data, LongLoRAArguments(stage="longqa", s2_group_size=1024), tokenizer, 1024)
    with warnings.catch_warnings(record=True) as caught:
        LongLoRAArguments(trainable="lora_plus")
    said = capsys.readouterr().err
    assert ("s2_group_size=1024 is above the longest example" in said) == printed
    assert bool([w for w in caught if issubclass(w.category, FutureWarning)]) == printed


def test_log_level_sets_the_main_processs_messages(monkeypatch, capsys, restored_verbosity):
    monkeypatch.delenv("RANK", raising=False)
    tokenizer = build_tiny_tokenizer()
    data = DataArguments(dataset_name="builtin:passkey", builtin_rows=8)
    args = sft.TrlParser((ModelArguments, LongLoRAArguments, DataArguments, sft.SFTConfig)).parse_args_and_config(
        ["--config", str(TINY_LONGQA), "--log_level", "error"]
    )
    sft.set_process_verbosity(args[3])
    build_dataset(data, LongLoRAArguments(stage="longqa", s2_group_size=1024), tokenizer, 1024)
    assert "[longlora-hub]" not in capsys.readouterr().err  # the warning is below log_level: error


# ----------------------------------------------------------------------------------------------------------
# TRL's names for the same settings, and the former names


def parse_config(*flags: str, yaml: str = "", tmp_path: Path | None = None):
    config = TINY_EXTEND
    if yaml:
        config = tmp_path / "edited.yaml"
        config.write_text(TINY_EXTEND.read_text() + "\n" + yaml + "\n")
    parser = sft.TrlParser((ModelArguments, LongLoRAArguments, DataArguments, sft.SFTConfig), exit_on_error=False)
    return sft.parse(parser, ["--config", str(config), "--output_dir", "/nonexistent/run", *flags])


def test_the_recipe_takes_trls_names_where_they_fit():
    """The keys TRL's ModelConfig and ScriptArguments share with the recipe have TRL's names, so a TRL user's keys
    work as they are (trust_remote_code is SFTConfig's own field)."""
    import dataclasses

    from trl import ModelConfig, ScriptArguments

    shared = {
        "model_name_or_path",
        "model_revision",
        "dtype",
        "attn_implementation",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
        "lora_modules_to_save",
        "dataset_name",
        "dataset_config",
        "dataset_train_split",
        "dataset_streaming",
    }
    trl_names = {field.name for kind in (ModelConfig, ScriptArguments) for field in dataclasses.fields(kind)}
    assert shared <= trl_names
    parser = sft.TrlParser((ModelArguments, LongLoRAArguments, DataArguments, sft.SFTConfig))
    keys = {action.dest for action in parser._actions}
    assert shared | {"trust_remote_code"} <= keys
    ours = {field.name for kind in (ModelArguments, LongLoRAArguments, DataArguments) for field in fields(kind)}
    assert shared <= ours and "trust_remote_code" in {field.name for field in fields(sft.SFTConfig)}


@pytest.mark.parametrize(
    "flags,yaml",
    [
        (("--dataset_split", "validation", "--streaming", "true"), ""),
        ((), "dataset_split: validation\nstreaming: true"),
        (("--dataset_split", "validation", "--dataset_train_split", "validation", "--streaming", "true"), ""),
    ],
)
def test_former_keys_still_work_with_a_warning_naming_the_new_one(tmp_path, flags, yaml):
    with pytest.warns(FutureWarning) as caught:
        _, _, data_args, _ = parse_config(*flags, yaml=yaml, tmp_path=tmp_path)
    messages = " ".join(str(warning.message) for warning in caught)
    assert "dataset_split is now called dataset_train_split" in messages and "write dataset_train_split" in messages
    assert "streaming is now called dataset_streaming" in messages and "dataset_streaming: true" in messages
    assert (data_args.dataset_train_split, data_args.dataset_streaming) == ("validation", True)
    assert data_args.dataset_split is None and data_args.streaming is None  # each setting held once


def test_the_new_keys_default_like_the_former_ones():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        _, ll_args, data_args, _ = parse_config()
        assert (data_args.dataset_train_split, data_args.dataset_streaming) == ("train", False)
        assert ll_args.trainable == "longlora" and ll_args.lora_modules_to_save is None
        assert DataArguments().dataset_train_split == "train" and DataArguments().dataset_streaming is False


@pytest.mark.parametrize(
    "flags,message",
    [
        (("--dataset_split", "validation", "--dataset_train_split", "test"), "dataset_split='validation' and data"),
        (("--streaming", "true", "--dataset_streaming", "false"), "streaming=True and dataset_streaming=False disag"),
    ],
)
def test_a_former_key_and_its_new_name_that_disagree_are_an_error(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path / "run", *flags)
    assert not (tmp_path / "run").exists()


def test_unknown_keys_list_the_new_names_not_the_former_ones(tmp_path):
    with pytest.raises(SystemExit) as raised:
        run(tmp_path / "run", "--dataset_trainsplit", "train")
    text = str(raised.value)
    assert "did you mean --dataset_train_split?" in text
    valid = text.split("Valid keys: ")[1].split(", ")
    assert {"dataset_train_split", "dataset_streaming", "lora_modules_to_save"} <= set(valid)
    assert not {"dataset_split", "streaming"} & set(valid)


def test_lora_modules_to_save_adds_to_what_trainable_implies():
    from peft import get_peft_model

    from longlora_hub.testing import tiny_llama
    from longlora_hub.training import peft_config

    extra = LongLoRAArguments(lora_modules_to_save=["lm_head", "norm"])
    norms = ["input_layernorm", "post_attention_layernorm", "norm"]
    assert peft_config(extra).modules_to_save == ["embed_tokens", *norms, "lm_head"]
    assert peft_config(LongLoRAArguments(trainable="lora", lora_modules_to_save=["lm_head"])).modules_to_save == [
        "lm_head"
    ]
    assert peft_config(LongLoRAArguments(trainable="lora")).modules_to_save is None
    model = get_peft_model(tiny_llama(tie_word_embeddings=False), peft_config(extra))
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert any("lm_head.modules_to_save" in name for name in trained)
    assert any("embed_tokens.modules_to_save" in name for name in trained)


def test_lora_modules_to_save_with_full_fine_tuning_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"lora_modules_to_save \(lm_head\) adds modules .*trainable: full"):
        run(tmp_path / "run", "--trainable", "full", "--lora_modules_to_save", "lm_head")
    assert not (tmp_path / "run").exists()


def test_lora_plus_is_the_former_name_of_longlora(tmp_path):
    from longlora_hub.trainable import lora_config

    with pytest.warns(FutureWarning, match="trainable: lora_plus is now called longlora.*write trainable: longlora"):
        ll_args = parse_config("--trainable", "lora_plus")[1]
    assert ll_args.trainable == "longlora"
    with pytest.warns(FutureWarning, match="now called longlora"):
        former = lora_config("lora_plus")
    assert former.to_dict() == lora_config("longlora").to_dict()
    with pytest.raises(ValueError, match=r"trainable must be one of \('longlora', 'lora', 'full', 'qlora'\)"):
        LongLoRAArguments(trainable="lora+")


# ----------------------------------------------------------------------------------------------------------
# checkpoints


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("checkpointed") / "run"
    run(out, *ONE_STEP, "--max_steps", "2", "--save_total_limit", "3")
    assert (out / "checkpoint-1").is_dir() and (out / "checkpoint-2").is_dir()
    return out


def cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda c: cut(c / "adapter_model.safetensors"), r"adapter_model.safetensors is cut short \(\d+ bytes of the"),
        (lambda c: cut(c / "optimizer.pt"), "optimizer.pt is cut short"),
        (lambda c: cut(c / "scheduler.pt"), "scheduler.pt is cut short"),
        (lambda c: (c / "rng_state.pth").write_bytes(b""), r"rng_state.pth is empty \(0 bytes\)"),
        (lambda c: cut(c / "trainer_state.json"), "trainer_state.json is not valid JSON"),
        (lambda c: (c / "trainer_state.json").unlink(), "it has no trainer_state.json"),
    ],
)
@pytest.mark.parametrize("how", ["true", "path"])
def test_a_damaged_checkpoint_names_the_file_and_the_last_intact_one(two_checkpoints, tmp_path, damage, message, how):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out, symlinks=True)
    damage(out / "checkpoint-2")
    resume = "true" if how == "true" else str(out / "checkpoint-2")
    with pytest.raises(ValueError, match=f"Cannot resume from {re.escape(str(out))}/checkpoint-2: {message}") as raised:
        run(out, *ONE_STEP, "--max_steps", "3", "--resume_from_checkpoint", resume)
    assert f"resume from {out / 'checkpoint-1'}, the last intact checkpoint" in str(raised.value)


def test_no_intact_checkpoint_left(two_checkpoints, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out, symlinks=True)
    cut(out / "checkpoint-1" / "optimizer.pt")
    cut(out / "checkpoint-2" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="no earlier checkpoint of this run is intact: start a new run"):
        run(out, *ONE_STEP, "--max_steps", "3", "--resume_from_checkpoint", "true")


def test_resume_from_checkpoint_true_on_the_command_line(two_checkpoints, tmp_path):
    """HfArgumentParser types resume_from_checkpoint as a path, so the flag's `true` arrived as the folder "true";
    it now means the last checkpoint, as `resume_from_checkpoint: true` does in YAML."""
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out, symlinks=True)
    state = out / "checkpoint-2" / "trainer_state.json"
    marked = json.loads(state.read_text()) | {"num_input_tokens_seen": 10**6}  # shows the state came from there
    state.write_text(json.dumps(marked))
    trainer = run(out, *ONE_STEP, "--max_steps", "3", "--resume_from_checkpoint", "true")
    assert trainer.args.resume_from_checkpoint == str(out / "checkpoint-2")
    assert trainer.state.global_step == 3 and trainer.state.num_input_tokens_seen == 10**6 + 512  # one step more


def test_resume_values_as_yaml_and_the_command_line_give_them(two_checkpoints):
    assert resume_checkpoint("false", two_checkpoints) is None and resume_checkpoint(False, two_checkpoints) is None
    assert resume_checkpoint(None, two_checkpoints) is None
    last = str(two_checkpoints / "checkpoint-2")
    assert resume_checkpoint(True, two_checkpoints) == resume_checkpoint(" TRUE ", two_checkpoints) == last
    first = str(two_checkpoints / "checkpoint-1")
    assert resume_checkpoint(first, "elsewhere") == first


# ----------------------------------------------------------------------------------------------------------
# a reused output_dir


def test_a_reused_output_dir_never_trains_another_model(two_checkpoints, tmp_path):
    """A second run in the folder of a first one, with another context or another model: refused, and the first
    run's base (which its adapter and checkpoints name) left as it was."""
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out, symlinks=True)
    before = {path.name: path.read_bytes() for path in (out / "base").iterdir()}
    changes = [
        (("--max_length", "384", "--context_length", "384"), "context_length 512 -> 384"),
        (("--model_name_or_path", "builtin:tiny-llama-3m"), "model_name_or_path 'builtin:tiny-llama' -> 'builtin:t"),
        (("--rope_type", "yarn"), "rope_type 'linear' -> 'yarn'"),
        (("--s2_group_size", "64"), "s2_group_size None -> 64"),
    ]
    for flags, change in changes:
        with pytest.raises(ValueError, match=f"was converted for other settings \\({change}") as raised:
            run(out, *ONE_STEP, *flags)
        assert f"the run in {out} (adapter_config.json, " in str(raised.value)
        assert "Pass another output_dir; or, to resume that run, give its settings back" in str(raised.value)
        assert {path.name: path.read_bytes() for path in (out / "base").iterdir()} == before
    assert run(out, *ONE_STEP).state.global_step == 1  # the same settings again: the base is reused


def first_base(folder: Path, context: int = 512, model: str = "builtin:tiny-llama") -> Path:
    args = ModelArguments(model_name_or_path=model, context_length=context)
    return prepare_base(args, LongLoRAArguments(), str(folder), context)


def base_config(base: Path) -> dict:
    return json.loads((base / "config.json").read_text())


def test_a_base_nothing_depends_on_is_converted_again(tmp_path):
    """Only a previous conversion in base/ and no run beside it: rebuilt for the new settings, through the links
    and never the weights they point to."""
    out = tmp_path / "run"
    base = first_base(out)
    source = (base / "model.safetensors").resolve()
    weights = source.read_bytes()
    again = first_base(out, 384)
    assert again == base and base_config(base)["max_position_embeddings"] == 384
    assert base_config(base)["rope_parameters"]["factor"] == 1.5
    assert source.read_bytes() == weights and (base / "model.safetensors").resolve() == source
    assert json.loads((base / CONVERSION_RECORD).read_text())["context_length"] == 384

    other = first_base(out, 384, "builtin:tiny-llama-3m")  # another model: its own weights, not the first one's
    assert base_config(other)["hidden_size"] == 256 and (base / "model.safetensors").resolve() != source
    assert source.read_bytes() == weights

    model = tmp_path / "my-llama"
    shutil.copytree(source.parent, model)
    first_base(out, 384, str(model))
    assert (base / "model.safetensors").resolve() == (model / "model.safetensors").resolve()
    assert first_base(out, 384, f"{tmp_path}/./my-llama") == base  # the same folder by another name: reused
    assert (model / "model.safetensors").read_bytes() == weights


def test_a_base_with_files_of_the_users_is_not_removed(tmp_path):
    out = tmp_path / "run"
    base = first_base(out)
    (base / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds what a conversion does not write \(notes.txt\)"):
        first_base(out, 384)
    (base / "notes.txt").unlink()
    link = base / "model.safetensors"
    target = link.resolve()
    link.unlink()
    shutil.copyfile(target, link)  # real weights, not a link: someone's copy
    with pytest.raises(ValueError, match=r"holds what a conversion does not write \(model.safetensors\)"):
        first_base(out, 384)
    assert link.is_file() and not link.is_symlink() and base_config(base)["max_position_embeddings"] == 512


def test_a_base_that_does_not_record_its_source_is_not_trusted(tmp_path):
    """A base an older longlora-hub made (or an interrupted conversion): rebuilt when nothing depends on it,
    refused under a run, with the way out named."""
    out = tmp_path / "run"
    base = first_base(out)
    (base / CONVERSION_RECORD).unlink()
    (out / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="does not record what it was converted from.*delete .*base to have it"):
        first_base(out)
    (out / "adapter_config.json").unlink()
    assert first_base(out) == base and (base / CONVERSION_RECORD).is_file()
