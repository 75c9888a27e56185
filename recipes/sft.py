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
```

The YAML fills the dataclasses below and TRL's `SFTConfig`; command-line flags override it; unknown keys are
errors. The logic lives in `longlora_hub/training.py`.
"""

from accelerate import PartialState
from trl import SFTConfig, SFTTrainer, TrlParser

from longlora_hub.training import (
    DataArguments,
    LongLoRAArguments,
    ModelArguments,
    TokensPerSecondCallback,
    build_dataset,
    check_arguments,
    data_collator,
    load_model_and_tokenizer,
    peft_config,
    prepare_base,
    write_run_record,
)


def main(argv: list[str] | None = None) -> SFTTrainer:
    parser = TrlParser((ModelArguments, LongLoRAArguments, DataArguments, SFTConfig))
    model_args, ll_args, data_args, training_args = parse(parser, argv)
    check_arguments(model_args, ll_args, data_args, training_args)
    training_args.include_num_input_tokens_seen = True

    # the first process of each machine converts, the others then read its output (shared storage or not)
    with PartialState().local_main_process_first():
        base = prepare_base(model_args, ll_args, training_args.output_dir, training_args.max_length)
        model, tokenizer = load_model_and_tokenizer(base, model_args, ll_args, data_args, training_args.max_length)
        dataset = build_dataset(data_args, ll_args, tokenizer, training_args.max_length)

    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=data_collator(data_args, tokenizer, training_args),  # padding-free with keep_documents_apart
        processing_class=tokenizer,
        peft_config=peft_config(ll_args),
        callbacks=[TokensPerSecondCallback()],
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if trainer.is_fsdp_enabled:  # a sharded state dict saves no adapter: gather the full one for the final save
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(training_args.output_dir)  # one PEFT folder: LoRA + embeddings + norms
    if trainer.is_world_process_zero():
        trainer.save_state()  # trainer_state.json: the losses and steps a model card summarizes
        write_run_record(training_args.output_dir, base, model_args, ll_args, data_args, training_args)
    return trainer


def parse(parser: TrlParser, argv: list[str] | None):
    """TRL's parser, with the valid keys listed when a YAML key is unknown."""
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as error:
        if "Unknown arguments" not in str(error):
            raise
        valid = sorted(action.dest for action in parser._actions if action.dest not in ("help", "config"))
        raise SystemExit(f"{error}\nValid keys: {', '.join(valid)}") from None


if __name__ == "__main__":
    main()
