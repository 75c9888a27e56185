"""benchmarks/gpu_check.py, the prepared GPU check: its dry run on the CPU resolves every check (ok, or skipped with a
reason, never failed) and writes each check's figures; and the judging of its targets."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import HANG_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_resolves_every_check(tmp_path):
    out = tmp_path / "report" / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # the report goes to --out, nothing to the working directory
        timeout=HANG_TIMEOUT_S,
    )
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    checks = {check["name"]: check for check in report["checks"]}
    failed = {name: (c["reason"], c.get("stderr_tail")) for name, c in checks.items() if c["status"] == "failed"}
    assert not failed and done.returncode == 0, (failed, done.stdout[-3000:])
    assert list(checks) == list(load_gpu_check().CHECKS)
    assert report["dry_run"] and report["finished"] and not list(tmp_path.glob("*.json"))
    for name, check in checks.items():
        assert check["status"] in ("ok", "skipped"), name
        assert check["needs"], name
        if check["status"] == "skipped":
            assert check["reason"], name
    assert report["summary"]["failed"] == 0 and report["summary"]["ok"] >= 5, report["summary"]
    assert "check" in done.stdout and "figures / reason" in done.stdout  # the table

    environment = checks["environment"]["figures"]
    assert environment["packages"]["torch"]["version"] and environment["packages"]["transformers"]["version"]
    assert set(environment["importable"]) == {"trl", "datasets", "flash_attn", "bitsandbytes"}
    assert environment["requirements"]["transformers"]["met"] is True

    pytest_gpu = checks["pytest_gpu"]["figures"]
    assert "tests/test_backends.py" in pytest_gpu["files"]
    assert pytest_gpu["skipped"] > 0 and pytest_gpu["failed"] == pytest_gpu["errors"] == 0  # no CUDA: all skip

    parity = checks["s2_parity"]["figures"]
    sdpa = parity["backends"]["sdpa"]
    assert sdpa["ok"] and sdpa["max_abs_err"] < 1e-4
    assert set(sdpa["cases"]) >= {"segments", "roll", "padded", "packed", "mqa", "full_row"}
    assert sdpa["cases"]["full_row"]["reference_mask_is_causal"] is True
    assert set(parity["skipped_backends"]) == {"flex_attention", "flash_attention_2"}

    train = checks["train_step_sdpa"]["figures"]
    assert train["ratios"]["time_s2/full_attention@longlora"] > 0
    assert all("peak_mem_mib" in case for case in train["cases"].values())

    attention = checks["attention_sdpa"]["figures"]["lengths"]
    assert attention and all(values["ratios"]["s2_sdpa/full"] > 0 for values in attention.values())

    for name in ("train_step_flex_attention", "attention_flex_attention"):
        assert checks[name]["status"] == "skipped" and checks[name]["figures"]["argv_parses"] is True, name
    targets = checks["targets"]["figures"]["targets"]
    assert {"time_s2_sdpa/full", "mem_s2_sdpa/full"} <= set(targets)
    assert all(target["value"] is not None for target in targets.values())


def test_targets_are_judged_at_64k():
    gpu_check = load_gpu_check()
    args = gpu_check.parse_args([])

    def judged(time_ratio, memory_ratio):
        ratios = {"s2_sdpa/full": time_ratio, "mem_s2_segments_sdpa/full": memory_ratio}
        lengths = {"32768": {"ratios": {"s2_sdpa/full": 0.9}}, "65536": {"ratios": ratios}}
        results = {"attention_sdpa": {"status": "ok", "figures": {"lengths": lengths}}}
        return gpu_check.check_targets(args, results)

    met = judged(0.27, 0.8)
    assert met["status"] == "ok" and met["figures"]["targets"]["time_s2_sdpa/full"]["judged_at_n"] == 65536
    assert met["figures"]["targets"]["time_s2_sdpa/full"]["per_n"] == {"32768": 0.9, "65536": 0.27}
    assert "mem_s2_flash/full" in met["figures"]["not_judged"]
    missed = judged(0.31, 0.8)
    assert missed["status"] == "failed" and "time_s2_sdpa/full" in missed["reason"]
    assert judged(0.27, 1.0)["status"] == "failed"
    assert gpu_check.check_targets(args, {})["status"] == "skipped"


def test_gpu_test_files_are_found_by_their_marker():
    files = load_gpu_check().gpu_test_files()
    assert "tests/test_backends.py" in files and "tests/test_gpu_check.py" not in files
