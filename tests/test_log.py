"""Messages and progress bars: no bare `print` in the library, messages on stderr through `logging` and gone with
`longlora-hub -q`, `-v` for more, and huggingface_hub's progress bars on the long work (merge, the weight copy of a
conversion), which `HF_HUB_DISABLE_PROGRESS_BARS=1` turns off."""

import ast
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

from longlora_hub import log
from longlora_hub.cli import main
from longlora_hub.convert import convert_checkpoint
from longlora_hub.merge import merge_adapter
from longlora_hub.testing import sharded_base_and_adapter, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "longlora_hub"
# where printing to stdout is what the code is for: (file, function)
PRINT_ALLOWED = {
    ("demo.py", "say"),  # `make demo`'s report is its output
    ("real_model.py", "main"),  # `python -m longlora_hub.real_model` prints the checkpoint's folder, for scripts
}


def _prints(path: Path) -> list[tuple[str, int]]:
    """`(enclosing function, line)` of every call of the built-in `print` in a source file."""
    found = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Name) and child.func.id == "print":
                found.append((function, child.lineno))
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), "<module>")
    return found


def test_the_library_logs_instead_of_printing():
    """Messages go through `logging` (stderr, levels, `-q`); `print` only where stdout is the point."""
    stray = [
        f"{path.relative_to(ROOT)}:{line} (in {function})"
        for path in sorted(PACKAGE.rglob("*.py"))
        for function, line in _prints(path)
        if (path.relative_to(PACKAGE).as_posix(), function) not in PRINT_ALLOWED
    ]
    assert not stray, f"print() in the library; use longlora_hub.log.get_logger(__name__): {stray}"
    assert {(name, function) for name, function in PRINT_ALLOWED} <= {
        (path.name, function) for path in PACKAGE.glob("*.py") for function, _ in _prints(path)
    }, "an allowlisted print() is gone: shorten the allowlist"


def test_the_library_logger_writes_to_the_current_stderr(capsys):
    logger = log.get_logger("longlora_hub.somewhere")
    logger.info("an info line")
    logger.warning("a warning line")
    logger.debug("a debug line")  # below the default INFO
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "[longlora-hub] an info line\n[longlora-hub] warning: a warning line\n"
    before = log.get_verbosity()
    try:
        log.set_verbosity(logging.WARNING)
        logger.info("hidden")
        assert capsys.readouterr().err == ""
    finally:
        log.set_verbosity(before)


# ---------------------------------------------------------------------------------------------------------------
# -q and -v on the command group


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base") / "tiny"
    tiny_llama().save_pretrained(folder)
    return folder


def _stale_staging(output: Path) -> Path:
    """What a killed conversion into `output` leaves: a staging folder whose writer has ended."""
    import json
    import socket

    from longlora_hub import convert

    staging = output.parent / f".{output.name}.0123456789ab.partial"
    staging.mkdir(parents=True)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"pid": int(ended.stdout), "host": socket.gethostname(), "pid_namespace": convert._pid_namespace()}
    (staging / convert.STAGING_OWNER_FILE).write_text(json.dumps(record))
    return staging


def test_info_messages_go_to_stderr_and_quiet_hides_them(base, tmp_path):
    output = tmp_path / "loud"
    left = _stale_staging(output)
    loud = CliRunner().invoke(main, ["convert", str(base), str(output), "-n", "1024"])
    assert loud.exit_code == 0, loud.output
    assert f"[longlora-hub] removed {left}, left by an interrupted run" in loud.stderr
    assert "removed" not in loud.stdout and f"Converted {base} -> {output}" in loud.stdout  # the result

    for flag in ("-q", "--quiet"):
        output = tmp_path / flag.lstrip("-")
        left = _stale_staging(output)
        quiet = CliRunner().invoke(main, [flag, "convert", str(base), str(output), "-n", "1024"])
        assert quiet.exit_code == 0, quiet.output
        assert not left.exists()  # removed all the same, without a word
        assert quiet.stderr == "" and f"Converted {base} -> {output}" in quiet.stdout
    assert log.get_verbosity() == log.DEFAULT_LEVEL  # put back after the command


def test_quiet_reaches_the_commands_of_a_nested_group(tmp_path):
    """`longlora-hub -q longqa build ...`: the group's option holds for a command two levels down; its summary (the
    result) stays on stdout, its steps and bars (datasets' too) are gone from stderr."""
    from longlora_hub.testing import build_tiny_tokenizer

    build_tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    build = ["longqa", "build", "--synthetic", "4", "--synthetic-length", "512"]
    build += ["--tokenizer", str(tmp_path / "tokenizer")]
    loud = CliRunner().invoke(main, [*build, "-o", str(tmp_path / "loud")])
    quiet = CliRunner().invoke(main, ["-q", *build, "-o", str(tmp_path / "quiet")])
    assert loud.exit_code == quiet.exit_code == 0, loud.output + quiet.output
    assert "[longlora-hub] reading the long inputs" in loud.stderr and "writing train: 100%|" in loud.stderr
    assert quiet.stderr == "" and "synthetic: 4 rows" in quiet.stdout


def test_verbose_and_quiet_exclude_each_other():
    result = CliRunner().invoke(main, ["-v", "-q", "convert", "a", "b", "-n", "8"])
    assert result.exit_code == 2 and "-v/--verbose and -q/--quiet exclude each other" in result.output


@pytest.mark.parametrize(
    "verbose,quiet,ours,theirs,bars_off",
    [
        (0, True, logging.WARNING, logging.ERROR, True),
        (1, False, logging.DEBUG, logging.INFO, False),
        (2, False, logging.DEBUG, logging.DEBUG, False),
        (3, False, logging.DEBUG, logging.DEBUG, False),
    ],
)
def test_cli_verbosity_sets_every_library_and_puts_it_back(verbose, quiet, ours, theirs, bars_off):
    import huggingface_hub.utils.logging as hub_logging
    import transformers.utils.logging as transformers_logging

    before = (log.get_verbosity(), transformers_logging.get_verbosity(), hub_logging.get_verbosity())
    with log.cli_verbosity(verbose, quiet):
        assert log.get_verbosity() == ours
        assert transformers_logging.get_verbosity() == hub_logging.get_verbosity() == theirs
        assert are_progress_bars_disabled() == bars_off
    assert (log.get_verbosity(), transformers_logging.get_verbosity(), hub_logging.get_verbosity()) == before
    assert not are_progress_bars_disabled()


def test_verbose_shows_debug_messages(base, tmp_path):
    result = CliRunner().invoke(main, ["-v", "convert", str(base), str(tmp_path / "out"), "-n", "1024"])
    assert result.exit_code == 0, result.output
    assert "[longlora-hub] debug: copying 1 weight files" in result.stderr
    plain = CliRunner().invoke(main, ["convert", str(base), str(tmp_path / "plain"), "-n", "1024"])
    assert "debug:" not in plain.output


# ---------------------------------------------------------------------------------------------------------------
# progress bars


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return sharded_base_and_adapter(tmp_path_factory.mktemp("sharded"), num_shards=2, max_position_embeddings=512)


def test_a_merge_shows_a_progress_bar_that_huggingface_hub_turns_off(sharded, tmp_path, capsys):
    base, adapter = sharded
    merge_adapter(adapter, tmp_path / "shown")
    shown = capsys.readouterr()
    assert "merging: 100%|" in shown.err and shown.out == ""
    with disable_progress_bars():
        merge_adapter(adapter, tmp_path / "hidden")
    assert capsys.readouterr().err == ""
    with disable_progress_bars(log.PROGRESS_BAR_GROUP):  # this package's bars alone
        merge_adapter(adapter, tmp_path / "hidden-too")
    assert capsys.readouterr().err == ""
    assert not are_progress_bars_disabled()


def test_hf_hub_disable_progress_bars_silences_a_merge_command(sharded, tmp_path):
    _, adapter = sharded
    command = [sys.executable, "-m", "longlora_hub.cli", "merge", str(adapter), str(tmp_path / "out")]
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == "", done.stderr[-3000:]  # no bar, and no message either: the merge had none to give
    assert f"Merged {adapter} -> {tmp_path / 'out'}" in done.stdout


def test_a_conversion_copying_weights_shows_a_bar(base, tmp_path, capsys):
    convert_checkpoint(base, tmp_path / "copied", 1024)
    assert "copying weights: 100%|" in capsys.readouterr().err
    convert_checkpoint(base, tmp_path / "linked", 1024, link_weights=True)  # the recipe's: nothing long to show
    assert capsys.readouterr().err == ""
    with disable_progress_bars():
        convert_checkpoint(base, tmp_path / "quiet", 1024)
    assert capsys.readouterr().err == ""


def test_quiet_turns_the_bars_off_for_the_command_only(sharded, tmp_path):
    _, adapter = sharded
    result = CliRunner().invoke(main, ["-q", "merge", str(adapter), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "merging" not in result.stderr and "Merged" in result.stdout
    assert not are_progress_bars_disabled()
    result = CliRunner().invoke(main, ["merge", str(adapter), str(tmp_path / "again")])
    assert "merging: 100%|" in result.stderr
