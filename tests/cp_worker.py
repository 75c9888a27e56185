"""One rank of the context-parallel tests (`tests/test_context_parallel.py`), started by `torchrun` over gloo.

    torchrun --nproc-per-node 2 tests/cp_worker.py

Every rank builds the same inputs (fixed seeds), runs S² on its shard of every row with the halo exchange, and
compares its outputs and gradients with the single-process S² run on the whole rows, computed here as well: for the
attention alone over many layouts and backends, then for a LlamaLongLoRA training step (loss and every parameter's
gradient, averaged over the ranks as DDP does). A mismatch raises; success prints `rank R ok`.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longlora_hub.remote_code import s2_flash  # noqa: E402
from longlora_hub.remote_code.s2_attention import build_s2_layout, s2_attention  # noqa: E402
from longlora_hub.remote_code.s2_context_parallel import ContextParallel, shard_layout  # noqa: E402
from tests.flash_stand_in import FlashStandIn  # noqa: E402
from tests.helpers import pair  # noqa: E402

N, DIM, SCALE = 64, 8, 8**-0.5
PAD = torch.ones(2, N, dtype=torch.long)
PAD[0, :11] = 0  # left padding across the first shard (and, with 4 ranks, into the second)
PAD[1, N - 7 :] = 0
PACK = torch.tensor([list(range(21)) + list(range(30)) + list(range(13))] * 2)
# name: (shift, group, heads (Hq, Hk), padding_mask, position_ids)
CASES = {
    "segments": ("segments", 16, (4, 2), None, None),
    "roll": ("roll", 16, (4, 2), None, None),
    "none": ("none", 16, (4, 4), None, None),
    "mqa-odd-heads": ("segments", 8, (5, 1), None, None),
    "remainder": ("segments", 12, (4, 2), None, None),  # groups cross the shard boundaries: halos of up to G - 1
    "roll-remainder": ("roll", 12, (4, 2), None, None),
    "padded": ("segments", 16, (4, 2), PAD, None),
    "packed": ("segments", 10, (6, 3), None, PACK),
}
BACKENDS = ("sdpa", "eager", "flash_attention_2")


def check_attention(parallel: ContextParallel, case: str, backend: str) -> None:
    shift, group, (q_heads, kv_heads), pad, pos = CASES[case]
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, heads, N, DIM) for heads in (q_heads, kv_heads, kv_heads)]
    full = [torch.randn(shape, generator=gen, dtype=torch.float32, requires_grad=True) for shape in shapes]
    grad_out = torch.randn(2, N, q_heads, DIM, generator=gen)
    layout = build_s2_layout(N, 2, group, shift, padding_mask=pad, position_ids=pos)
    expected = s2_attention(*full, layout, SCALE, 0.0, backend)  # (B, N, Hq, D)
    expected_grads = torch.autograd.grad(expected, full, grad_out)

    shard = shard_layout(layout, parallel)
    own = slice(shard.shard.start, shard.shard.start + shard.shard.length)
    mine = [x.detach()[:, :, own].clone().requires_grad_() for x in full]
    out = s2_attention(*mine, shard, SCALE, 0.0, backend)  # (B, n, Hq, D)
    grads = torch.autograd.grad(out, mine, grad_out[:, own])
    where = f"{case}/{backend} rank {parallel.rank} (halo {shard.shard.halo_in})"
    torch.testing.assert_close(out, expected[:, own], atol=1e-5, rtol=0, msg=where)
    for name, got, want in zip("qkv", grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want[:, :, own], atol=1e-5, rtol=0, msg=f"{where}: d{name}")


def check_halo_lengths(parallel: ContextParallel) -> None:
    """With N/P a multiple of G the halo is G/2 tokens of the shifted half (none for the unshifted one), none for
    rank 0; only the shifted heads' key/value heads send it."""
    from longlora_hub.remote_code.s2_context_parallel import kv_halo_lengths

    layout = build_s2_layout(N, 2, 8, "segments")
    shard = shard_layout(layout, parallel).shard
    assert shard.halo_in_halves == (0, 0 if parallel.rank == 0 else 4), shard.halo_in_halves
    assert shard.halo_out_halves == (0, 0 if parallel.rank == parallel.size - 1 else 4), shard.halo_out_halves
    assert kv_halo_lengths((0, 4), 8, 4) == [0, 0, 4, 4]  # GQA: kv heads 2, 3 serve the shifted query heads 4..7
    assert kv_halo_lengths((0, 4), 6, 2) == [0, 4]
    assert kv_halo_lengths((0, 4), 6, 3) == [0, 4, 4]  # kv head 1 serves query heads 2 (unshifted) and 3 (shifted)


def check_training_step(parallel: ContextParallel, kind: str) -> None:
    """A LlamaLongLoRA step: the loss averaged over the ranks and every gradient averaged over the ranks (what DDP
    does) equal the single-process step on the whole rows."""
    _, model = pair(s2_group_size=8, s2_shift="roll" if kind == "roll" else "segments")
    model.train()
    ids = torch.randint(3, 384, (2, N), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :9] = -100
    inputs = {"input_ids": ids, "labels": labels}
    if kind == "padded":
        inputs["attention_mask"] = PAD
        labels[PAD == 0] = -100
    if kind == "packed":
        inputs["position_ids"] = PACK
    expected = model(**inputs).loss
    expected.backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    loss = model(**inputs, s2_context_parallel=parallel).loss
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    where = f"training step ({kind}) rank {parallel.rank}"
    torch.testing.assert_close(mean_loss / parallel.size, expected.detach(), atol=1e-5, rtol=0, msg=where)
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad / parallel.size, expected_grads[name], atol=1e-5, rtol=0, msg=name)


def check_fsdp2_step() -> None:
    """FSDP2 as `recipes/accelerate/fsdp2.yaml` sets it up (each decoder layer a unit, resharded after the forward,
    activation checkpointing), over every process, with context-parallel groups of 2 from the recipe's own
    `enable_context_parallel`: with 4 processes, 2 groups (data parallel over them) each train on their own batch.
    FSDP's averaged gradients equal the single-process mean of the groups' batches."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from longlora_hub.training import enable_context_parallel

    world, rank = dist.get_world_size(), dist.get_rank()
    _, model = pair(s2_group_size=8)
    model.train()
    batches = []
    for group in range(world // 2):  # the batch of each context-parallel group
        ids = torch.randint(3, 384, (2, N), generator=torch.Generator().manual_seed(10 + group))
        labels = ids.clone()
        labels[group, : 5 + group] = -100
        batches.append({"input_ids": ids, "labels": labels})
    expected = [model(**batch).loss for batch in batches]
    (sum(expected) / len(expected)).backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}

    sharded = copy.deepcopy(model)
    sharded.zero_grad(set_to_none=True)
    sharded.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    mesh = init_device_mesh("cpu", (world,))
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(sharded, mesh=mesh, reshard_after_forward=True)
    parallel = enable_context_parallel(sharded, 2)
    fed = []  # the row lengths the model is fed: half of every row (the test cannot pass with the sharding off)
    sharded.get_input_embeddings().register_forward_pre_hook(lambda module, inputs: fed.append(inputs[0].shape[-1]))
    loss = sharded(**batches[rank // 2]).loss  # the model attribute: as the trainer sets it
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    where = f"FSDP2 step rank {rank} (context-parallel rank {parallel.rank})"
    assert fed == [N // 2], (where, fed)
    want = sum(value.detach() for value in expected) / len(expected)
    torch.testing.assert_close(mean_loss / world, want, atol=1e-5, rtol=0, msg=where)
    for name, param in sharded.named_parameters():
        assert type(param).__name__ == "DTensor", f"{name} is not sharded"
        torch.testing.assert_close(param.grad.full_tensor(), expected_grads[name], atol=1e-5, rtol=0, msg=name)


def main() -> None:
    dist.init_process_group("gloo")
    parallel = ContextParallel()
    # flash-attn's varlen kernel, in pure torch (tests/flash_stand_in.py), in float32
    stand_in = FlashStandIn(strict=False)
    s2_flash._flash_varlen_func = lambda: stand_in
    s2_flash._FLASH_KERNEL_DTYPES = (torch.float32,)
    check_halo_lengths(parallel)
    for case in CASES:
        for backend in BACKENDS:
            check_attention(parallel, case, backend)
    for kind in ("plain", "roll", "padded", "packed"):
        check_training_step(parallel, kind)
    if parallel.size % 2 == 0:
        check_fsdp2_step()
    dist.barrier()
    print(f"rank {parallel.rank} ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
