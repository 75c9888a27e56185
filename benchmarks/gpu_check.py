"""The prepared GPU check: one command that a machine with ONE GPU (an H200) runs from a bare start in under 8 minutes.

    python3 benchmarks/gpu_check.py       # or: make gpu-check; --dry-run on a machine without a GPU (what CI runs)

It runs named checks one after the other, each in a process of its own with its own timeout, so that one hang or
one crash can neither eat the budget nor stop the others. Every check is recorded as `ok`, `failed` or `skipped`,
with the reason, the packages it needs and its figures, in ONE JSON file (`--out`; default `$OUT/gpu_check.json`
when OUT is set, else `./gpu_check.json`), rewritten after every check so that a run cut short still leaves what
it measured. A readable table is printed at the end. The exit code is 1 if any check failed.

- `environment` (torch): versions, the GPU, which optional packages import (trl, datasets, flash_attn,
  bitsandbytes), and the installed versions against pyproject.toml's pins.
- `pytest_gpu` (pytest): `pytest -m gpu -p no:cacheprovider` over the test files that hold `gpu` tests; pass, skip
  and fail counts, skip reasons. A test whose package is missing must skip by itself: the flash tests need
  flash_attn, the qlora test bitsandbytes, trl and datasets.
- `s2_parity` (torch, transformers; triton for flex_attention, flash_attn for flash_attention_2): `s2_attention` in
  bf16 against the dense reference of longlora_hub.testing in fp32 on the same GPU, forward and gradients, on
  sdpa, flex_attention and flash_attention_2: segments, roll, padding, packing, both, GQA (8/2), MQA (4/1), and a
  group covering the row against plain causal attention. Max abs errors per tensor.
- `train_step_sdpa` (torch, transformers, peft): `train_step.py --preset 7b-layers --layers 4 --length 32768
  --dtype bfloat16 --attn sdpa`, the four cases: step time and peak memory of S² against full attention.
- `attention_sdpa` (torch, transformers): `attention.py --lengths 32768 65536 --dtype bfloat16` with full, S² sdpa,
  the naive roll, and S² flash_attention_2 when flash_attn imports.
- `train_step_flex_attention` (+ triton): as `train_step_sdpa` with `--attn flex_attention`, the two longlora cases.
- `attention_flex_attention` (+ triton): `attention.py --lengths 65536` with full and S² flex_attention.
- `targets`: S²/full attention time <= 0.30 at 64k (sdpa); S² peak memory below full attention's (sdpa, and flash
  when it ran), judged on the `attention_sdpa` figures.

The flex checks run last: torch.compile of flex_attention takes 20-60 s per new shape and every benchmark process
compiles anew, so they get what is left of `--budget-s` (default 450 s for the whole run).

`--dry-run` runs every check on the CPU with tiny shapes (parity at N=128 in fp32, the small train_step preset
with 1 layer at N=256 and its two longlora cases, attention.py at N=512 in fp32 with full and S² sdpa) in about a
minute on 2 cores, so that every check's imports, arguments and code path resolve; what needs CUDA (flex_attention's
backward, flash-attn) is skipped, with the reason, and the flex benchmarks' arguments are only parsed. Its targets
are reported, not judged. tests/test_gpu_check.py runs it.

Wheels. The GPU machine has no network; its image has torch 2.11 (CUDA 13.0), transformers 5.17.0, huggingface_hub
1.33.0, tokenizers 0.23.2, peft, accelerate 1.15.0, triton, pytest, pyarrow, pandas and xxhash, but no trl,
datasets, flash-attn or bitsandbytes. Made once, where pip works, in the repository's root (.gitignore has /.whl/):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
        transformers==5.24.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 bitsandbytes==0.50.2
    zip -q -d .whl/bitsandbytes-0.50.2-*.whl 'bitsandbytes/libbitsandbytes_cuda11*' \
        'bitsandbytes/libbitsandbytes_cuda12*' 'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*'

- transformers 5.24.0, 12.9 MiB: REQUIRED. pyproject.toml pins >=5.20, and 5.17's Llama layers still take
  `past_key_values=` where our remote code passes `cache=`: there, eval and generation of a LlamaLongLoRA model fail
  ("got multiple values for argument 'past_key_values'"; S² training happens to work). 5.24 is what .venv tests
  with; the image's huggingface_hub 1.33 (5.24 needs >=1.31) and tokenizers 0.23.2 (>=0.23.1) fit it.
- trl 1.16.0, 0.9 MiB; datasets 5.2.0, 0.6 MiB; dill 0.4.1, 0.1 MiB; multiprocess 0.70.19 (py312), 0.1 MiB: the
  SFT path of longlora_hub.training, which the qlora `gpu` test runs (datasets also needs pyarrow >= 24 and
  fsspec <= 2026.9.0 from the image: `environment` reports their versions).
- bitsandbytes 0.50.2, 6.8 MiB after the `zip -d` (41.1 MiB as published: it keeps only its CPU and CUDA 13.x
  libraries; torch there is built for CUDA 13.0): the qlora `gpu` test.

Together 21.5 MiB (14.7 without bitsandbytes); with the working tree (about 8 MiB) well inside the 64 MiB that
travels. flash-attn cannot be carried (no binary wheel on PyPI; it builds from source for an hour or more), so its
tests and cases skip. On the GPU machine (the device tool's `run` with `carry: [".whl"]` and timeout_s 540):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py

Our package is not installed there: every check gets the repository's root on its PYTHONPATH, after what is there
already, so that the carried /tmp/site stays ahead of the image's own packages. `--steps` reruns some checks only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"

CORE_PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors")  # a mismatch fails `environment`
OTHER_PACKAGES = ("triton", "tokenizers", "huggingface_hub", "numpy", "pytest")
OPTIONAL_PACKAGES = ("trl", "datasets", "flash_attn", "bitsandbytes")  # imported: a failure is recorded, not fatal
METADATA_ONLY = ("pyarrow", "fsspec", "pandas", "xxhash", "dill", "multiprocess")  # datasets' needs: versions only

PARITY_BACKENDS = ("sdpa", "flash_attention_2", "flex_attention")  # flex last: it compiles
S2_TIME_TARGET = 0.30  # S² sdpa / full attention, time, at TARGET_N
TARGET_N = 65536

STATUSES = ("ok", "failed", "skipped")


# ----------------------------------------------------------------------------------------------------------
# settings of the two modes


def settings(args: argparse.Namespace) -> dict:
    """What each check runs with: the GPU's sizes, or the dry run's CPU-sized stand-ins."""
    if args.dry_run:
        return {
            "device": "cpu",
            "dtype": "float32",
            "parity": {"seq_len": args.parity_length or 128, "head_dim": 64},
            "train": ["--preset", "small", "--layers", "1", "--length", str(args.train_length or 256)],
            "train_repeats": 1,
            "attention_lengths": args.attention_lengths or [512],
            "flex_attention_lengths": args.flex_attention_lengths or [512],
            "attention_repeats": 1,
        }
    return {
        "device": "cuda",
        "dtype": "bfloat16",
        "parity": {"seq_len": args.parity_length or 512, "head_dim": 128},
        "train": [
            "--preset",
            "7b-layers",
            "--layers",
            str(args.train_layers),
            "--length",
            str(args.train_length or 32768),
        ],
        "train_repeats": args.train_repeats,
        "attention_lengths": args.attention_lengths or [32768, 65536],
        "flex_attention_lengths": args.flex_attention_lengths or [65536],
        "attention_repeats": args.attention_repeats,
    }


# ----------------------------------------------------------------------------------------------------------
# worker: environment


def _version(module) -> str | None:
    return getattr(module, "__version__", None)


def _project_requirements() -> dict[str, str]:
    """name -> specifier of pyproject.toml's [project] dependencies (a regex: tomllib is 3.11+)."""
    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
    requirements = {}
    for entry in re.findall(r'"([^"]+)"', block.group(1) if block else ""):
        name, spec = re.match(r"([A-Za-z0-9_.\-]+)(.*)", entry).groups()
        requirements[name.lower().replace("-", "_")] = spec.strip()
    return requirements


def environment_worker(dry_run: bool) -> dict:
    """Versions, the GPU, which optional packages import, and the project's pins against what is installed."""
    import importlib
    import importlib.metadata
    import platform

    figures: dict = {"python": platform.python_version(), "executable": sys.executable, "packages": {}}
    problems = []
    for name in CORE_PACKAGES + OTHER_PACKAGES + OPTIONAL_PACKAGES:
        try:
            module = importlib.import_module(name)
            where = getattr(module, "__file__", None)  # None for a namespace package
            figures["packages"][name] = {"version": _version(module), "path": where and str(Path(where).parent)}
        except Exception as error:  # noqa: BLE001 - any import failure (missing, broken build, ABI) is a finding
            figures["packages"][name] = {"version": None, "error": f"{type(error).__name__}: {error}"[:300]}
            if name in CORE_PACKAGES:
                problems.append(f"{name} does not import")
    for name in METADATA_ONLY:
        try:
            figures["packages"][name] = {"version": importlib.metadata.version(name)}
        except importlib.metadata.PackageNotFoundError:
            figures["packages"][name] = {"version": None}
    figures["importable"] = {name: "error" not in figures["packages"][name] for name in OPTIONAL_PACKAGES}

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    figures["requirements"] = {}
    for name, spec in _project_requirements().items():
        installed = figures["packages"].get(name, {}).get("version")
        if installed is None and name not in figures["packages"]:
            continue  # a dependency no check here uses (click, matplotlib, ...)
        met = None if installed is None else Version(installed.split("+")[0]) in SpecifierSet(spec)
        figures["requirements"][name] = {"spec": spec, "installed": installed, "met": met}
        if name in CORE_PACKAGES and not met:
            problems.append(f"{name} {installed} does not satisfy pyproject.toml's {spec}")

    import torch

    figures["cuda_available"] = torch.cuda.is_available()
    figures["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        figures["gpu"] = {
            "name": props.name,
            "count": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "cudnn": torch.backends.cudnn.version(),
        }
    elif not dry_run:
        problems.append("CUDA is not available (use --dry-run on a machine without a GPU)")
    figures["cpu_count"] = os.cpu_count()
    figures["torch_threads"] = torch.get_num_threads()
    return {"status": "failed" if problems else "ok", "reason": "; ".join(problems) or None, "figures": figures}


# ----------------------------------------------------------------------------------------------------------
# worker: S² against the dense reference


def parity_cases(seq_len: int) -> dict[str, dict]:
    """The layouts compared. Heads (Hq, Hk): GQA (8, 2) unless said; MQA (4, 1) also takes the path that repeats a
    key/value head serving both halves. `full_row*` compare against plain causal attention."""
    import torch

    group = max(2, (seq_len // 4) - (seq_len // 4) % 2)
    padding = torch.ones(2, seq_len, dtype=torch.long)
    padding[0, : seq_len // 7] = 0  # left padding
    padding[1, seq_len - seq_len // 5 :] = 0  # right padding
    documents = [seq_len // 5, seq_len // 2, seq_len - seq_len // 5 - seq_len // 2]  # not multiples of G
    packed_row = torch.cat([torch.arange(length) for length in documents])
    positions = torch.stack([packed_row, torch.arange(seq_len)])  # row 0 packed, row 1 one document
    return {
        "segments": {"group": group, "shift": "segments"},
        "roll": {"group": group, "shift": "roll"},
        "padded": {"group": group, "shift": "segments", "padding_mask": padding},
        "packed": {"group": group, "shift": "segments", "position_ids": positions},
        "padded_packed": {"group": group, "shift": "segments", "padding_mask": padding, "position_ids": positions},
        "mqa": {"group": group, "shift": "segments", "heads": (4, 1)},
        # G/2 >= N: both halves of the heads see the whole row, so S² is plain causal attention (forward and grads)
        "full_row": {"group": 2 * seq_len, "shift": "segments", "causal": "all"},
        # G = N: the unshifted half is plain causal attention (the shifted half is split at N/2)
        "full_row_unshifted_half": {"group": seq_len, "shift": "segments", "causal": "first_half"},
    }


def parity_worker(device_name: str, dtype_name: str, seq_len: int, head_dim: int, backends: list[str]) -> dict:
    """Every case of `parity_cases` on every backend: max abs errors of the output and of dq, dk, dv against the
    fp32 dense reference (longlora_hub.testing) computed on the same device from the same (rounded) inputs. Each
    backend's result is printed as one JSON line as soon as it is known, so that a timeout keeps the earlier ones."""
    import torch

    from longlora_hub.remote_code.s2_attention import build_s2_layout, s2_attention
    from longlora_hub.testing import reference_attention, s2_reference_mask

    device, dtype = torch.device(device_name), getattr(torch, dtype_name)
    rtol = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}[dtype]  # of max|reference|, >= 1
    batch, scaling = 2, head_dim**-0.5
    cases = parity_cases(seq_len)
    references: dict[str, dict] = {}
    masks: dict[tuple, torch.Tensor] = {}  # the dense masks take seconds each (Python loops): shared between cases

    def dense_mask(group: int, shift: str, padding, positions) -> torch.Tensor:
        key = (group, shift, padding is not None, positions is not None)  # parity_cases shares one of each
        if key not in masks:
            masks[key] = s2_reference_mask(seq_len, group, shift, padding, positions, batch)
        return masks[key]

    def reference(name: str, case: dict) -> dict:
        """Inputs (fp32 on the device, rounded through `dtype`), the reference output, its gradients."""
        if name in references:
            return references[name]
        q_heads, kv_heads = case.get("heads", (8, 2))
        generator = torch.Generator().manual_seed(len(references))
        shapes = [(batch, q_heads, seq_len, head_dim)] + [(batch, kv_heads, seq_len, head_dim)] * 2
        inputs = [torch.randn(shape, generator=generator).to(dtype).float().to(device) for shape in shapes]
        grad_out = torch.randn(batch, seq_len, q_heads, head_dim, generator=generator).to(dtype).float().to(device)
        padding, positions = case.get("padding_mask"), case.get("position_ids")
        if case.get("causal"):
            mask = torch.ones(seq_len, seq_len, dtype=torch.bool).tril().expand(batch, 2, seq_len, seq_len)
            halves = 2 if case["causal"] == "all" else 1  # the S² mask of the halves that must be plain causal
            same = torch.equal(dense_mask(case["group"], case["shift"], None, None)[:, :halves], mask[:, :halves])
        else:
            mask, same = dense_mask(case["group"], case["shift"], padding, positions), None
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = reference_attention(*leaves, mask.to(device), scaling)  # (B, N, Hq, D)
        if padding is not None:
            out = out * padding.to(device)[:, :, None, None]
        grads = torch.autograd.grad(out, leaves, grad_out)
        references[name] = {"inputs": inputs, "grad_out": grad_out, "out": out.detach(), "grads": grads}
        if same is not None:
            references[name]["reference_mask_is_causal"] = same
        return references[name]

    results: dict = {}
    for backend in backends:
        started = time.perf_counter()
        per_case: dict = {}
        for name, case in cases.items():
            if backend == "flex_attention" and case.get("heads"):
                per_case[name] = {"skipped": "another flex compilation (other head counts): GQA is covered above"}
                continue
            ref = reference(name, case)
            leaves = [t.to(dtype).requires_grad_() for t in ref["inputs"]]
            padding, positions = case.get("padding_mask"), case.get("position_ids")
            layout = build_s2_layout(
                seq_len,
                batch,
                case["group"],
                case["shift"],
                padding_mask=None if padding is None else padding.to(device),
                position_ids=None if positions is None else positions.to(device),
                device=device,
            )
            try:
                out = s2_attention(*leaves, layout, scaling, 0.0, backend)  # (B, N, Hq, D)
                grads = torch.autograd.grad(out, leaves, ref["grad_out"].to(dtype))
            except Exception as error:  # noqa: BLE001 - recorded per case, the other cases go on
                per_case[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:400]}
                continue
            pairs = {"out": (out, ref["out"])}
            if case.get("causal") == "first_half":  # only the unshifted heads are plain causal; forward only
                split = out.shape[2] - out.shape[2] // 2
                pairs = {"out_unshifted_heads": (out[:, :, :split], ref["out"][:, :, :split])}
            else:
                pairs.update({f"d{x}": (g, r) for x, g, r in zip("qkv", grads, ref["grads"], strict=True)})
            errors, ok = {}, True
            for key, (got, want) in pairs.items():
                error = (got.float() - want).abs().max().item()
                tolerance = rtol * max(1.0, want.abs().max().item())
                errors[key] = float(f"{error:.3g}")
                ok = ok and error <= tolerance  # NaN compares False: a NaN fails
            per_case[name] = {"ok": ok, "max_abs_err": errors, "tolerance_rtol": rtol}
            if "reference_mask_is_causal" in ref:
                per_case[name]["reference_mask_is_causal"] = ref["reference_mask_is_causal"]
                per_case[name]["ok"] = ok and ref["reference_mask_is_causal"] is not False
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ran = [case for case in per_case.values() if "ok" in case]
        results[backend] = {
            "ok": bool(ran) and all(case["ok"] for case in ran),
            "wall_s": round(time.perf_counter() - started, 1),  # with flex: mostly its compilations
            "max_abs_err": max((e for case in ran for e in case.get("max_abs_err", {}).values()), default=None),
            "cases": per_case,
        }
        print(json.dumps({"backend": backend, **results[backend]}), flush=True)
    failed = [backend for backend, result in results.items() if not result["ok"]]
    return {
        "status": "failed" if failed else "ok",
        "reason": f"beyond tolerance or failing: {', '.join(failed)}" if failed else None,
        "figures": {
            "device": device_name,
            "dtype": dtype_name,
            "shape": {"batch": batch, "seq_len": seq_len, "head_dim": head_dim, "heads": "8 query / 2 key-value"},
            "tolerance": f"max abs error <= {rtol} x max(1, max|reference|) per tensor",
            "backends": results,
        },
    }


# ----------------------------------------------------------------------------------------------------------
# driver: running one check in a process of its own


class Run:
    """A finished (or killed) child process: return code, output, wall time."""

    def __init__(self, returncode: int | None, stdout: str, stderr: str, wall_s: float, timed_out: bool) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr
        self.wall_s, self.timed_out = wall_s, timed_out

    def tail(self, chars: int = 3000) -> str:
        return self.stderr[-chars:]


def child_env() -> dict[str, str]:
    """The repository's root on PYTHONPATH (our package is not installed on the GPU machine), after whatever is
    there already (the carried wheels in /tmp/site must stay ahead of the image's packages); no network."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(REPO)]))
    env["PYTHONUNBUFFERED"] = "1"
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.setdefault(name, "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_process(command: list[str], timeout_s: float) -> Run:
    """Run `command` in a new session; past `timeout_s`, kill its whole process group (the benchmarks' workers
    too, which would otherwise keep GPU memory). The group is also killed after a normal exit, for any leftover."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            command, cwd=REPO, env=child_env(), stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True
        )
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        out.seek(0)
        err.seek(0)
        return Run(
            None if timed_out else proc.returncode, out.read(), err.read(), time.perf_counter() - started, timed_out
        )


def worker_command(*arguments: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *arguments]


def last_json(text: str) -> dict | None:
    """The whole of `text` as JSON (the benchmarks print one indented object), else its last JSON line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def process_failure(run: Run, timeout_s: float) -> str | None:
    if run.timed_out:
        return f"timed out after {timeout_s:.0f} s (process group killed)"
    if run.returncode:
        lines = run.stderr.strip().splitlines()
        return f"exit code {run.returncode}: {lines[-1] if lines else 'no stderr'}"[:500]
    return None


# ----------------------------------------------------------------------------------------------------------
# driver: the checks


def check_environment(args, config, timeout_s) -> dict:
    run = run_process(worker_command("--worker", "environment") + (["--dry-run"] if args.dry_run else []), timeout_s)
    result = last_json(run.stdout)
    if result is None or process_failure(run, timeout_s):
        return {"status": "failed", "reason": process_failure(run, timeout_s) or "no JSON", "stderr_tail": run.tail()}
    return result


def gpu_test_files() -> list[str]:
    """The test files that hold `gpu` tests, found by their marker (new ones are picked up)."""
    files = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        if re.search(r"mark\.gpu\b", path.read_text()):
            files.append(str(path.relative_to(REPO)))
    return files


def junit_outcomes(path: Path) -> list[dict]:
    """One {id, outcome, message} per test case of a pytest junit XML report."""
    outcomes = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or child.text or "")[:300]
                break
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        outcomes.append({"id": test_id, "outcome": outcome, "message": message})
    return outcomes


def check_pytest_gpu(args, config, timeout_s, env_figures) -> dict:
    files = gpu_test_files()
    if not files:
        return {"status": "failed", "reason": "no test file under tests/ holds a gpu test"}
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", f"--junitxml={report}"]
        run = run_process(command + files, timeout_s)
        outcomes = junit_outcomes(report) if report.exists() else []
    counts = {outcome: sum(o["outcome"] == outcome for o in outcomes) for outcome in ("passed", "skipped", "failed")}
    counts["errors"] = sum(o["outcome"] == "error" for o in outcomes)
    skip_reasons: dict[str, int] = {}
    for outcome in outcomes:
        if outcome["outcome"] == "skipped":
            skip_reasons[outcome["message"]] = skip_reasons.get(outcome["message"], 0) + 1
    # a test that needs a missing optional package must skip, not fail
    missing = [name for name, ok in (env_figures.get("importable") or {}).items() if not ok]
    not_skipping = [
        o["id"]
        for o in outcomes
        if o["outcome"] in ("failed", "error")
        and any(f"No module named '{name}" in (o["message"] or "") for name in missing)
    ]
    figures = {
        "files": files,
        **counts,
        "skip_reasons": skip_reasons,
        "missing_optional_packages": missing,
        "tests": outcomes,
        "returncode": run.returncode,
    }
    reason = process_failure(run, timeout_s) if run.timed_out else None
    if not reason and not outcomes:
        reason = f"no test outcome recorded (exit code {run.returncode})"
    if not reason and counts["failed"] + counts["errors"]:
        reason = f"{counts['failed']} failed, {counts['errors']} errors"
        if not_skipping:
            reason += f"; these need a missing package and did not skip: {', '.join(not_skipping)}"
    if not reason and run.returncode not in (0, None):
        reason = f"pytest exit code {run.returncode}"
    result = {"status": "failed" if reason else "ok", "reason": reason, "figures": figures}
    if reason:
        result["stderr_tail"] = (run.stdout + run.stderr)[-3000:]
    return result


def parity_backends(args, env_figures) -> tuple[list[str], dict[str, str]]:
    """Which backends the parity check runs, and why the others are skipped."""
    importable = env_figures.get("importable") or {}
    run, skipped = [], {}
    for backend in PARITY_BACKENDS:
        if backend == "flex_attention" and args.dry_run:
            skipped[backend] = (
                "dry run: flex_attention has no backward on CPU (torch 2.13) and compiles for ~25 s there; its CPU "
                "forward is tests/test_backends.py::test_flex_forward_matches_reference_on_cpu"
            )
        elif backend == "flex_attention" and "error" in (env_figures.get("packages", {}).get("triton") or {"error": 1}):
            skipped[backend] = "needs triton (not importable)"
        elif backend == "flash_attention_2" and args.dry_run:
            skipped[backend] = "dry run: flash_attention_2 needs CUDA and the flash_attn package"
        elif backend == "flash_attention_2" and not importable.get("flash_attn"):
            skipped[backend] = "needs flash_attn (not importable)"
        else:
            run.append(backend)
    return run, skipped


def check_parity(args, config, timeout_s, env_figures) -> dict:
    backends, skipped = parity_backends(args, env_figures)
    parity = config["parity"]
    command = worker_command(
        "--worker", "parity", "--device", config["device"], "--dtype", config["dtype"],
        "--parity-length", str(parity["seq_len"]), "--head-dim", str(parity["head_dim"]),
        "--backends", *backends,
    )  # fmt: skip
    run = run_process(command, timeout_s)
    result = last_json(run.stdout)
    failure = process_failure(run, timeout_s)
    if result is None or "status" not in result or failure:
        # keep the backends that finished before the timeout or the crash (one JSON line each)
        done = [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{"backend"')]
        unfinished = [backend for backend in backends if backend not in {line["backend"] for line in done}]
        reason = f"{failure or 'no summary'}; unfinished: {', '.join(unfinished) or 'none'}"
        backends_done = {line.pop("backend"): line for line in done}
        result = {
            "status": "failed",
            "reason": reason,
            "figures": {"backends": backends_done},
            "stderr_tail": run.tail(),
        }
    result["figures"]["skipped_backends"] = skipped
    return result


def benchmark_check(script: str, arguments: list[str], timeout_s: float) -> tuple[dict | None, str | None, Run]:
    """Run benchmarks/<script> with `arguments`; its JSON report, or why there is none."""
    run = run_process([sys.executable, str(BENCHMARKS / script), *arguments], timeout_s)
    report = last_json(run.stdout)
    failure = process_failure(run, timeout_s) or (None if report else "no JSON report on stdout")
    return report, failure, run


def dry_run_argv_check(script: str, arguments: list[str], timeout_s: float) -> dict:
    """For a benchmark a dry run cannot run: that its argument list parses (argparse stops at --help, and fails on
    an earlier bad argument first)."""
    run = run_process([sys.executable, str(BENCHMARKS / script), *arguments, "--help"], timeout_s)
    return {
        "argv": arguments,
        "argv_parses": run.returncode == 0,
        "argv_error": None if run.returncode == 0 else run.tail(500),
    }


def train_arguments(config: dict, attn: str, cases: list[str] | None, budget_s: float) -> list[str]:
    arguments = config["train"] + ["--device", config["device"], "--dtype", config["dtype"], "--attn", attn]
    arguments += ["--repeats", str(config["train_repeats"]), "--budget-s", str(int(budget_s))]
    return arguments + (["--cases", *cases] if cases else [])


def check_train_step(args, config, timeout_s, env_figures, attn: str) -> dict:
    # flex: the two longlora cases only (each compiles); the dry run too (2 cores: 4 processes cost ~15 s more)
    longlora = ["s2+longlora", "full_attention+longlora"]
    cases = longlora if attn == "flex_attention" or args.dry_run else None
    arguments = train_arguments(config, attn, cases, max(30.0, timeout_s - 60))
    if attn == "flex_attention" and args.dry_run:
        figures = dry_run_argv_check("train_step.py", arguments, timeout_s)
        reason = "dry run: flex_attention has no backward on CPU (torch 2.13); on the GPU it trains at the sizes above"
        return {"status": "skipped" if figures["argv_parses"] else "failed", "reason": reason, "figures": figures}
    report, failure, run = benchmark_check("train_step.py", arguments, timeout_s)
    if failure:
        return {"status": "failed", "reason": failure, "figures": {"argv": arguments}, "stderr_tail": run.tail()}
    keep = ("time_s", "peak_mem_mib", "forward_s", "backward_s", "optimizer_s", "warmup_s", "repeats", "error")
    figures = {
        "argv": arguments,
        "cases": {case: {k: v for k, v in values.items() if k in keep} for case, values in report["cases"].items()},
        "ratios": report.get("ratios", {}),
        "benchmark_targets": report.get("targets", {}),
        "report": report,
    }
    errors = {case: values["error"] for case, values in report["cases"].items() if "error" in values}
    reason = "; ".join(f"{case}: {error}" for case, error in errors.items())[:600] if errors else None
    return {"status": "failed" if errors else "ok", "reason": reason, "figures": figures}


def attention_cases(args, env_figures, attn: str) -> list[str]:
    if attn == "flex_attention":
        return ["full", "s2_segments_flex_attention"]
    if args.dry_run:  # a worker less on 2 cores; attention.py still checks naive_roll against the paper's roll
        return ["full", "s2_segments_sdpa"]
    cases = ["full", "s2_segments_sdpa", "naive_roll"]
    if (env_figures.get("importable") or {}).get("flash_attn"):
        cases.append("s2_segments_flash_attention_2")
    return cases


def check_attention(args, config, timeout_s, env_figures, attn: str) -> dict:
    lengths = config["attention_lengths" if attn == "sdpa" else "flex_attention_lengths"]
    arguments = ["--lengths", *map(str, lengths), "--device", config["device"], "--dtype", config["dtype"]]
    arguments += ["--repeats", str(config["attention_repeats"]), "--cases", *attention_cases(args, env_figures, attn)]
    arguments += ["--slow-s", "600"]  # flex's warm-up is its compilation: it must not cut the timed repeats
    if attn == "flex_attention" and args.dry_run:
        figures = dry_run_argv_check("attention.py", arguments, timeout_s)
        reason = "dry run: flex_attention has no backward on CPU (torch 2.13); on the GPU it runs at the sizes above"
        return {"status": "skipped" if figures["argv_parses"] else "failed", "reason": reason, "figures": figures}
    report, failure, run = benchmark_check("attention.py", arguments, timeout_s)
    if failure:
        return {"status": "failed", "reason": failure, "figures": {"argv": arguments}, "stderr_tail": run.tail()}
    per_length, errors = {}, []
    for length, result in report["results"].items():
        cases = result["cases"]
        full = cases.get("full", {})
        summary = {"cases": {}, "ratios": dict(result.get("ratios", {}))}
        for case, values in cases.items():
            if "error" in values:
                errors.append(f"{case}@{length}: {values['error']}")
            summary["cases"][case] = {
                k: values[k] for k in ("time_s", "peak_mem_mib", "warmup_s", "error") if k in values
            }
            if case != "full" and "peak_mem_mib" in values and full.get("peak_mem_mib"):
                summary["ratios"][f"mem_{case}/full"] = round(values["peak_mem_mib"] / full["peak_mem_mib"], 3)
            if case != "full" and "time_s" in values and full.get("time_s"):
                summary["ratios"][f"time_{case}/full"] = round(values["time_s"] / full["time_s"], 3)
        per_length[length] = summary
    figures = {"argv": arguments, "lengths": per_length, "benchmark_checks": report.get("checks"), "report": report}
    reason = "; ".join(errors)[:600] if errors else None
    if not reason and report.get("checks", {}).get("ok") is False:
        reason = "attention.py's naive_roll check failed"
    return {"status": "failed" if reason else "ok", "reason": reason, "figures": figures}


def check_targets(args, results: dict) -> dict:
    """The issue's targets, judged on the attention_sdpa figures at 64k (at the longest length measured if not)."""
    attention = results.get("attention_sdpa") or {}
    lengths = (attention.get("figures") or {}).get("lengths") or {}
    if not lengths:
        return {"status": "skipped", "reason": "attention_sdpa produced no figures", "figures": {}}
    at = str(TARGET_N) if str(TARGET_N) in lengths else max(lengths, key=int)
    # target name -> (the ratio it reads, the limit, whether the limit itself passes)
    wanted = {
        "time_s2_sdpa/full": ("s2_sdpa/full", f"<= {S2_TIME_TARGET}", lambda value: value <= S2_TIME_TARGET),
        "mem_s2_sdpa/full": ("mem_s2_segments_sdpa/full", "< 1", lambda value: value < 1),
    }
    if any("mem_s2_segments_flash_attention_2/full" in values["ratios"] for values in lengths.values()):
        wanted["mem_s2_flash/full"] = ("mem_s2_segments_flash_attention_2/full", "< 1", lambda value: value < 1)
    targets = {}
    for name, (key, limit, passes) in wanted.items():
        value = lengths[at]["ratios"].get(key)
        targets[name] = {
            "target": f"{limit} at N={TARGET_N}",
            "judged_at_n": int(at),
            "value": value,
            "met": None if value is None else passes(value),
            "per_n": {n: values["ratios"].get(key) for n, values in lengths.items()},
        }
    figures = {"targets": targets}
    if "mem_s2_flash/full" not in targets:
        figures["not_judged"] = {"mem_s2_flash/full": "flash_attn not importable (or a dry run): no flash case"}
    if args.dry_run:
        return {
            "status": "skipped",
            "reason": "dry run: the targets are for the GPU at 64k (values are CPU-sized)",
            "figures": figures,
        }
    if attention.get("status") != "ok":
        return {"status": "failed", "reason": "attention_sdpa failed", "figures": figures}
    missed = [name for name, target in targets.items() if target["met"] is not True]
    return {
        "status": "failed" if missed else "ok",
        "reason": f"not met: {', '.join(missed)}" if missed else None,
        "figures": figures,
    }


# name, default timeout on the GPU, in the dry run, what it needs
CHECKS = {
    "environment": (90, 60, ["torch", "packaging"]),
    "pytest_gpu": (150, 60, ["pytest", "torch", "transformers", "optional: flash_attn, bitsandbytes + trl + datasets"]),
    "s2_parity": (120, 60, ["torch", "transformers", "triton (flex_attention)", "flash_attn (flash_attention_2)"]),
    "train_step_sdpa": (150, 90, ["torch", "transformers", "peft"]),
    "attention_sdpa": (120, 60, ["torch", "transformers", "flash_attn (its flash case)"]),
    "train_step_flex_attention": (180, 30, ["torch", "transformers", "peft", "triton"]),
    "attention_flex_attention": (150, 30, ["torch", "transformers", "triton"]),
    "targets": (None, None, ["the attention_sdpa figures"]),  # judges figures: no process, no timeout
}
MIN_TIMEOUT_S = 20  # a check that would get less is skipped for the budget


def run_check(name: str, args, config, timeout_s: float, results: dict) -> dict:
    env_figures = (results.get("environment") or {}).get("figures") or {}
    if name == "environment":
        return check_environment(args, config, timeout_s)
    if name == "pytest_gpu":
        if env_figures and "error" in (env_figures.get("packages", {}).get("pytest") or {"error": 1}):
            return {"status": "skipped", "reason": "needs pytest (not importable)"}
        return check_pytest_gpu(args, config, timeout_s, env_figures)
    if name == "targets":
        return check_targets(args, results)
    if not args.dry_run and env_figures and not env_figures.get("cuda_available"):
        return {"status": "failed", "reason": "CUDA is not available (use --dry-run on a machine without a GPU)"}
    if name == "s2_parity":
        return check_parity(args, config, timeout_s, env_figures)
    if name.startswith("train_step_"):
        return check_train_step(args, config, timeout_s, env_figures, name.removeprefix("train_step_"))
    return check_attention(args, config, timeout_s, env_figures, name.removeprefix("attention_"))


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def headline(name: str, check: dict) -> str:
    """One line of figures for the table."""
    figures = check.get("figures") or {}
    if check["status"] == "skipped" or (check["status"] == "failed" and not figures):
        return check.get("reason") or ""
    if check["status"] == "failed" and check.get("reason"):
        return f"{check['reason']} | {headline(name, {**check, 'status': 'ok'})}"
    if name == "environment":
        gpu = figures.get("gpu") or {}
        versions = {n: (figures["packages"].get(n) or {}).get("version") for n in ("torch", "transformers", "peft")}
        optional = ",".join(n for n, ok in figures.get("importable", {}).items() if ok) or "none"
        return (
            f"{gpu.get('name', 'no GPU')}; "
            + " ".join(f"{n} {v}" for n, v in versions.items())
            + f"; optional: {optional}"
        )
    if name == "pytest_gpu":
        return ", ".join(f"{figures.get(key)} {key}" for key in ("passed", "skipped", "failed", "errors"))
    if name == "s2_parity":
        parts = [
            f"{b} {'ok' if r['ok'] else 'FAIL'} (max err {r['max_abs_err']})"
            for b, r in figures.get("backends", {}).items()
        ]
        return "; ".join(parts + [f"{b} skipped" for b in figures.get("skipped_backends", {})])
    if name.startswith("train_step_"):
        r = figures.get("ratios", {})
        modes = [mode for mode in ("longlora", "full") if f"time_s2/full_attention@{mode}" in r]
        return "; ".join(
            f"{mode}: S²/full time {r[f'time_s2/full_attention@{mode}']} mem {r.get(f'mem_s2/full_attention@{mode}')}"
            for mode in modes
        )
    if name.startswith("attention_"):
        parts = []
        for length, values in (figures.get("lengths") or {}).items():
            r = values["ratios"]
            case = next((c for c in values["cases"] if c.startswith("s2_")), None)
            parts.append(f"{length}: {case}/full time {r.get(f'time_{case}/full')} mem {r.get(f'mem_{case}/full')}")
        return "; ".join(parts)
    if name == "targets":
        return "; ".join(
            f"{n} {t['value']} ({'met' if t['met'] else 'NOT met'})" for n, t in figures.get("targets", {}).items()
        )
    return ""


def print_table(report: dict) -> None:
    rows = [(c["name"], c["status"], f"{c.get('wall_s', 0):.1f}", headline(c["name"], c)) for c in report["checks"]]
    widths = [max(len(row[i]) for row in rows + [("check", "status", "wall s", "")]) for i in range(3)]
    print()
    print(f"{'check':<{widths[0]}}  {'status':<{widths[1]}}  {'wall s':>{widths[2]}}  figures / reason")
    for name, status, wall, text in rows:
        print(f"{name:<{widths[0]}}  {status:<{widths[1]}}  {wall:>{widths[2]}}  {text}")
    summary = report["summary"]
    print(
        f"\n{summary['ok']} ok, {summary['failed']} failed, {summary['skipped']} skipped in {report['total_wall_s']} s"
    )


def run_driver(args: argparse.Namespace) -> int:
    config = settings(args)
    if args.out:
        out = Path(args.out)
    else:  # $OUT is the folder whose files come back from the GPU machine
        out = Path(os.environ.get("OUT") or Path.cwd()) / "gpu_check.json"
    started = time.perf_counter()
    deadline = started + args.budget_s
    report = {
        "script": "benchmarks/gpu_check.py",
        "dry_run": args.dry_run,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "budget_s": args.budget_s,
        "settings": config,
        "finished": False,
        "checks": [],
    }
    results: dict[str, dict] = {}
    for name, (gpu_timeout, dry_timeout, needs) in CHECKS.items():
        if name not in args.steps:
            continue
        own_timeout = dry_timeout if args.dry_run else gpu_timeout
        timeout_s = None if own_timeout is None else min(own_timeout, deadline - time.perf_counter())
        print(f"[gpu_check] {name}" + ("" if timeout_s is None else f" (timeout {timeout_s:.0f} s)"), flush=True)
        check_started = time.perf_counter()
        if timeout_s is not None and timeout_s < MIN_TIMEOUT_S:
            check = {"status": "skipped", "reason": f"--budget-s {args.budget_s:g} spent before this check"}
        else:
            try:
                check = run_check(name, args, config, timeout_s, results)
            except Exception as error:  # noqa: BLE001 - a bug in one check must not stop the others
                check = {"status": "failed", "reason": f"gpu_check.py itself: {type(error).__name__}: {error}"}
        check = {"name": name, "status": check["status"], "reason": check.get("reason"), "needs": needs, **check}
        check["wall_s"] = round(time.perf_counter() - check_started, 1)
        check.setdefault("figures", {})
        results[name] = check
        report["checks"].append(check)
        print(f"[gpu_check] {name}: {check['status']} in {check['wall_s']} s {check['reason'] or ''}", flush=True)
        write_report(out, report)
    report["summary"] = {status: sum(c["status"] == status for c in report["checks"]) for status in STATUSES}
    report["total_wall_s"] = round(time.perf_counter() - started, 1)
    report["finished"] = True
    write_report(out, report)
    print_table(report)
    print(f"report: {out}")
    return 1 if report["summary"]["failed"] else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: every check's code path resolves")
    parser.add_argument(
        "--out", help="the JSON report (default: $OUT/gpu_check.json if OUT is set, else ./gpu_check.json)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=450.0, help="seconds for the whole run; later checks get less"
    )
    parser.add_argument("--steps", nargs="+", default=list(CHECKS), choices=list(CHECKS), help="checks to run")
    parser.add_argument("--parity-length", type=int, help="N of the parity check (default 512; dry run 128)")
    parser.add_argument("--train-length", type=int, help="train_step.py --length (default 32768; dry run 256)")
    parser.add_argument("--train-layers", type=int, default=4, help="train_step.py --layers of the 7b-layers preset")
    parser.add_argument("--train-repeats", type=int, default=2, help="train_step.py --repeats")
    parser.add_argument("--attention-lengths", type=int, nargs="+", help="attention.py --lengths (default 32768 65536)")
    parser.add_argument("--flex-attention-lengths", type=int, nargs="+", help="the same for flex (default 65536)")
    parser.add_argument("--attention-repeats", type=int, default=3, help="attention.py --repeats")
    # internal: one check's worker, run by the driver in a process of its own
    parser.add_argument("--worker", choices=["environment", "parity"], help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    parser.add_argument("--head-dim", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--backends", nargs="*", default=list(PARITY_BACKENDS), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(REPO))  # our package is not installed on the GPU machine
        if args.worker == "environment":
            result = environment_worker(args.dry_run)
        else:
            result = parity_worker(args.device, args.dtype, args.parity_length, args.head_dim, args.backends)
        print(json.dumps(result))
        return 0
    return run_driver(args)


if __name__ == "__main__":
    sys.exit(main())
