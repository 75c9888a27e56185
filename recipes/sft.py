"""LongLoRA training on TRL's SFTTrainer: context extension (`stage: extend`) and LongQA SFT (`stage: longqa`).

Launch:

```bash
# one GPU (or CPU)
accelerate launch recipes/sft.py --config recipes/configs/llama-2-7b/8k_extend.yaml
# 8 GPUs with DeepSpeed ZeRO-2, overriding a value from the YAML
accelerate launch --config_file recipes/accelerate/zero2.yaml recipes/sft.py \
    --config recipes/configs/llama-2-7b/32k_extend.yaml --output_dir runs/7b-32k
# the tiny CPU recipes
python recipes/sft.py --config recipes/configs/tiny/extend.yaml
python recipes/sft.py --config recipes/configs/tiny/longqa.yaml
# the same code from an installed package (a config by file or by name)
longlora-hub train --config tiny/extend
accelerate launch -m longlora_hub.train --config smollm2-135m/32k_extend
```

The YAML fills the dataclasses below and TRL's `SFTConfig`; command-line flags override it; unknown keys are
errors. A mistake in the configuration, the data or a checkpoint stops the run before its first step with one line
that names the fix (exit status 1). The logic lives in `longlora_hub/training.py`.
"""

import argparse
import difflib
import sys
from pathlib import Path

from accelerate import PartialState
from trl import SFTConfig, SFTTrainer, TrlParser

from longlora_hub.recipes import config_path
from longlora_hub.trainable import check_trainable, promised_trainable
from longlora_hub.training import (
    RENAMED_KEYS,
    DataArguments,
    LongLoRAArguments,
    ModelArguments,
    TokensPerSecondCallback,
    add_shard_labels,
    build_dataset,
    check_arguments,
    data_collator,
    enable_context_parallel,
    load_data,
    load_model_and_tokenizer,
    peft_config,
    prepare_base,
    set_process_verbosity,
    share_batches_within_context_groups,
    write_run_record,
)


class LongLoRATrainer(SFTTrainer):
    """TRL's `SFTTrainer`; with `context_parallel_size` > 1, each row's tokens are split over that many processes
    (see `longlora_hub.remote_code.s2_context_parallel`): the processes of one group read the same batches, each with
    the labels of its shard."""

    def __init__(self, *args, context_parallel_size: int = 1, **kwargs):
        self.context_parallel_size = context_parallel_size
        super().__init__(*args, **kwargs)
        self.context_parallel = enable_context_parallel(self.model, context_parallel_size)

    def get_train_dataloader(self):
        collate, parallel = self.data_collator, self.context_parallel
        if parallel is not None:  # the training batches only: evaluation runs whole rows with full attention
            self.data_collator = lambda examples: add_shard_labels(collate(examples), parallel)
        try:
            dataloader = super().get_train_dataloader()
        finally:
            self.data_collator = collate
        return share_batches_within_context_groups(dataloader, self.context_parallel_size)


def main(argv: list[str] | None = None) -> SFTTrainer:
    return train(*prepare(argv))


def prepare(argv: list[str] | None = None) -> tuple[SFTTrainer, Path, tuple]:
    """Everything before the first step. A mistake of the user's raises `ValueError` or `OSError` naming the fix."""
    set_process_verbosity()  # the main process alone prints, from the parsing's warnings on
    parser = TrlParser((ModelArguments, LongLoRAArguments, DataArguments, SFTConfig), exit_on_error=False)
    model_args, ll_args, data_args, training_args = parse(parser, argv)
    set_process_verbosity(training_args)  # with the run's log_level and log_level_replica
    check_arguments(model_args, ll_args, data_args, training_args)  # also finds the checkpoint to resume from
    training_args.include_num_input_tokens_seen = True

    # the first process of each machine converts, the others then read its output (shared storage or not)
    state = PartialState()
    with state.local_main_process_first():
        raw = load_data(data_args)  # first: a broken data file then costs seconds, not a conversion and a model load
        base = prepare_base(model_args, ll_args, training_args.output_dir, training_args.max_length)
    # every process loads the model at the same time: under ZeRO-3's zero3_init_flag, loading partitions the weights
    # over the processes with collectives, which a process waiting for the main one would never join (a deadlock)
    model, tokenizer = load_model_and_tokenizer(base, model_args, ll_args, data_args, training_args.max_length)
    with state.local_main_process_first():  # the main process fills the datasets cache, the others read it
        dataset = build_dataset(data_args, ll_args, tokenizer, training_args.max_length, raw)
    # what `trainable` trains, read from the model before PEFT wraps it: held against PEFT's result below
    promised = promised_trainable(model, ll_args.trainable, ll_args.lora_target_modules, ll_args.lora_modules_to_save)

    trainer = LongLoRATrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=data_collator(data_args, tokenizer, training_args),  # padding-free with keep_documents_apart
        processing_class=tokenizer,
        peft_config=peft_config(ll_args),
        callbacks=[TokensPerSecondCallback()],
        context_parallel_size=ll_args.context_parallel_size,
    )
    check_trainable(trainer.model, promised, ll_args.trainable)  # a PEFT release must not change the method silently
    return trainer, base, (model_args, ll_args, data_args, training_args)


def train(trainer: SFTTrainer, base: Path, arguments: tuple) -> SFTTrainer:
    model_args, ll_args, data_args, training_args = arguments
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if trainer.is_fsdp_enabled:  # a sharded state dict saves no adapter: gather the full one for the final save
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(training_args.output_dir)  # one PEFT folder: LoRA + embeddings + norms
    if trainer.is_world_process_zero():
        trainer.save_state()  # trainer_state.json: the losses and steps a model card summarizes
        write_run_record(training_args.output_dir, base, model_args, ll_args, data_args, training_args)
    return trainer


def parse(parser: TrlParser, argv: list[str] | None):
    """TRL's parser, with the valid keys listed and the nearest one named when a YAML key or a flag is unknown, and
    `--config` taking a shipped config's name as well as a file."""
    argv = _config_by_name(sys.argv[1:] if argv is None else list(argv))
    try:
        *arguments, from_yaml, from_command_line = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except argparse.ArgumentError as error:  # a flag's value argparse cannot convert, e.g. `--lora_r 8.5`
        raise SystemExit(f"{error}; see python recipes/sft.py --help.") from None
    # the former names of renamed keys still work, but are not offered: the new names are
    valid = sorted({action.dest for action in parser._actions} - {"help", "config", *RENAMED_KEYS})
    if from_yaml:  # TRL gives them back as flags: ["--lora_rank", "8"]
        names = [key.removeprefix("--") for key in from_yaml[::2]]
        raise SystemExit(_unknown(names, "key in the YAML", "", valid))
    if from_command_line:
        names = [item.lstrip("-").split("=")[0] for item in from_command_line if item.startswith("-")]
        if not names:  # values that follow no flag, e.g. the YAML without --config in front of it
            raise SystemExit(
                f"Unexpected command-line values {from_command_line}: pass the YAML as --config FILE and every "
                "setting as --key value."
            )
        raise SystemExit(_unknown(names, "command-line argument", "--", valid))
    return arguments


def _config_by_name(argv: list[str]) -> list[str]:
    """`argv` with the value of `--config` made a file's path (`recipes.config_path`); `--config=FILE` becomes
    `--config FILE`, the one form TRL's parser reads a YAML from."""
    for index, item in enumerate(argv):
        if item == "--config" and index + 1 < len(argv):
            return [*argv[: index + 1], config_path(argv[index + 1]), *argv[index + 2 :]]
        if item.startswith("--config="):
            return [*argv[:index], "--config", config_path(item.removeprefix("--config=")), *argv[index + 1 :]]
    return argv


def _unknown(names: list[str], what: str, prefix: str, valid: list[str]) -> str:
    """One line per unknown name, with the valid key nearest to it, then the valid keys."""
    lines = []
    for name in names:
        name = name.replace("-", "_")
        # a key the name extends first (lora_rank: lora_r), then the nearest by spelling; argparse itself takes a
        # prefix of one key for that key
        near = max((key for key in valid if name.startswith(key)), key=len, default=None)
        near = near or next(iter(difflib.get_close_matches(name, valid, n=1)), None)
        hint = f" (did you mean {prefix}{near}?)" if near else ""
        lines.append(f"Unknown {what}: {prefix}{name}{hint}; remove it or correct its name.")
    return "\n".join([*lines, f"Valid keys: {', '.join(valid)}"])


def run(argv: list[str] | None = None) -> None:
    """The command line (`python recipes/sft.py`, `longlora-hub train`, `python -m longlora_hub.train`)."""
    try:
        prepared = prepare(argv)
    except (ValueError, OSError) as error:  # the configuration's, the data's or a checkpoint's: the message says
        raise SystemExit(f"error: {error}") from None  # what to change, a traceback would only bury it
    train(*prepared)


if __name__ == "__main__":
    run()
