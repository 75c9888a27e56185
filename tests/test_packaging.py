"""What a pip user gets: the wheel and the sdist built from this tree, the wheel installed into a fresh venv outside
the repository (training, converting and loading from there), and the recipe's configs addressed by name."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from longlora_hub.cli import main as cli
from longlora_hub.recipes import config_names, config_path

from .helpers import HANG_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]


def source_packages() -> set[str]:
    """Every package of the tree as the wheel must name it: longlora_hub's folders, and recipes/ as
    longlora_hub.recipes."""
    packages = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / "longlora_hub").rglob("__init__.py")
        if "__pycache__" not in path.parts
    }
    return packages | {"longlora_hub.recipes"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """The wheel and the sdist, built by setuptools' own PEP 517 hooks (what pip and `python -m build` call), with
    this environment's setuptools: no build isolation, so nothing is downloaded."""
    out = tmp_path_factory.mktemp("dist")
    built = []
    for hook in ("build_wheel", "build_sdist"):  # one process each: setuptools keeps state from one hook to the next
        script = f"import sys\nfrom setuptools import build_meta\nprint('built', build_meta.{hook}(sys.argv[1]))"
        command = [sys.executable, "-c", script, str(out)]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
        assert result.returncode == 0, result.stderr[-4000:]
        # setuptools logs to stdout too
        built += [line.split()[1] for line in result.stdout.splitlines() if line.startswith("built ")]
    wheel, sdist = built
    return out / wheel, out / sdist


def test_the_wheel_holds_the_package_its_recipes_and_its_metadata(built):
    wheel, _ = built
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    packages = {str(Path(name).parent).replace("/", ".") for name in names if name.endswith("/__init__.py")}
    assert packages == source_packages()  # pyproject lists the packages by name: none may be forgotten
    for name in [
        "longlora_hub/recipes/sft.py",
        "longlora_hub/train.py",
        "longlora_hub/remote_code/modeling_llama_longlora.py",
        "longlora_hub/assets/tiny-llama-pretrained/model.safetensors",
        "longlora_hub/recipes/accelerate/zero2.yaml",
    ]:
        assert name in names, name
    shipped = {name for name in names if re.fullmatch(r"longlora_hub/recipes/configs/.+\.yaml", name)}
    assert len(shipped) == len(config_names()) == len(list((ROOT / "recipes" / "configs").glob("*/*.yaml")))
    assert any(re.fullmatch(r"longlora_hub-[^/]+\.dist-info/licenses/LICENSE", name) for name in names)
    assert not any("tests/" in name or "__pycache__" in name for name in names)
    assert "License-Expression: Apache-2.0" in metadata
    assert "Classifier: Programming Language :: Python :: 3" in metadata
    assert re.search(r"^Project-URL: Repository, https://", metadata, re.MULTILINE)
    assert re.search(r"^Requires-Dist: peft<0\.\d+,>=0\.\d+", metadata, re.MULTILINE)  # both ends
    print(f"wheel: {wheel.name}, {wheel.stat().st_size / 1e6:.1f} MB, {len(names)} files")


def test_pytest_runs_from_the_unpacked_sdist(built, tmp_path):
    _, sdist = built
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path, filter="data")
    (unpacked,) = tmp_path.iterdir()
    for name in [
        "LICENSE",
        "Makefile",
        "pyproject.toml",
        "tests/conftest.py",
        "tests/helpers.py",
        "tests/hub_server.py",
        "tests/assets/longqa",
        "recipes/sft.py",
        "recipes/configs/tiny/extend.yaml",
        "datasets/longqa/README.md",
        "benchmarks/gpu_check.py",
    ]:
        assert (unpacked / name).exists(), name
    # the tests as the sdist holds them, with its own conftest and local Hub: the Hub server's own tests and the
    # recipe's configs
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_hub_server.py"]
    result = subprocess.run(command, cwd=unpacked, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"\d+ passed", result.stdout) and "failed" not in result.stdout


@pytest.mark.slow
def test_the_wheel_in_a_fresh_venv_trains_converts_and_loads(built, tmp_path):
    """The wheel alone, outside the repository: its dependencies come from this environment (a .pth names its
    site-packages, whose own .pth files, this tree's editable install among them, are not read), the package from
    the wheel."""
    wheel, _ = built
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=HANG_TIMEOUT_S)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(pip, check=True, capture_output=True, timeout=HANG_TIMEOUT_S)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")

    def run(*command):
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
        assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    where = run(python, "-c", "import longlora_hub, longlora_hub.recipes as r; print(longlora_hub.__file__, r.FOLDER)")
    assert all(Path(path).is_relative_to(venv) for path in where.split()), where
    cli_path = venv / "bin" / "longlora-hub"
    assert "train" in run(cli_path, "--help") and "zero3" in run(cli_path, "train", "--list")
    train = ["train", "--config", "tiny/extend", "--max_steps", "1", "--output_dir", "run", "--disable_tqdm", "true"]
    run(cli_path, *train, "--save_strategy", "no", "--report_to", "none")
    assert (work / "run" / "adapter_model.safetensors").is_file()
    run(cli_path, "convert", "builtin:tiny-llama-pretrained", "converted", "-n", "1024")
    load = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained('converted', trust_remote_code=True)\n"
        "tokenizer = AutoTokenizer.from_pretrained('converted', trust_remote_code=True)\n"
        "ids = tokenizer('The pass key is 123.', return_tensors='pt').input_ids\n"
        "print(type(model).__name__, model.config.max_position_embeddings, model(ids).logits.shape[-1])"
    )
    assert run(python, "-c", load).split()[:2] == ["LlamaLongLoRAForCausalLM", "1024"]
    # the demo finds its recipe and configs in the package (it stopped at FileNotFoundError from a wheel)
    demo = (
        "from longlora_hub.recipes import CONFIGS, sft; print((CONFIGS / 'tiny' / 'extend_pretrained.yaml').is_file())"
    )
    assert run(python, "-c", demo).strip() == "True"


# ----------------------------------------------------------------------------------------------------------------
# the recipe's configs by name


def test_a_config_is_found_by_name_by_path_or_as_the_clones_path():
    want = str(ROOT / "recipes" / "configs" / "smollm2-135m" / "32k_extend.yaml")
    assert "smollm2-135m/32k_extend" in config_names() and "tiny/extend" in config_names()
    for name in [
        "smollm2-135m/32k_extend",
        "smollm2-135m/32k_extend.yaml",
        "recipes/configs/smollm2-135m/32k_extend.yaml",
    ]:
        assert Path(config_path(name)).resolve() == Path(want).resolve(), name
    assert config_path(want) == want
    with pytest.raises(
        ValueError, match=r"--config tiny/extnd: no such file, nor a shipped recipe config .*tiny/extend, "
    ):
        config_path("tiny/extnd")


def test_longlora_hub_train_runs_the_recipe(tmp_path):
    """`longlora-hub train` is `recipes/sft.py`: the same arguments, a config by name (`--config NAME` and
    `--config=NAME`), and the recipe's one-line errors."""
    out = tmp_path / "run"
    common = ["--max_steps", "1", "--output_dir", str(out), "--disable_tqdm", "true", "--save_strategy", "no"]
    result = CliRunner().invoke(cli, ["train", "--config=tiny/extend", *common])
    assert result.exit_code == 0, result.output
    assert (out / "adapter_model.safetensors").is_file()
    result = CliRunner().invoke(cli, ["train", "--config", "tiny/nope", *common])
    assert result.exit_code == 1 and "error: --config tiny/nope: no such file" in result.output
    listing = CliRunner().invoke(cli, ["train", "--list"]).output
    assert f"tiny/extend\t{ROOT / 'recipes' / 'configs' / 'tiny' / 'extend.yaml'}" in listing
    assert re.search(r"^zero2\t.*recipes/accelerate/zero2\.yaml$", listing, re.MULTILINE)
