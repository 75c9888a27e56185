"""Checkpoint conversion (longlora_hub.convert) and the `longlora-hub convert` command."""

import json
import re
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaForCausalLM

from longlora_hub import convert as convert_module
from longlora_hub.cli import main
from longlora_hub.convert import convert_checkpoint, remote_code_files, resolve_checkpoint
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
        "s2_context_parallel.py",
        "s2_cpu_flash.py",
        "s2_dense.py",
        "s2_flash.py",
        "s2_flex.py",
        "s2_layout.py",
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


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_weights_are_never_loaded(base, tmp_path, monkeypatch, weights):
    import safetensors
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("convert loaded a weights file")

    for module, name in [(safetensors.torch, "load_file"), (safetensors.torch, "load"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    corrupt = b"\x00\xffnot a weights file" * 100  # loading it would fail; copying must not care
    (base / "model.safetensors").unlink()
    (base / weights).write_bytes(corrupt)
    out = convert_checkpoint(base, tmp_path / "out", 512)
    assert (out / weights).read_bytes() == corrupt


def test_a_folder_with_both_formats_gives_only_safetensors(base, tmp_path):
    """transformers reads the safetensors of a folder that has both; a `.bin` copy would only cost disk."""
    (base / "pytorch_model.bin").write_bytes(b"a pickled copy of the same weights")
    out = convert_checkpoint(base, tmp_path / "out", 512)
    assert same_bytes(base / "model.safetensors", out / "model.safetensors")
    assert not list(out.glob("*.bin"))


def test_an_index_naming_a_missing_shard_is_refused(tmp_path):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base, max_shard_size="200KB")
    shards = sorted(base.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=rf"index.json names 1 weight files .*{shards[-1].name}.*complete"):
        convert_checkpoint(base, tmp_path / "out", 512)
    assert not (tmp_path / "out").exists()


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


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ('["a", "list"]', r"config\.json holds a JSON list, not an object.*restore it from the original checkpoint"),
        ('"llama"', r"config\.json holds a JSON str, not an object"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 0}}, r"RoPE factor must be a positive number .*got 0"),
        ({"rope_scaling": {"type": "linear", "factor": -2.0}}, r"RoPE factor must be a positive number .*got -2\.0"),
        ({"rope_parameters": "linear"}, r"rope_parameters must be an object such as .*got 'linear'"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, r"rope_theta must be a positive number"),
    ],
)
def test_invalid_configs_are_clean_errors(base, tmp_path, change, message):
    (base / "config.json").write_text(change if isinstance(change, str) else json.dumps(read_config(base) | change))
    with pytest.raises(ValueError, match=message):
        convert_checkpoint(base, tmp_path / "out", 1024)
    result = CliRunner().invoke(main, ["convert", str(base), str(tmp_path / "out"), "--context-length", "1024"])
    assert result.exit_code == 1 and re.search(message, result.output), result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


# ---------------------------------------------------------------------------------------------------------------
# what an interrupted conversion leaves, and the next one removes

# a conversion that kills itself with SIGNAL while copying the weights: `python -c KILLED SIGNAL ARGS...`
KILLED = """
import os, shutil, signal, sys
copy = shutil.copyfile
def dying_copy(source, target, *args, **kwargs):
    if str(source).endswith(".safetensors"):
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return copy(source, target, *args, **kwargs)
shutil.copyfile = dying_copy
from longlora_hub.cli import main
main(sys.argv[2:])
"""


def _interrupted_convert(base: Path, output: Path, signal_name: str) -> int:
    args = ["convert", str(base), str(output), "--context-length", "1024"]
    return subprocess.run([sys.executable, "-c", KILLED, signal_name, *args], capture_output=True).returncode


def _staging(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f".{output.name}.*.partial"))


def test_a_rerun_removes_what_a_killed_conversion_left(base, tmp_path):
    output = tmp_path / "out"
    assert _interrupted_convert(base, output, "SIGKILL") == -9
    (left,) = _staging(output)
    assert not output.exists()
    result = CliRunner().invoke(main, ["convert", str(base), str(output), "--context-length", "1024"])
    assert result.exit_code == 0, result.output
    assert f"removed {left}, left by an interrupted run (process" in result.output
    assert _staging(output) == [] and (output / "model.safetensors").is_file()
    assert not (output / convert_module.STAGING_OWNER_FILE).exists()  # the writer's record stays out of the output


def test_sigterm_during_a_conversion_leaves_nothing(base, tmp_path):
    output = tmp_path / "out"
    assert _interrupted_convert(base, output, "SIGTERM") == 128 + 15  # exited through its cleanup, not killed
    assert _staging(output) == [] and not output.exists()


def test_only_stale_staging_folders_of_the_same_output_are_removed(base, tmp_path, capsys):
    import os
    import time

    output = tmp_path / "out"

    def staging(name: str, record: dict | None, hours_old: float = 0.0) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half a model")
        (folder / "weights-link").symlink_to(base / "model.safetensors")  # a linked base must survive
        if record is not None:
            (folder / convert_module.STAGING_OWNER_FILE).write_text(json.dumps(record))
        when = time.time() - hours_old * 3600
        for path in (folder / "model.safetensors", folder / convert_module.STAGING_OWNER_FILE, folder):
            if path.exists():
                os.utime(path, (when, when))
        os.utime(folder / "weights-link", (when, when), follow_symlinks=False)
        return folder

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    this_process = convert_module._writer_record()
    dead = staging(".out.0123456789ab.partial", this_process | {"pid": ended.pid})
    live = staging(".out.0123456789ac.partial", this_process)  # a run still writing: this very process
    recycled = staging(".out.0123456789ad.partial", this_process | {"started": -1})  # same PID, another process
    elsewhere = staging(".out.0123456789ae.partial", this_process | {"host": "another-machine"}, hours_old=2)
    unrecorded_old = staging(".out.0123456789af.partial", None, hours_old=25)
    unrecorded_new = staging(".out.0123456789b0.partial", None, hours_old=1)
    other_output = staging(".out.b.0123456789b1.partial", None, hours_old=100)  # the output "out.b", not "out"
    not_staging = staging(".out.backup.partial", None, hours_old=100)
    removed = convert_module.remove_stale_staging(output)
    if this_process["started"] is None:  # no /proc: a PID's start time is unknown, so a reused PID looks alive
        assert removed == [dead, unrecorded_old]
    else:
        assert removed == [dead, recycled, unrecorded_old]
    for folder in (live, elsewhere, unrecorded_new, other_output, not_staging):
        assert (folder / "model.safetensors").is_file(), folder
    assert (base / "model.safetensors").is_file()
    said = capsys.readouterr().err
    assert f"removed {dead}, left by an interrupted run (process {ended.pid} that wrote it has ended)" in said
    assert f"removed {unrecorded_old}, left by an interrupted run (untouched for 25 hours)" in said
    assert f"left {live} alone: process {os.getpid()} is still writing out there" in said
    assert f"left {elsewhere} alone: a run elsewhere may still be writing out" in said
    assert str(other_output) not in said and str(not_staging) not in said


# ---------------------------------------------------------------------------------------------------------------
# from a Hub id (against the local Hub of tests/hub_server.py): only what loading needs is downloaded

# what the base checkpoint's Hub repos hold besides a model, and no loader reads: Meta's original weights in a
# subfolder (one safetensors file, which a `*.safetensors` pattern would catch), the Trainer's pickled arguments
EXTRA_FILES = {
    "original/consolidated.00.pth": b"meta weights",
    "original/params.json": b"{}",
    "original/consolidated.safetensors": b"meta weights again",
    "training_args.bin": b"pickled arguments",
}


def upload(folder: Path, repo_id: str, files: dict[str, bytes] | None = None) -> None:
    """Create `repo_id` on the local Hub holding `folder` and `files` (path in the repo -> content)."""
    from huggingface_hub import HfApi

    for name, content in (files or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    api = HfApi()
    api.create_repo(repo_id)
    api.upload_folder(folder_path=folder, repo_id=repo_id)


def downloaded(hub, repo_id: str) -> set[str]:
    """The files of `repo_id` whose content the clients fetched (GET, not HEAD) from the local Hub."""
    from urllib.parse import unquote

    prefix = re.compile(rf"^/{re.escape(repo_id)}/resolve/[^/]+/")
    return {unquote(prefix.sub("", path)) for _, path, _ in hub.server.calls("GET", prefix.pattern)}


def loader_files(folder: Path, weights: list[str]) -> set[str]:
    """What loading `folder` needs: config, tokenizer, generation config, README and LICENSE, and `weights`."""
    kept = ("config.json", "generation_config.json", "README.md", "LICENSE")
    return {p.name for p in folder.iterdir() if p.name in kept or p.name.startswith("tokenizer")} | set(weights)


def test_hub_id_downloads_only_safetensors_and_top_level_files(hub, base, tmp_path):
    """A repo with safetensors AND .bin weights, Meta's `original/` folder and `training_args.bin`: convert takes
    the config, tokenizer, generation config, README, LICENSE and `model.safetensors`, nothing else."""
    wanted = loader_files(base, ["model.safetensors"])
    upload(base, "me/tiny-llama", {"pytorch_model.bin": b"a pickled copy", **EXTRA_FILES})
    out = convert_checkpoint("me/tiny-llama", tmp_path / "out", 512)
    assert downloaded(hub, "me/tiny-llama") == wanted
    [snapshot] = (hub.home / "hub" / "models--me--tiny-llama" / "snapshots").iterdir()
    assert {str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()} == wanted
    assert same_bytes(base / "model.safetensors", out / "model.safetensors")
    assert not list(out.glob("*.bin")) and not (out / "original").exists()
    assert json.loads((out / "longlora_hub.json").read_text())["base_model"] == "me/tiny-llama"
    assert LlamaLongLoRAForCausalLM.from_pretrained(out).config.max_position_embeddings == 512
    assert not hub.server.unhandled and not hub.server.errors


def test_training_from_a_hub_id_downloads_only_what_loading_needs(hub, base, tmp_path):
    """`prepare_base` (the recipe's on-the-fly conversion) goes through the same resolver, at the asked revision."""
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM

    from longlora_hub.training import LongLoRAArguments, ModelArguments, prepare_base

    wanted = loader_files(base, ["model.safetensors"])
    upload(base, "me/tiny-llama", {"pytorch_model.bin": b"a pickled copy", **EXTRA_FILES})
    api = HfApi()
    api.create_branch("me/tiny-llama", branch="v1")
    api.upload_file(path_or_fileobj=b"# a later card\n", path_in_repo="README.md", repo_id="me/tiny-llama")
    model_args = ModelArguments(model_name_or_path="me/tiny-llama", model_revision="v1", context_length=512)
    out = prepare_base(model_args, LongLoRAArguments(), str(tmp_path / "run"), 512)
    assert out == tmp_path / "run" / "base"
    assert downloaded(hub, "me/tiny-llama") == wanted
    assert same_bytes(base / "README.md", out / "README.md")  # v1's card, not main's
    assert (out / "model.safetensors").is_symlink() and not list(out.glob("*.bin"))
    assert json.loads((out / "longlora_hub.json").read_text())["base_model"] == "me/tiny-llama"
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "LlamaLongLoRAForCausalLM" and model.config.max_position_embeddings == 512


def fake_bin_checkpoint(folder: Path, shards: int) -> list[str]:
    """A Llama config and tokenizer with PyTorch `.bin` weights (never loaded by convert: any bytes do), in
    `shards` files with an index, or in one `pytorch_model.bin` when `shards` is 0. Returns the weight files."""
    tiny_llama().config.save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    if not shards:
        (folder / "pytorch_model.bin").write_bytes(b"pickled weights")
        return ["pytorch_model.bin"]
    names = [f"pytorch_model-{i:05d}-of-{shards:05d}.bin" for i in range(1, shards + 1)]
    for name in names:
        (folder / name).write_bytes(name.encode())
    weight_map = {f"model.layers.{i}.weight": name for i, name in enumerate(names)}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return [*names, "pytorch_model.bin.index.json"]


@pytest.mark.parametrize("shards", [0, 2])
def test_hub_id_with_only_bin_weights_downloads_the_bin(hub, tmp_path, shards):
    folder = tmp_path / "bin-llama"
    weights = fake_bin_checkpoint(folder, shards)
    wanted = loader_files(folder, weights)
    upload(folder, "me/bin-llama", EXTRA_FILES)
    out = convert_checkpoint("me/bin-llama", tmp_path / "out", 512)
    assert downloaded(hub, "me/bin-llama") == wanted
    assert sorted(p.name for p in out.glob("*.bin*")) == sorted(weights)


def test_sharded_hub_id_downloads_the_index_and_its_shards(hub, tmp_path):
    """Only the shards the index names: not a `consolidated.safetensors` next to them (Mistral's repos), nor .bin."""
    folder = tmp_path / "sharded"
    tiny_llama().save_pretrained(folder, max_shard_size="200KB")
    build_tiny_tokenizer().save_pretrained(folder)
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    wanted = loader_files(folder, [*shards, "model.safetensors.index.json"])
    upload(folder, "me/sharded", {"consolidated.safetensors": b"one more copy", "pytorch_model.bin": b"and another"})
    out = convert_checkpoint("me/sharded", tmp_path / "out", 512)
    assert downloaded(hub, "me/sharded") == wanted
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    model = LlamaLongLoRAForCausalLM.from_pretrained(out)
    reference = LlamaForCausalLM.from_pretrained(folder)
    for (name, param), (_, expected) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(param, expected), name


def test_merge_reads_a_hub_base_through_the_same_resolver(hub, tmp_path):
    from longlora_hub.merge import merge_adapter
    from longlora_hub.testing import sharded_base_and_adapter

    base, adapter = sharded_base_and_adapter(tmp_path / "made", num_shards=3)
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    wanted = loader_files(base, [*shards, "model.safetensors.index.json"])
    upload(base, "me/merge-base", EXTRA_FILES)
    merged = merge_adapter(adapter, tmp_path / "merged", base="me/merge-base")
    assert downloaded(hub, "me/merge-base") == wanted
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))


def test_offline_a_cached_hub_checkpoint_still_serves(hub, base, monkeypatch):
    from huggingface_hub import constants

    upload(base, "me/tiny-llama", EXTRA_FILES)
    online = resolve_checkpoint("me/tiny-llama")
    seen = len(hub.server.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_checkpoint("me/tiny-llama") == online
    assert len(hub.server.requests) == seen
    with pytest.raises(FileNotFoundError, match=r"(?s)me/other.*could not be downloaded.*OfflineModeIsEnabled"):
        resolve_checkpoint("me/other")


def test_unknown_hub_id_and_revision(hub, base, tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"(?s)not a local folder and could not be downloaded.*RepositoryNotFound"
    ):
        convert_checkpoint("someone/tiny-llama", tmp_path / "out", 512)
    upload(base, "me/tiny-llama")
    with pytest.raises(FileNotFoundError, match=r"(?s)could not be downloaded.*RevisionNotFound.*repo id and revision"):
        resolve_checkpoint("me/tiny-llama", revision="no-such-branch")
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_id(hub, tmp_path, monkeypatch):
    import time
    from types import SimpleNamespace

    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    # huggingface_hub retries a refused connection 5 times, waiting 1 + 2 + 4 + 8 + 8 s: the retries still happen,
    # without the 23 s of waiting (its module sees a `time` whose sleep only counts, and whose clocks are the real ones)
    retries = []
    clocks = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    monkeypatch.setattr(_http, "time", SimpleNamespace(**{**clocks, "sleep": retries.append}))
    with socket.socket() as closed:  # a port nothing listens on: the connection is refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(FileNotFoundError, match=r"(?s)not a local folder and could not be downloaded.*Connect"):
        convert_checkpoint("someone/tiny-llama", tmp_path / "out", 512)
    assert not (tmp_path / "out").exists()
    assert retries  # the client's own retry loop ran


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


def test_a_group_longer_than_the_context_warns(base, tmp_path):
    """Accepted silently before: with every sequence in one group, S² would train as full attention."""
    with pytest.warns(UserWarning, match=r"s2_group_size=4096 is above the context of 1024 tokens"):
        convert_checkpoint(base, tmp_path / "wide", 1024, group_size=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_checkpoint(base, tmp_path / "fits", 1024, group_size=256)
