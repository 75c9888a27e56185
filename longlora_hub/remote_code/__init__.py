"""The LlamaLongLoRA architecture. These files are copied next to every checkpoint as remote code
(`trust_remote_code=True`), so they import only torch, transformers, the standard library and each other."""
