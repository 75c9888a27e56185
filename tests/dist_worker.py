"""One rank of the multi-process training test (`tests/test_recipes.py`), started by `accelerate launch` or
`torchrun`: runs `recipes/sft.py` with the given arguments, then writes what this rank ended with.

    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml tests/dist_worker.py \
        --config recipes/configs/tiny/extend.yaml --output_dir /tmp/run --max_steps 4 ...

Each rank saves `{output_dir}/rank{R}.pt` = {"rank", "world_size", "backend", "distributed_type",
"train_row_lengths", "parameters", "zero3_partitioned", "weights": {name: tensor}}: the lengths of the rows its
embedding saw in training, the names of all the parameters of its (unwrapped) PEFT model and of those ZeRO-3 gave
it a part of, and the trainable ones' values; then prints `rank R done`.
"""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_recipe():
    spec = importlib.util.spec_from_file_location("sft_recipe", ROOT / "recipes" / "sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str]) -> None:
    import torch
    import torch.distributed as dist

    recipe = load_recipe()
    trainer, base, arguments = recipe.prepare(argv)
    # the row lengths the model is fed while training: a shard's under context parallelism, else a whole row's
    lengths = set()
    embedding = trainer.model.get_input_embeddings()
    embedding.register_forward_pre_hook(
        lambda module, inputs: lengths.add(inputs[0].shape[-1]) if module.training else None
    )
    recipe.train(trainer, base, arguments)
    args = trainer.args
    distributed = dist.is_available() and dist.is_initialized()
    record = {
        "rank": args.process_index,
        "world_size": dist.get_world_size() if distributed else 1,
        "backend": dist.get_backend() if distributed else None,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "train_row_lengths": sorted(lengths),
        "parameters": sorted(name for name, _ in trainer.model.named_parameters()),
        # the parameters of which ZeRO-3 gave this process a part
        "zero3_partitioned": sorted(
            name
            for name, param in trainer.model.named_parameters()
            if hasattr(param, "ds_tensor") and param.ds_tensor.numel() < param.ds_numel
        ),
        "weights": {
            name: param.detach().cpu().clone()
            for name, param in trainer.model.named_parameters()
            if param.requires_grad
        },
    }
    torch.save(record, Path(args.output_dir) / f"rank{args.process_index}.pt")
    if distributed:
        dist.barrier()  # both files exist before either process exits
    print(f"rank {args.process_index} done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
