"""Which checkpoints may run their own Python code: this package's LlamaLongLoRA files run unasked, anything else only
with `--trust-remote-code` (eval) or `trust_remote_code: true` (recipes), decided before any of the code is imported.

The foreign checkpoints here ship code that writes a marker file when imported, so a test sees whether it ran."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from longlora_hub.cli_eval import eval_group
from longlora_hub.convert import convert_checkpoint, remote_code_files
from longlora_hub.testing import build_tiny_tokenizer, tiny_llama


def _write_foreign_code(folder: Path, marker: Path, model_type: str = "custom_llama") -> None:
    """Make `folder` (a stock Llama checkpoint) a checkpoint of an architecture transformers does not know, whose
    code appends to `marker` when imported."""
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'a').write('configuration ran\\n')\n"
        "from transformers import LlamaConfig\n\n\n"
        f"class CustomConfig(LlamaConfig):\n    model_type = {model_type!r}\n"
    )
    (folder / "modeling_custom.py").write_text(
        f"open({str(marker)!r}, 'a').write('modeling ran\\n')\n"
        "from transformers import LlamaForCausalLM\n\n"
        "from .configuration_custom import CustomConfig\n\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A stock Llama and its LlamaLongLoRA conversion."""
    root = tmp_path_factory.mktemp("trust")
    base = root / "base"
    tiny_llama().save_pretrained(base)
    build_tiny_tokenizer().save_pretrained(base)
    return {"base": base, "longlora": convert_checkpoint(base, root / "longlora", 512)}


@pytest.fixture
def folders(checkpoints, tmp_path):
    """The two checkpoints and, per test, a foreign-code checkpoint (a folder name of its own, so no module of
    another test's copy is reused) with the marker file its code writes."""
    foreign = Path(shutil.copytree(checkpoints["base"], tmp_path / f"foreign_{tmp_path.name}"))
    marker = tmp_path / "foreign-code-ran"
    _write_foreign_code(foreign, marker)
    return {**checkpoints, "foreign": foreign, "marker": marker}


def _copy(folder: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def _eval(*args) -> object:
    return CliRunner().invoke(eval_group, [str(arg) for arg in args], catch_exceptions=False)


# ---------------------------------------------------------------------------------------------------------------
# the decision


def test_own_code_is_trusted_and_stock_models_need_none(folders, tmp_path):
    from longlora_hub.convert import trust_remote_code_for

    assert trust_remote_code_for(folders["longlora"]) is True
    assert trust_remote_code_for(folders["base"]) is False
    # an architecture transformers knows loads with its own classes, whatever its auto_map names
    stock = _copy(folders["base"], tmp_path)
    config = json.loads((stock / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (stock / "config.json").write_text(json.dumps(config))
    assert trust_remote_code_for(stock) is False
    # nothing to decide about a folder that does not exist: loading it says so
    assert trust_remote_code_for(tmp_path / "missing") is False


def test_foreign_code_needs_the_flag(folders):
    from longlora_hub.convert import trust_remote_code_for

    with pytest.raises(ValueError, match=r"needs its own Python code.*configuration_custom.*pass --trust-remote-code"):
        trust_remote_code_for(folders["foreign"])
    with pytest.raises(ValueError, match="pass trust_remote_code: true"):
        trust_remote_code_for(folders["foreign"], option="trust_remote_code: true")
    assert trust_remote_code_for(folders["foreign"], trust_remote_code=True) is True
    assert not folders["marker"].exists()  # deciding imports nothing


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("edit", r"differ from this longlora-hub's: modeling_llama_longlora\.py \(written by another version"),
        ("remove", r"s2_attention\.py \(missing\)"),
        ("other_repo", r"auto_map: someone/else--modeling_llama_longlora"),
        ("tokenizer_code", r"auto_map: tokenization_custom\.CustomTokenizer"),
    ],
)
def test_own_model_type_with_other_code_is_not_trusted(folders, tmp_path, change, message):
    """The model type alone proves nothing: the files must be this version's, byte for byte."""
    from longlora_hub.convert import trust_remote_code_for

    folder = _copy(folders["longlora"], tmp_path)
    if change == "edit":  # e.g. a checkpoint written by an older longlora-hub
        path = folder / "modeling_llama_longlora.py"
        path.write_text(path.read_text() + "\n# changed\n")
    elif change == "remove":
        (folder / "s2_attention.py").unlink()
    elif change == "other_repo":
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"]["AutoModelForCausalLM"] = "someone/else--modeling_llama_longlora.LlamaLongLoRAForCausalLM"
        (folder / "config.json").write_text(json.dumps(config))
    else:
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]}
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with pytest.raises(ValueError, match=message) as error:
        trust_remote_code_for(folder)
    assert "--trust-remote-code" in str(error.value)
    assert trust_remote_code_for(folder, trust_remote_code=True) is True


def test_config_that_is_not_an_object_is_refused(folders, tmp_path):
    from longlora_hub.convert import trust_remote_code_for

    folder = _copy(folders["base"], tmp_path)
    (folder / "config.json").write_text('["not", "a", "config"]')
    with pytest.raises(ValueError, match=r"config\.json holds a JSON list, not an object.*restore it"):
        trust_remote_code_for(folder)


def test_hub_checkpoints_are_decided_from_their_config_and_code_files_alone(hub, folders):
    """From the Hub only config.json, tokenizer_config.json and (for llama_longlora) the remote-code files are
    downloaded to decide; the foreign code is not imported."""
    import re
    from urllib.parse import unquote

    from huggingface_hub import HfApi

    from longlora_hub.convert import trust_remote_code_for

    api = HfApi()
    for repo_id, folder in (("me/longlora", folders["longlora"]), ("me/foreign", folders["foreign"])):
        api.create_repo(repo_id)
        api.upload_folder(folder_path=folder, repo_id=repo_id)

    def downloaded(repo_id: str) -> set[str]:
        prefix = re.compile(rf"^/{re.escape(repo_id)}/resolve/[^/]+/")
        return {unquote(prefix.sub("", path)) for _, path, _ in hub.server.calls("GET", prefix.pattern)}

    assert trust_remote_code_for("me/longlora") is True
    code = {path.name for path in remote_code_files()}
    assert downloaded("me/longlora") == {"config.json", "tokenizer_config.json"} | code
    with pytest.raises(ValueError, match=r"me/foreign needs its own Python code"):
        trust_remote_code_for("me/foreign")
    assert downloaded("me/foreign") == {"config.json", "tokenizer_config.json"}
    with pytest.raises(FileNotFoundError, match="could not be downloaded"):
        trust_remote_code_for("me/no-such-repo")
    assert not folders["marker"].exists()


# ---------------------------------------------------------------------------------------------------------------
# where it is used: eval and training


def test_eval_runs_foreign_code_only_with_the_flag(folders, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("The grass is green. The sky is blue. " * 80)
    for command in (("ppl", folders["foreign"], "--data", data, "--seq-len", 64), ("passkey", folders["foreign"])):
        args = (*command, "--lengths", 200) if command[0] == "passkey" else command
        result = _eval(*args, "--device", "cpu")
        assert result.exit_code == 1, result.output
        assert "needs its own Python code" in result.output and "--trust-remote-code" in result.output
        assert not folders["marker"].exists()
    result = _eval("ppl", folders["foreign"], "--data", data, "--seq-len", 64, "--trust-remote-code", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "modeling ran" in folders["marker"].read_text()  # the user allowed it: the checkpoint's own class ran
    # the package's own checkpoints need no flag
    assert _eval("ppl", folders["longlora"], "--data", data, "--seq-len", 64, "--device", "cpu").exit_code == 0


def test_eval_refuses_an_edited_llama_longlora_checkpoint(folders, tmp_path):
    folder = _copy(folders["longlora"], tmp_path)
    marker = tmp_path / "edited-code-ran"
    path = folder / "modeling_llama_longlora.py"
    path.write_text(f"open({str(marker)!r}, 'a').write('ran')\n" + path.read_text())
    data = tmp_path / "data.txt"
    data.write_text("The grass is green. The sky is blue. " * 80)
    result = _eval("ppl", folder, "--data", data, "--seq-len", 64, "--device", "cpu")
    assert result.exit_code == 1 and "modeling_llama_longlora.py" in result.output, result.output
    assert "--trust-remote-code" in result.output and not marker.exists()


def test_training_runs_no_foreign_code_before_the_llama_check(folders, tmp_path):
    from longlora_hub.training import LongLoRAArguments, ModelArguments, prepare_base

    model_args = ModelArguments(model_name_or_path=str(folders["foreign"]))
    with pytest.raises(ValueError, match=r"needs its own Python code.*trust_remote_code: true"):
        prepare_base(model_args, LongLoRAArguments(), str(tmp_path / "run"), 512)
    assert not folders["marker"].exists()
    model_args.trust_remote_code = True  # what the recipe copies from SFTConfig's trust_remote_code
    with pytest.raises(ValueError, match="LongLoRA recipes train Llama-family checkpoints"):
        prepare_base(model_args, LongLoRAArguments(), str(tmp_path / "run"), 512)
    assert "configuration ran" in folders["marker"].read_text()


def test_training_loads_its_own_conversion_and_refuses_edited_code(folders, tmp_path):
    from longlora_hub.training import LongLoRAArguments, ModelArguments, load_model_and_tokenizer

    model_args = ModelArguments(model_name_or_path=str(folders["longlora"]), attn_implementation="eager")
    model, _ = load_model_and_tokenizer(folders["longlora"], model_args, LongLoRAArguments())
    assert type(model).__name__ == "LlamaLongLoRAForCausalLM"
    edited = _copy(folders["longlora"], tmp_path)
    (edited / "s2_attention.py").write_text((edited / "s2_attention.py").read_text() + "\n# changed\n")
    with pytest.raises(ValueError, match=r"s2_attention\.py.*trust_remote_code: true"):
        load_model_and_tokenizer(edited, model_args, LongLoRAArguments())


def test_the_recipe_key_reaches_the_decision(folders, tmp_path):
    """`trust_remote_code: true` in a recipe is SFTConfig's field; `recipes/sft.py` must hand it to the check."""
    from .test_training import TINY_EXTEND, run

    common = ["--model_name_or_path", str(folders["foreign"]), "--max_steps", "1"]
    with pytest.raises(ValueError, match="needs its own Python code"):
        run(TINY_EXTEND, tmp_path / "refused", *common)
    assert not folders["marker"].exists()
    with pytest.raises(ValueError, match="LongLoRA recipes train Llama-family checkpoints"):
        run(TINY_EXTEND, tmp_path / "allowed", *common, "--trust_remote_code", "true")
    assert "configuration ran" in folders["marker"].read_text()
