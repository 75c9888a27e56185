"""S²-aware context parallelism: what each rank sends per layer, against ring attention, and its memory per rank.

Three parts, one JSON object on stdout (progress on stderr):

1. `computed`: bytes one rank sends per layer per training step (forward and backward) for Llama-2-7B attention
   (32 key/value heads of 128, bf16), with a fixed S² group of `--group` tokens (`s2_group_size`), at N = 16k ... 1M
   tokens and P = 2 ... 64 ranks. The halo exchange sends G/2 tokens' keys and values of the shifted half's
   key/value heads forward and their gradient back: 2 x (G/2) x 2 x (Hk/2) x D x 2 bytes, whatever N and P. A ring
   (ring attention over all K/V blocks) passes the P - 1 other shards' keys and values forward, and in the backward
   their keys, values and the dK/dV accumulators: about 3 x (P - 1) x (N/P) x 2 x Hk x D x 2 bytes per rank. Cells
   where a group would span more than two ranks (G/2 > N/P) are left out: the halo exchange refuses them.
2. `measured`: the same count read off the messages that `torch.distributed` actually sends, in 2 and 4 CPU
   processes (gloo, started with torchrun) running a LlamaLongLoRA training step with context parallelism, with the
   per-rank peak of torch's allocator during the step (`tensor_peak_mib`), against one process holding whole rows.
3. `fits_on_8x80GB`: the longest sequence a 7B model trains at on 8 x 80 GB GPUs with context parallelism over the 8,
   COMPUTED from the measured per-token activation memory of part 2 (scaled from its small model to 7B's hidden size
   and 32 layers, bf16, activation checkpointing) and a stated budget for weights and optimizer state. An estimate,
   not a run.

Usage: `.venv/bin/python benchmarks/context_parallel.py [--lengths 4096 8192] [--ranks 2 4]`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

KV_HEADS, HEAD_DIM, BYTES = 32, 128, 2  # Llama-2-7B attention, bf16
LENGTHS = [2**k for k in range(14, 21)]  # 16k ... 1M
RANKS = [2, 4, 8, 16, 32, 64]
# the small model of the measured runs: 4 layers, hidden 256 (8 heads of 32, 4 key/value heads)
SMALL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
# 7B: hidden 4096, 32 layers; per GPU, what is not activations: bf16 weights (13.5 GB, replicated: LoRA trains a few
# matrices plus embeddings and norms), their fp32 Adam state and gradients (embeddings + norms + LoRA, about 0.3B
# parameters x 16 bytes = 4.8 GB), and 6 GB for the CUDA context, the allocator's slack and communication buffers
GPU_BYTES, FIXED_BYTES = 80e9, 13.5e9 + 4.8e9 + 6e9


def halo_bytes(group: int) -> int:
    """Bytes one rank sends per layer per step: G/2 tokens' k and v of the shifted half's heads forward, their
    gradient back."""
    return 2 * (group // 2) * 2 * (KV_HEADS // 2) * HEAD_DIM * BYTES


def ring_bytes(length: int, ranks: int) -> int:
    """Bytes one rank sends per layer per step in ring attention: P - 1 shards of k/v forward; k/v and dk/dv back."""
    return 3 * (ranks - 1) * (length // ranks) * 2 * KV_HEADS * HEAD_DIM * BYTES


def computed(group: int) -> list[dict]:
    rows = []
    for length in LENGTHS:
        for ranks in RANKS:
            if group // 2 > length // ranks:
                continue
            halo, ring = halo_bytes(group), ring_bytes(length, ranks)
            rows.append(
                {"N": length, "P": ranks, "halo_MiB": halo / 2**20, "ring_MiB": ring / 2**20, "ring/halo": ring / halo}
            )
    return rows


# ----------------------------------------------------------------------------------------------------------
# measured: one rank of a torchrun group


def worker(length: int, group: int, layers: int, out: Path) -> None:
    """A LlamaLongLoRA training step on this rank's shard of one row of `length` tokens, counting the bytes of every
    point-to-point message this rank sends and the allocator's peak."""
    import torch
    import torch.distributed as dist
    from _measure import tensor_peak_mib

    from longlora_hub.remote_code.s2_context_parallel import ContextParallel
    from longlora_hub.testing import tiny_llama_config
    from tests.helpers import longlora_from

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    shape = {**SMALL, "num_hidden_layers": layers}
    stock = LlamaForCausalLM(tiny_llama_config(**shape, max_position_embeddings=length, vocab_size=384))
    model = longlora_from(stock, "sdpa", s2_group_size=group).train()
    model.activation_checkpointing_enable()
    # only activations: the weights are frozen and the gradient is taken down to the input embeddings
    model.requires_grad_(False)
    parallel = ContextParallel() if dist.get_world_size() > 1 else None
    ids = torch.randint(3, 384, (1, length), generator=torch.Generator().manual_seed(1))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    sent = []
    send = dist.batch_isend_irecv

    def counting(ops):  # every message this rank sends, in bytes
        sent.extend(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        return send(ops)

    dist.batch_isend_irecv = counting

    def step():
        embeds.grad = None
        model(inputs_embeds=embeds, labels=ids, s2_context_parallel=parallel).loss.backward()

    step()  # warm-up (first-call allocations)
    sent.clear()
    peak = tensor_peak_mib(step)
    head_bytes = 2 * (SMALL["hidden_size"] // SMALL["num_attention_heads"]) * 4  # k and v of one head, fp32
    halo_in = halo_out = 0
    if parallel is not None:  # summed over the key/value heads, each with its own halo
        from longlora_hub.remote_code.s2_attention import build_s2_layout
        from longlora_hub.remote_code.s2_context_parallel import kv_halo_lengths, shard_layout

        shard = shard_layout(build_s2_layout(length, 1, group), parallel).shard
        heads = SMALL["num_attention_heads"], SMALL["num_key_value_heads"]
        halo_in = sum(kv_halo_lengths(shard.halo_in_halves, *heads))
        halo_out = sum(kv_halo_lengths(shard.halo_out_halves, *heads))
    record = {
        "rank": dist.get_rank(),
        "ranks": dist.get_world_size(),
        "N": length,
        "G": group,
        "sent_bytes_per_layer": sum(sent) / layers,
        # forward and its recomputation (activation checkpointing) send the suffix; the backward sends the halo's
        # gradient back
        "halo_formula_bytes_per_layer": (2 * halo_out + halo_in) * head_bytes,
        "halo_tokens": [halo_in, halo_out],
        "messages": len(sent),
        "peak_tensor_MiB": peak,
    }
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(length: int, ranks: int, group: int, scratch: Path, layers: int = SMALL["num_hidden_layers"]) -> list[dict]:
    out = scratch / f"n{length}-p{ranks}-l{layers}"
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--master-addr=127.0.0.1",
        f"--master-port={free_port()}", __file__, "--worker", str(length), str(group), str(layers), str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode:
        raise RuntimeError(f"N={length} P={ranks} failed:\n{result.stderr[-3000:]}")
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(ranks)]


def fits(per_layer: float, rest: float) -> dict:
    """The 7B estimate from the small model's measured activation bytes per token per rank: `per_layer` (what each
    checkpointed layer keeps) and `rest` (the one layer being recomputed, the embeddings, the loss)."""
    width, dtype = 4096 / SMALL["hidden_size"], BYTES / 4  # 7B's hidden size (and MLP: 11008/688 alike), bf16
    per_token = (32 * per_layer + rest) * width * dtype
    per_gpu_tokens = (GPU_BYTES - FIXED_BYTES) / per_token
    return {
        "measured_bytes_per_token_per_layer_small_fp32": round(per_layer),
        "measured_bytes_per_token_rest_small_fp32": round(rest),
        "scaled_bytes_per_token_7b_bf16": round(per_token),
        "fixed_bytes_per_gpu": FIXED_BYTES,
        "tokens_per_gpu": int(per_gpu_tokens),
        "sequence_on_8_gpus": int(8 * per_gpu_tokens),
        "how": "computed, not run: the small model's measured activation bytes per token per rank (2 and 4 layers, "
        "activation checkpointing), scaled to 32 layers, hidden size 4096 (x16) and bf16 (x1/2); the rest includes "
        "the small model's 384-entry logits, scaled with the width (7B's 32000-entry logits assumed never "
        "materialised whole, as with TRL's fused LM head); the fixed per-GPU budget above",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192], help="measured row lengths")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="measured process counts")
    parser.add_argument("--group", type=int, default=8192, help="S² group of the computed table (tokens)")
    parser.add_argument("--measured-group", type=int, default=1024, help="S² group of the measured runs")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/longlora-cp-bench"))
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(int(args.worker[0]), int(args.worker[1]), int(args.worker[2]), Path(args.worker[3]))
        return
    report = {"computed": {"group": args.group, "rows": computed(args.group)}, "measured": []}
    for length in args.lengths:
        whole = measure(length, 1, args.measured_group, args.scratch)[0]
        for ranks in args.ranks:
            print(f"measuring N={length} P={ranks}", file=sys.stderr, flush=True)
            records = measure(length, ranks, args.measured_group, args.scratch)
            peak = max(record["peak_tensor_MiB"] for record in records)
            report["measured"].append(
                {
                    "N": length,
                    "P": ranks,
                    "G": args.measured_group,
                    "sent_bytes_per_layer_per_rank": [record["sent_bytes_per_layer"] for record in records],
                    "halo_formula_bytes_per_layer_per_rank": [
                        record["halo_formula_bytes_per_layer"] for record in records
                    ],
                    "peak_tensor_MiB_per_rank": peak,
                    "peak_tensor_MiB_one_process": whole["peak_tensor_MiB"],
                }
            )
    # activation bytes per token per rank at 2 and 4 layers (the longest length, the most ranks): per layer and rest
    length, ranks = max(args.lengths), max(args.ranks)
    peaks = {
        layers: max(r["peak_tensor_MiB"] for r in measure(length, ranks, args.measured_group, args.scratch, layers))
        * 2**20
        / (length // ranks)
        for layers in (2, 4)
    }
    per_layer = (peaks[4] - peaks[2]) / 2
    report["fits_on_8x80GB"] = fits(per_layer, peaks[2] - 2 * per_layer)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
