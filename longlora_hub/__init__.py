"""longlora-hub: LongLoRA (shifted sparse attention, position interpolation, LoRA with trainable embeddings and
norms) for transformers, PEFT, TRL and the Hugging Face Hub."""

__version__ = "0.1.0"
