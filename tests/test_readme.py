"""The README's Quickstart runs as written, in a fresh process with stdin closed (a y/N remote-code prompt would
show in its output), from an empty folder."""

import re
import subprocess
import sys
from pathlib import Path

from .helpers import HANG_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]


def quickstart() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Quickstart") :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_quickstart_runs_as_written(tmp_path):
    code = quickstart()
    assert "convert_checkpoint(" in code and "model.generate(" in code and "AutoTokenizer" in code
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "[y/N]" not in result.stdout + result.stderr
    tokens, loss = re.search(r"^(\d+) tokens, loss ([\d.]+):", result.stdout, re.MULTILINE).groups()
    assert 256 < int(tokens) <= 1024  # beyond the base's context, within the converted one
    assert 0 < float(loss) < 10
    assert (tmp_path / "tiny-llama-1k" / "config.json").is_file()


def test_the_longqa_builder_reads_a_converted_tokenizer_without_a_question(tmp_path):
    """`longqa build --tokenizer CONVERTED`: the folder's config names this package's own code, so transformers is
    told to run it instead of asking y/N (which stops a build on a terminal for 15 s, or for good in a notebook)."""
    from longlora_hub.convert import convert_checkpoint

    converted = convert_checkpoint("builtin:tiny-llama-pretrained", tmp_path / "converted", context_length=512)
    code = "import sys\nfrom longlora_hub.longqa.build import load_tokenizer\nprint(len(load_tokenizer(sys.argv[1])))"
    result = subprocess.run(
        [sys.executable, "-c", code, str(converted)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[y/N]" not in result.stdout + result.stderr and int(result.stdout.split()[-1]) > 0
