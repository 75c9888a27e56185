"""S²-aware context parallelism: each row's tokens split over P ranks, with a halo exchange of keys and values.

The exactness proof runs in 2 and 4 processes over gloo (`tests/cp_worker.py`): outputs, gradients, a model's loss
and every parameter's gradient equal the single-process S² run, for segments and roll, GQA/MQA, remainder groups,
padding and packing, on the sdpa, eager and flash (stand-in) paths. The refusals are checked here, in one process."""

import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longlora_hub.remote_code.s2_attention import build_s2_layout
from longlora_hub.remote_code.s2_context_parallel import shard_layout

from .helpers import HANG_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 4])
def test_sharded_s2_equals_the_single_process_run(ranks):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={ranks}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        str(ROOT / "tests" / "cp_worker.py"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=HANG_TIMEOUT_S, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    # the ranks' lines may interleave on the shared stdout
    assert sorted(int(rank) for rank in re.findall(r"rank (\d+) ok", result.stdout)) == list(range(ranks))


class Ranks:
    """A stand-in for `ContextParallel` in one process: the size and rank a shard is laid out for (no messages are
    sent while laying out)."""

    def __init__(self, size: int, rank: int = 0):
        self.size, self.rank = size, rank

    def global_rank(self, rank: int) -> int:
        return rank


def test_the_halo_is_half_a_group_whatever_the_length():
    """N/P a multiple of G: the unshifted groups stay on one rank, each shifted one starts G/2 before a boundary."""
    for seq_len, size in ((1024, 4), (4096, 8), (4096, 2)):
        layout = build_s2_layout(seq_len, 1, 64, "segments")
        for rank in range(size):
            shard = shard_layout(layout, Ranks(size, rank)).shard
            # only the shifted half has one
            assert shard.halo_in_halves == (0, 32 * (rank > 0))
            assert shard.halo_out_halves == (0, 32 * (rank < size - 1))
    # the roll wraps the row's end onto its start: rank 0 receives from the last rank
    shard = shard_layout(build_s2_layout(1024, 1, 64, "roll"), Ranks(4, 0)).shard
    assert (shard.halo_in_halves, shard.halo_out_halves) == ((0, 32), (0, 32))
    # padding moves the groups off the shard boundaries: the unshifted half needs a halo too
    pad = torch.ones(1, 1024, dtype=torch.long)
    pad[0, :10] = 0
    shard = shard_layout(build_s2_layout(1024, 1, 64, padding_mask=pad), Ranks(4, 1)).shard
    assert shard.halo_in_halves == (54, 22)  # token 256 is real token 246: groups from 192 and from 224


def test_rows_that_do_not_split_evenly_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"context_parallel_size=4 must divide.*66 tokens.*multiple of 4"):
        shard_layout(build_s2_layout(66, 1, 8), Ranks(4))


def test_shards_shorter_than_half_a_group_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"8 tokens per rank, fewer than half an S² group.*at most 4"):
        shard_layout(build_s2_layout(64, 1, 32), Ranks(8))


def test_a_group_across_three_ranks_is_refused():
    """Padding inside a row can stretch one group over three shards: refused, not computed wrong."""
    pad = torch.ones(1, 64, dtype=torch.long)
    pad[0, 18:46] = 0  # a group of 16 real tokens now runs from token 10 to token 53
    with pytest.raises(ValueError, match=r"spans ranks \[\d, \d, \d\].*Use fewer ranks"):
        shard_layout(build_s2_layout(64, 1, 16, padding_mask=pad), Ranks(4))


def run_recipe(out: Path, launcher: list[str], stage: str, *extra: str) -> dict:
    """A tiny recipe through tests/dist_worker.py; returns rank 0's record (its trainable weights and the row lengths
    its model was fed)."""
    config = ROOT / "recipes" / "configs" / "tiny" / f"{stage}.yaml"
    lengths = ("--max_length", "512", "--context_length", "512") if stage == "extend" else ()
    command = [
        *launcher,
        str(ROOT / "tests" / "dist_worker.py"),
        "--config",
        str(config),
        "--output_dir",
        str(out),
        *lengths,
        "--max_steps",
        "3",
        "--save_steps",
        "3",
        "--logging_steps",
        "1",
        "--disable_tqdm",
        "true",
        *extra,
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S, start_new_session=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return torch.load(out / "rank0.pt")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["extend", "longqa"])
def test_recipe_with_context_parallel_size_2_trains_the_single_process_adapter(tmp_path, stage):
    """`context_parallel_size: 2` on 2 processes (gloo): both read the same rows, each trains on its half of them
    with the halo exchange, and after 3 steps the adapter is the one a single process trains on whole rows. The
    longqa rows are padded to the batch's longest, rounded up to a multiple of 2 (which the recipe sets itself under
    context parallelism, and the single process is given, so that both get the same S² groups)."""
    single = run_recipe(tmp_path / "single", [sys.executable], stage, "--pad_to_multiple_of", "2")
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    sharded = run_recipe(
        tmp_path / "cp2",
        [*accelerate, str(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml")],
        stage,
        "--context_parallel_size",
        "2",
    )
    # each process fed its model half of every row
    assert sharded["train_row_lengths"] == [length // 2 for length in single["train_row_lengths"]]
    if stage == "extend":
        assert single["train_row_lengths"] == [512]
    single, sharded = single["weights"], sharded["weights"]
    assert single.keys() == sharded.keys() and single
    for name, weight in single.items():
        torch.testing.assert_close(sharded[name], weight, atol=1e-5, rtol=0, msg=name)


def test_benchmark_counts_a_constant_halo_against_a_growing_ring():
    """benchmarks/context_parallel.py's computed table: the halo does not grow with N or P, a ring does, and the
    configurations the halo exchange refuses (G/2 > N/P) are not in it."""
    spec = importlib.util.spec_from_file_location("cp_bench", ROOT / "benchmarks" / "context_parallel.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.computed(8192)
    assert {row["halo_MiB"] for row in rows} == {64.0}  # 2 x 4096 tokens x 16 shifted kv heads x 128 x (k, v) x 2 B
    assert all(row["N"] // row["P"] >= 4096 for row in rows)
    assert (16384, 8) not in {(row["N"], row["P"]) for row in rows}
    by_cell = {(row["N"], row["P"]): row["ring/halo"] for row in rows}
    assert by_cell[(16384, 2)] == 6.0 and by_cell[(2**20, 64)] > by_cell[(2**20, 8)] > by_cell[(2**17, 8)]
