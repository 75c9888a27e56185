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

from longlora_hub.remote_code.s2_attention import build_s2_layout, s2_attention
from longlora_hub.remote_code.s2_context_parallel import shard_layout

from .cp_worker import CASES, DIM, SCALE, N
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


def test_a_shard_receives_only_the_group_its_first_token_continues():
    """Under the roll the last rank precedes rank 0. Of its tokens rank 0 needs the wrapped group's (10 with G = 12
    at N = 64), not those of the unshifted group that runs from rank 0 into rank 1 (which come after rank 0's in
    causal order). The halo used to count them: 32 tokens, the whole shard."""
    layout = build_s2_layout(64, 1, 12, "roll")
    assert shard_layout(layout, Ranks(2, 0)).shard.halo_in_halves == (0, 10)
    assert shard_layout(layout, Ranks(2, 1)).shard.halo_in_halves == (8, 2)


@pytest.mark.parametrize("case", list(CASES))
def test_flex_attends_a_shards_window_as_sdpa_does(case):
    """A shard's S² is the halo exchange (tests/cp_worker.py) and then any backend over the window [halo, own]:
    FlexAttention (forward only: it has no CPU backward) gives sdpa's output on every window of every rank at P = 2
    and 4. The window's groups are its runs, so a group that the halo holds without continuing it (the roll's
    unshifted one, for another row or half) is not joined to this shard's tokens of the same group."""
    shift, group, (q_heads, kv_heads), pad, pos = CASES[case]
    layout = build_s2_layout(N, 2, group, shift, padding_mask=pad, position_ids=pos)
    gen = torch.Generator().manual_seed(0)
    for size in (2, 4):
        for rank in range(size):
            window = shard_layout(layout, Ranks(size, rank)).shard.window
            q, k, v = (
                torch.randn(2, heads, window.seq_len, DIM, generator=gen) for heads in (q_heads, kv_heads, kv_heads)
            )
            with torch.no_grad():
                want = s2_attention(q, k, v, window, SCALE, 0.0, "sdpa")
                got = s2_attention(q, k, v, window, SCALE, 0.0, "flex_attention")
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=f"P={size} rank {rank}")


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


@pytest.fixture(scope="module")
def single_extend_run(tmp_path_factory) -> Path:
    """The tiny extend recipe's 3 steps in one process, rows padded as a 2-process context-parallel run pads them."""
    out = tmp_path_factory.mktemp("single-extend")
    run_recipe(out, [sys.executable], "extend", "--pad_to_multiple_of", "2")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["extend", "longqa"])
def test_recipe_with_context_parallel_size_2_trains_the_single_process_adapter(tmp_path, single_extend_run, stage):
    """`context_parallel_size: 2` on 2 processes (gloo): both read the same rows, each trains on its half of them
    with the halo exchange, and after 3 steps the adapter is the one a single process trains on whole rows. The
    longqa rows are padded to the batch's longest, rounded up to a multiple of 2 (which the recipe sets itself under
    context parallelism, and the single process is given, so that both get the same S² groups)."""
    if stage == "extend":
        single = torch.load(single_extend_run / "rank0.pt")
    else:
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


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_recipe_with_context_parallel_size_2_under_deepspeed_trains_the_single_process_adapter(
    tmp_path, single_extend_run, zero
):
    """`recipes/accelerate/zero2.yaml` and `zero3.yaml` as shipped (2 processes, no mixed precision, on the CPU over
    gloo) with `context_parallel_size: 2`: the adapter saved at the end is the one a single process trains. ZeRO-3
    partitions every weight over the 2 processes from the load on (`zero3_init_flag`), which made the recipe hang
    while the main process loaded the model alone; the final save gathers the adapter (`zero3_save_16bit_model`)."""
    from safetensors.torch import load_file

    single_dir, sharded_dir = single_extend_run, tmp_path / zero
    config = ROOT / "recipes" / "accelerate" / f"{zero}.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    launch += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0"]
    # on the CPU: accelerate uses DeepSpeed only off `use_cpu`, and without CUDA it needs the backend named
    cpu = ("--use_cpu", "false", "--ddp_backend", "gloo")
    record = run_recipe(sharded_dir, launch, "extend", *cpu, "--context_parallel_size", "2")
    assert record["distributed_type"] == "DistributedType.DEEPSPEED" and record["world_size"] == 2
    assert record["train_row_lengths"] == [256]  # half of every 512-token row
    if zero == "zero3":  # each process holds a part of every weight, the frozen ones included
        assert record["zero3_partitioned"] == record["parameters"]
    single, sharded = (load_file(folder / "adapter_model.safetensors") for folder in (single_dir, sharded_dir))
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
