"""Measuring machinery shared by the benchmarks: worker processes, peak memory, timing summaries, environment.

The benchmarks run every case in its own fresh Python process (the benchmark script re-invoked with `--worker`),
so that the peak memory of one case is not hidden by the allocator caches, thread pools or high-water mark of
another. This module holds both halves of that arrangement:

- in the worker: `PeakMemory` (growth over the footprint at a chosen point, CPU or CUDA), `tensor_peak_mib` (the
  peak of torch's allocator during one step, from the profiler), `import_lazy_modules` (imports torch makes on
  first use, done before the baseline) and `serve` / `answer` (the JSON-lines protocol on stdin/stdout);
- in the driver: `Worker` (a long-lived worker stepped on demand), `run_json_process` (a one-shot worker),
  `round_robin`, `timing_summary`, `ratio` and `environment`.

The scripts are run as `python benchmarks/X.py`, so `sys.path[0]` is `benchmarks/` in the driver and in every
worker (which re-invokes the same script by path): a plain `from _measure import ...` works in both.

torch is imported inside the functions that need it, so that importing this module stays cheap for a script that
imports torch lazily (e.g. to answer `--help` fast).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# ----------------------------------------------------------------------------------------------------------
# worker side: peak memory


def rss_kib() -> int:
    """This process's resident set size now, in KiB (Linux: VmRSS of /proc/self/status)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def high_water_kib() -> int:
    """VmHWM: the peak RSS of this process's memory map, which `reset_peak_rss` resets. `ru_maxrss` is not the same:
    it also keeps the peak the kernel records whenever a thread exits (e.g. an import-time pool), which the reset
    does not clear, so after a reset it can still report an import peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark (VmHWM) (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0);
    False where the kernel refuses. Without it, VmHWM would still hold the peak of importing torch."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory growth of this process over its footprint at construction time.

    - CPU: torch's CPU allocator is plain malloc, invisible to tracemalloc, so the growth is VmHWM at the
      end minus the RSS now, with the kernel's high-water mark reset now (where the kernel allows it; `method`
      says whether it did).
    - CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus what is allocated now.

    `baseline` names the point in the words of `method`, e.g. "after inputs"; `peaks` names what an un-reset
    high-water mark may still include."""

    def __init__(self, device: str | torch.device, baseline: str, peaks: str = "import peaks") -> None:
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(self.device)  # let pending kernels allocate before the baseline is read
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = f"torch.cuda.max_memory_allocated - allocated {baseline}"
        else:
            self.base = rss_kib()  # before the reset: the RSS the high-water mark restarts from
            self.method = (
                f"VmHWM - RSS {baseline}, high-water mark reset via /proc/self/clear_refs"
                if reset_peak_rss()
                else f"VmHWM - RSS {baseline} (high-water mark NOT reset: may include {peaks})"
            )

    def peak_mib(self) -> float:
        """The peak growth since construction, in MiB rounded to 0.1."""
        if self.cuda:
            import torch

            peak = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        else:
            peak = (high_water_kib() - self.base) / 1024
        return round(peak, 1)


def import_lazy_modules() -> None:
    """Import now what torch would import inside the first measured step, so that the memory baseline already
    holds it. The first `torch.autograd.grad` given `grad_outputs` imports torch.fx's symbolic shapes and with
    them sympy: about 35 MiB of RSS that has nothing to do with the case being measured. Call it before the
    baseline, in every case alike."""
    import torch

    leaf = torch.zeros(1, requires_grad=True)
    torch.autograd.grad(leaf * 2, leaf, torch.ones(1))


def tensor_peak_mib(step: Callable[[], object], device: str | torch.device = "cpu") -> float:
    """Peak growth of the bytes held by torch's allocator during one `step()`, in MiB rounded to 0.1.

    Replayed from the memory events of `torch.profiler` (`profile_memory=True`): every tensor, and every buffer an
    op takes from torch's allocator (e.g. the flash kernel's per-thread scratch), counted from its allocation to its
    free. It does not see what glibc keeps after a free, what libraries allocate on their own (BLAS packing
    buffers, OpenMP stacks), nor allocations made on torch's worker threads (the flash kernel's small per-thread
    row sums). Those are in the RSS measure, which is why the two differ."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    device_type = torch.device(device).type
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        step()
    events = [event for event in prof.profiler.kineto_results.events() if event.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):  # stable: same-time events keep their order
        if str(event.device_type()).split(".")[-1].lower() == device_type:
            live += event.nbytes()
            peak = max(peak, live)
    return round(peak / 2**20, 1)


# ----------------------------------------------------------------------------------------------------------
# worker side: the protocol


def answer(message: dict) -> None:
    """Send one protocol line to the driver. Protocol lines are JSON objects; anything else goes to stderr (or is
    skipped by the driver), so that library output on stdout cannot break the protocol."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def serve(step: Callable[[], dict], **ready: object) -> None:
    """Answer `{"ready": true, **ready}`, then answer `step()` to every "step" line until "done" (or the end of
    stdin). The caller answers its final message (e.g. the peak memory) after this returns."""
    answer({"ready": True, **ready})
    for line in sys.stdin:
        if line.strip() == "step":
            answer(step())
        elif line.strip() == "done":
            break


# ----------------------------------------------------------------------------------------------------------
# driver side


def script_command(script: str, *arguments: str) -> list[str]:
    """The command that re-invokes `script` (a benchmark's `__file__`) with this interpreter. By path, so that the
    worker's `sys.path[0]` is `benchmarks/` too and it imports this module as the driver does."""
    return [sys.executable, os.path.abspath(script), *arguments]


def last_words(stderr: str, returncode: int | None) -> str:
    """What to report for a worker that died: the last line of its stderr (usually the exception), else its code."""
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else f"worker exited with code {returncode}"


class Worker:
    """A fresh process holding the state of one case (inputs, model, ...), stepped by the driver when it is its turn.

    `ready()` waits for the worker's first answer and keeps it (less "ready") in `info`; `step()` sends "step" and
    returns the answer; `finish()` sends "done" and returns the final answer. After the worker died, every call
    returns None (or {} from `finish`) and `error` holds its last words, so one failing case never stops the
    others."""

    def __init__(self, case: str, command: list[str]) -> None:
        self.case = case
        self.error: str | None = None
        self.info: dict = {}
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: warnings can never fill it and block
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True
        )

    def _ask(self, command: str | None) -> dict | None:
        if self.error:
            return None
        try:
            if command:
                self.proc.stdin.write(command + "\n")
                self.proc.stdin.flush()
            for line in self.proc.stdout:
                if line.startswith("{"):
                    return json.loads(line)
        except (OSError, json.JSONDecodeError):  # a closed pipe, or a worker cut off mid-line
            pass
        # the worker died (out of memory, a missing package, ...): keep its last words and the other cases
        self.proc.wait()
        self.stderr.seek(0)
        self.error = last_words(self.stderr.read(), self.proc.returncode)
        return None

    def ready(self) -> bool:
        self.info = self._ask(None) or {}
        self.info.pop("ready", None)
        return not self.error

    def step(self) -> dict | None:
        return self._ask("step")

    def finish(self) -> dict:
        answer = self._ask("done") or {}
        if self.proc.poll() is None:
            self.proc.wait()
        self.stderr.close()
        return answer


def start_workers(commands: dict[str, list[str]]) -> dict[str, Worker]:
    """One worker per case, all started before any is waited for (so that they import and build in parallel),
    then each waited for until ready. A worker that dies on the way keeps its `error`; the others go on."""
    workers = {case: Worker(case, command) for case, command in commands.items()}
    for worker in workers.values():
        worker.ready()
    return workers


def finish_workers(workers: dict[str, Worker]) -> tuple[dict[str, dict], set[str]]:
    """Send "done" to every worker; return each one's final answer less its `memory_method`, and the set of the
    memory methods they reported (one, normally), for the report's config."""
    finals, methods = {}, set()
    for case, worker in workers.items():
        final = worker.finish()
        methods.add(final.pop("memory_method", None))
        finals[case] = final
    return finals, methods - {None}


def run_json_process(command: list[str]) -> dict:
    """Run a one-shot worker to its end and return its last JSON line, or {"error": its last words}."""
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"error": last_words(done.stderr, done.returncode)}
    return json.loads(lines[-1])


def round_robin(cases: Sequence[str], round_index: int) -> list[str]:
    """The order of one round: rotated by one each round, so that no case always runs right after the same one
    (whose leftover noise, e.g. spinning OpenMP threads, would then always land on it)."""
    shift = round_index % len(cases)
    return list(cases[shift:]) + list(cases[:shift])


def timing_summary(times: Sequence[float], digits: int) -> dict:
    """`time_s` (the median: robust to one disturbed run), `min_s` and every `times_s`, rounded to `digits`."""
    return {
        "time_s": round(statistics.median(times), digits),
        "min_s": round(min(times), digits),
        "times_s": [round(t, digits) for t in times],
    }


def ratio(numerator: dict | None, denominator: dict | None, key: str = "time_s") -> float | None:
    """numerator[key] / denominator[key] rounded to 3 digits; None where a case failed or lacks the key."""
    if not numerator or not denominator or key not in numerator or key not in denominator:
        return None
    return round(numerator[key] / denominator[key], 3) if denominator[key] > 0 else None


def environment(device: str, dtype: str, cpu_capability: bool = False, gpu: bool = True) -> dict:
    """What the numbers were measured on: versions, cores, torch's threads, device and dtype; `cpu_capability`
    adds torch's SIMD level, `gpu` the GPU's name when `device` is a CUDA one."""
    import torch

    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if cpu_capability:
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    env.update(device=device, dtype=dtype)
    if gpu and device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env
