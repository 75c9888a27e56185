"""Checkpoint conversion (longlora_hub.convert) and the `longlora-hub convert` command."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaForCausalLM

from longlora_hub import convert as convert_module
from longlora_hub.cli import main
from longlora_hub.convert import convert_checkpoint, remote_code_files
from longlora_hub.remote_code.modeling_llama_longlora import LlamaLongLoRAForCausalLM
from longlora_hub.testing import build_tiny_tokenizer, tiny_llama

BASE_CONTEXT = 256  # tiny_llama's max_position_embeddings


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    """A stock Llama checkpoint: weights, tokenizer, generation config, plus a README and a LICENSE."""
    folder = tmp_path_factory.mktemp("base") / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    (folder / "README.md").write_text("# tiny llama\n")
    (folder / "LICENSE").write_text("Apache-2.0\n")
    (folder / "training_args.bin").write_bytes(b"not a model")
    return folder


@pytest.fixture
def base(base_checkpoint, tmp_path) -> Path:
    """A private copy, so a test may edit it."""
    return Path(shutil.copytree(base_checkpoint, tmp_path / "base"))


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def same_bytes(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# what a conversion writes


def test_convert_writes_a_longlora_checkpoint(base, tmp_path):
    out = convert_checkpoint(base, tmp_path / "out", 1024, group_size_ratio=0.5)
    assert out == tmp_path / "out"
    config = read_config(out)
    assert config["model_type"] == "llama_longlora"
    assert config["architectures"] == ["LlamaLongLoRAForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_llama_longlora.LlamaLongLoRAForCausalLM"
    assert config["auto_map"]["AutoConfig"] == "configuration_llama_longlora.LlamaLongLoRAConfig"
    assert config["max_position_embeddings"] == 1024
    assert config["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    assert config["rope_scaling"]["factor"] == 4.0 and config["rope_scaling"]["type"] == "linear"  # 4.x readers
    assert config["rope_theta"] == 10000.0
    assert (config["s2_group_size_ratio"], config["s2_group_size"], config["s2_attention"]) == (0.5, None, True)
    # the architecture itself is unchanged
    base_config = read_config(base)
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size", "rms_norm_eps"):
        assert config[key] == base_config[key]

    for source in remote_code_files():
        assert same_bytes(source, out / source.name)
    assert {path.name for path in remote_code_files()} == {
        "configuration_llama_longlora.py",
        "modeling_llama_longlora.py",
        "s2_attention.py",
    }
    copied = ["model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    for name in [*copied, "README.md", "LICENSE"]:
        assert same_bytes(base / name, out / name), name
    assert not (out / "training_args.bin").exists()
    assert not (out / "__init__.py").exists()
    # nothing left next to the output, and the base is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"]
    assert read_config(base) == base_config


def test_converted_checkpoint_matches_stock_llama_with_the_same_pi(base, tmp_path):
    out = convert_checkpoint(base, tmp_path / "out", 1024)
    rope = read_config(out)["rope_parameters"]
    longlora = LlamaLongLoRAForCausalLM.from_pretrained(out).eval()
    stock = LlamaForCausalLM.from_pretrained(base, rope_parameters=dict(rope), max_position_embeddings=1024).eval()
    unscaled = LlamaForCausalLM.from_pretrained(base).eval()
    assert longlora.config.rope_parameters["factor"] == 4.0
    input_ids = torch.randint(3, 384, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = longlora(input_ids).logits
        torch.testing.assert_close(logits, stock(input_ids).logits, atol=1e-5, rtol=0)
        # the PI is really in effect: the unscaled base gives other logits
        assert not torch.allclose(logits, unscaled(input_ids).logits, atol=1e-3)


def test_sharded_checkpoint(tmp_path):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base, max_shard_size="200KB")
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 1 and (base / "model.safetensors.index.json").exists()
    out = convert_checkpoint(base, tmp_path / "out", 512)
    for name in [*shards, "model.safetensors.index.json"]:
        assert same_bytes(base / name, out / name)
    model = LlamaLongLoRAForCausalLM.from_pretrained(out)
    reference = LlamaForCausalLM.from_pretrained(base)
    for (name, param), (_, expected) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(param, expected), name


def test_legacy_4x_base_config(base, tmp_path):
    # a 4.x-era checkpoint already extended to 512 with factor 2: `rope_scaling` + `rope_theta`, no `rope_parameters`
    config = read_config(base)
    del config["rope_parameters"]
    config.update(max_position_embeddings=512, rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=20000.0)
    (base / "config.json").write_text(json.dumps(config))
    out = convert_checkpoint(base, tmp_path / "out", 2048)
    written = read_config(out)
    assert written["rope_parameters"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 20000.0}
    assert written["rope_scaling"]["factor"] == 8.0  # the old factor 2 must not survive next to the new one
    assert LlamaLongLoRAForCausalLM.from_pretrained(out).config.rope_parameters["factor"] == 8.0


def test_converting_a_converted_checkpoint_multiplies_the_factor(base, tmp_path):
    first = convert_checkpoint(base, tmp_path / "x4", 1024, group_size=64)
    config = read_config(first)
    config["s2_shift"] = "roll"  # a setting of the converted checkpoint that a second conversion keeps
    (first / "config.json").write_text(json.dumps(config))
    second = convert_checkpoint(first, tmp_path / "x16", 4096)
    written = read_config(second)
    assert written["rope_parameters"]["factor"] == 16.0
    assert written["max_position_embeddings"] == 4096
    assert written["s2_shift"] == "roll"
    assert (written["s2_group_size"], written["s2_group_size_ratio"]) == (None, 0.25)
    assert same_bytes(base / "model.safetensors", second / "model.safetensors")


@pytest.mark.parametrize(("rope_type", "max_positions"), [("yarn", 1024), ("dynamic", BASE_CONTEXT)])
def test_other_rope_types(base, tmp_path, rope_type, max_positions):
    out = convert_checkpoint(base, tmp_path / "out", 1024, rope_type=rope_type)
    config = read_config(out)
    assert config["rope_parameters"]["rope_type"] == rope_type
    assert config["rope_parameters"]["factor"] == 4.0
    assert config["max_position_embeddings"] == max_positions
    model = LlamaLongLoRAForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(3, 67)[None]).logits).all()


def test_empty_output_folder_is_accepted(base, tmp_path):
    (tmp_path / "out").mkdir()
    convert_checkpoint(base, tmp_path / "out", 512)
    assert read_config(tmp_path / "out")["rope_parameters"]["factor"] == 2.0


# ---------------------------------------------------------------------------------------------------------------
# the weights are copied, never loaded


def test_weights_are_never_loaded(base, tmp_path, monkeypatch):
    import safetensors
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("convert loaded a weights file")

    for module, name in [(safetensors.torch, "load_file"), (safetensors.torch, "load"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    corrupt = b"\x00\xffnot a safetensors file" * 100  # loading it would fail; copying must not care
    (base / "model.safetensors").write_bytes(corrupt)
    (base / "pytorch_model.bin").write_bytes(corrupt[::-1])
    out = convert_checkpoint(base, tmp_path / "out", 512)
    assert (out / "model.safetensors").read_bytes() == corrupt
    assert (out / "pytorch_model.bin").read_bytes() == corrupt[::-1]


def test_a_failure_leaves_nothing_behind(base, tmp_path, monkeypatch):
    real_copy = shutil.copyfile

    def failing_copy(source, target, *args, **kwargs):
        if Path(source).name == "model.safetensors":
            raise OSError("disk full")
        return real_copy(source, target, *args, **kwargs)

    monkeypatch.setattr(convert_module.shutil, "copyfile", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(base, tmp_path / "out", 512)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


# ---------------------------------------------------------------------------------------------------------------
# bad inputs


def set_config(folder: Path, **changes) -> None:
    (folder / "config.json").write_text(json.dumps(read_config(folder) | changes))


def test_non_llama_model_type(base, tmp_path):
    set_config(base, model_type="mistral")
    with pytest.raises(ValueError, match=r"model_type 'mistral'.*only Llama-family"):
        convert_checkpoint(base, tmp_path / "out", 1024)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("context_length", [BASE_CONTEXT, 128])
def test_context_not_above_the_current_one(base, tmp_path, context_length):
    with pytest.raises(ValueError, match=f"Nothing to extend.*covers {BASE_CONTEXT} tokens"):
        convert_checkpoint(base, tmp_path / "out", context_length)


@pytest.mark.parametrize("ratio", [0.0, -0.25, 1.5])
def test_bad_group_size_ratio(base, tmp_path, ratio):
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        convert_checkpoint(base, tmp_path / "out", 1024, group_size_ratio=ratio)


@pytest.mark.parametrize("group_size", [0, 63, -64, 1])
def test_bad_group_size(base, tmp_path, group_size):
    with pytest.raises(ValueError, match="even number of tokens >= 2"):
        convert_checkpoint(base, tmp_path / "out", 1024, group_size=group_size)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="No folder at"):
        convert_checkpoint(tmp_path / "missing", tmp_path / "out", 1024)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No config.json"):
        convert_checkpoint(tmp_path / "empty", tmp_path / "out", 1024)


def test_missing_weights(base, tmp_path):
    (base / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="No weights"):
        convert_checkpoint(base, tmp_path / "out", 1024)


def test_existing_output_is_refused_and_kept(base, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        convert_checkpoint(base, out, 1024)
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "user data"


def test_output_is_base(base):
    with pytest.raises(ValueError, match="output folder is the base"):
        convert_checkpoint(base, base / ".." / base.name, 1024)


def test_hub_id_downloads_only_what_is_copied(base, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(base)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    out = convert_checkpoint("someone/tiny-llama", tmp_path / "out", 512)
    assert read_config(out)["rope_parameters"]["factor"] == 2.0
    [(repo_id, kwargs)] = calls
    assert repo_id == "someone/tiny-llama"
    patterns = kwargs["allow_patterns"]
    assert {"config.json", "*.safetensors", "tokenizer.json", "generation_config.json"} <= set(patterns)


def test_unreachable_hub_id(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match=r"not a local folder and could not be downloaded.*no network"):
        convert_checkpoint("someone/tiny-llama", tmp_path / "out", 512)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# the command line


def test_cli_convert(base, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["convert", str(base), str(out), "--context-length", "1000", "--ceil", "--group-size", "128"]
    )
    assert result.exit_code == 0, result.output
    assert "factor 4" in result.output
    assert "1000 tokens" in result.output
    assert "128 tokens" in result.output
    assert str(out) in result.output
    config = read_config(out)
    assert config["rope_parameters"]["factor"] == 4.0  # ceil(1000 / 256)
    assert config["max_position_embeddings"] == 1024
    assert config["s2_group_size"] == 128


def test_cli_rope_type_and_ratio(base, tmp_path):
    out = tmp_path / "out"
    args = ["convert", str(base), str(out), "--context-length", "512", "--rope-type", "yarn", "--group-size-ratio", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "yarn RoPE, factor 2" in result.output
    config = read_config(out)
    assert config["rope_parameters"]["original_max_position_embeddings"] == BASE_CONTEXT
    assert config["s2_group_size_ratio"] == 1.0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--context-length", "128"], "Nothing to extend"),
        (["--context-length", "1024", "--group-size", "7"], "even number of tokens"),
        (["--context-length", "1024", "--group-size-ratio", "2"], "ratio must be in"),
    ],
)
def test_cli_errors_are_clean(base, tmp_path, extra, message):
    result = CliRunner().invoke(main, ["convert", str(base), str(tmp_path / "out"), *extra])
    assert result.exit_code == 1
    assert f"Error: {message}" in result.output or message in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_cli_refuses_existing_output(base, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    result = CliRunner().invoke(main, ["convert", str(base), str(tmp_path / "out"), "--context-length", "1024"])
    assert result.exit_code == 1
    assert "already exists and is not empty" in result.output


def test_cli_help_lists_the_options():
    result = CliRunner().invoke(main, ["convert", "--help"])
    assert result.exit_code == 0
    for option in ("--context-length", "--group-size-ratio", "--group-size", "--rope-type", "--ceil"):
        assert option in result.output
    assert "linear|yarn|dynamic" in result.output
