"""Small things the tests, the benchmarks and the demo share: tiny Llama models and a tokenizer built in code
(nothing is downloaded), and the reference semantics of S²-Attn written as plainly as possible.

The references here are deliberately naive (Python loops, dense N x N masks): they define what S²-Attn
means, and the fast implementations in `longlora_hub/remote_code/s2_attention.py` are tested against them.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    "The pass key is 12345. Remember it. 12345 is the pass key. What is the pass key? The pass key is "
    "0 1 2 3 4 5 6 7 8 9 10 42 100 1000 50000. Below is a paper. Memorize the paper and answer my question. "
    "A long context lets a model read whole books, papers and code bases at once. "
)


def train_bpe_tokenizer(texts, vocab_size: int, split_digits: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with `<unk>`, `<s>` (BOS) and `</s>` (EOS) as ids 0, 1, 2;
    `split_digits` makes every digit its own token, as Llama's tokenizer does. Deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=1 << 20
    )


def build_tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in code on a built-in text; deterministic, no download."""
    return train_bpe_tokenizer([FILLER] * 8, vocab_size)


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A 2-layer Llama small enough for CPU tests (about 100k parameters)."""
    values = dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A randomly initialised tiny `LlamaForCausalLM` (fp32, eval mode), reproducible from `seed`."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


# ----------------------------------------------------------------------------------------------------------
# reference semantics


def s2_reference_mask(
    seq_len: int,
    group_size: int,
    shift: str = "segments",
    padding_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    batch_size: int = 1,
) -> torch.Tensor:
    """The dense S² mask, token by token: `(B, 2, N, N)` bool, [:, 0] for the unshifted heads, [:, 1] for the
    shifted ones; True where query i may attend to key j.

    `"segments"`: i and j are real tokens of the same document, j <= i, and they share a group, where the
    group of a token is p // G (unshifted) or (p + G/2) // G (shifted) with p its position among the real
    tokens of its own document. A new document starts where `position_ids` do not go up by exactly one.

    `"none"`: as `"segments"` but the second half of the heads uses the same groups as the first.

    `"roll"`: the paper's cyclic roll; for the shifted heads token i sits at r(i) = (i - G/2) mod N and
    i may attend to j iff r(j) <= r(i) and both are in the same group of G after the roll.
    """
    g, half = group_size, group_size // 2
    mask = torch.zeros(batch_size, 2, seq_len, seq_len, dtype=torch.bool)
    for b in range(batch_size):
        if shift == "roll":
            for i in range(seq_len):
                ri = (i - half) % seq_len
                for j in range(seq_len):
                    rj = (j - half) % seq_len
                    mask[b, 0, i, j] = j <= i and i // g == j // g
                    mask[b, 1, i, j] = rj <= ri and ri // g == rj // g
            continue
        real = [True] * seq_len if padding_mask is None else [bool(x) for x in padding_mask[b]]
        if position_ids is None:
            pos = list(range(seq_len))
        else:
            pos = [int(x) for x in position_ids[b if position_ids.shape[0] > 1 else 0]]
        doc, local, current, count = [], [], -1, 0
        for i in range(seq_len):
            if i == 0 or pos[i] != pos[i - 1] + 1:
                current, count = current + 1, 0
            doc.append(current)
            local.append(count)
            count += real[i]
        for i in range(seq_len):
            for j in range(i + 1):
                if real[i] and real[j] and doc[i] == doc[j]:
                    mask[b, 0, i, j] = local[i] // g == local[j] // g
                    shift_by = 0 if shift == "none" else half
                    mask[b, 1, i, j] = (local[i] + shift_by) // g == (local[j] + shift_by) // g
    return mask


def reference_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Dense attention with a per-half mask. q: (B, Hq, N, D), k/v: (B, Hk, N, D), mask: (B, 2, N, N) from
    [`s2_reference_mask`]; the last Hq // 2 heads use mask[:, 1]. Rows with nothing to attend to (padding)
    give zeros. Returns (B, N, Hq, D)."""
    heads = query.shape[1]
    split = heads - heads // 2
    n_rep = heads // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)  # (B, Hq, N, D)
    value = value.repeat_interleave(n_rep, dim=1)
    head_mask = torch.cat(
        [mask[:, :1].expand(-1, split, -1, -1), mask[:, 1:].expand(-1, heads - split, -1, -1)], dim=1
    )  # (B, Hq, N, N)
    scores = (query @ key.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~head_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty rows -> 0
    return (probs @ value).transpose(1, 2)  # (B, N, Hq, D)


def paper_roll_s2(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group_size: int, scaling: float
) -> torch.Tensor:
    """The paper's pseudo-code, transcribed: split the heads in 2 chunks, roll the second by -G/2 on N, view as
    B*N/G groups, causal attention per group, roll the second chunk of the output back by +G/2.

    q/k/v: (B, H, N, D) with H heads each (expand GQA first), N a multiple of G. Returns (B, N, H, D)."""
    batch, heads, seq_len, dim = query.shape
    g = group_size
    qkv = torch.stack([query, key, value], dim=2).transpose(1, 3)  # (B, N, 3, H, D)
    first, second = qkv.chunk(2, 3)
    qkv = torch.cat((first, second.roll(-g // 2, 1)), 3).view(batch * seq_len // g, g, 3, heads, dim)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B*N/G, H, G, D)
    causal = torch.ones(g, g, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2)) * scaling
    out = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v  # (B*N/G, H, G, D)
    out = out.transpose(1, 2).reshape(batch, seq_len, heads, dim)  # (B, N, H, D)
    first, second = out.chunk(2, 2)
    return torch.cat((first, second.roll(g // 2, 1)), 2)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (memory-shape tests: no N x N mask, no N x vocab logits)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


# ----------------------------------------------------------------------------------------------------------
# a sharded base and a trained-looking adapter, for merge tests and the merge benchmark


def _save_in_shards(model, folder, num_shards: int, total: int) -> None:
    """Save `model` in exactly `num_shards` safetensors files of about equal size (cut where the running total
    passes each k/num_shards of the whole), with an index, like `save_pretrained` would lay them out."""
    import json
    from pathlib import Path

    from .shards import ShardWriter

    folder = Path(folder)
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    groups: list[list[tuple[str, torch.Tensor]]] = [[] for _ in range(num_shards)]
    running = 0
    for name, tensor in model.state_dict().items():
        groups[min(num_shards - 1, running * num_shards // total)].append((name, tensor))
        running += tensor.numel() * tensor.element_size()
    weight_map = {}
    for index, group in enumerate(group for group in groups if group):
        shard = f"model-{index + 1:05d}-of-{num_shards:05d}.safetensors"
        writer = ShardWriter(folder / shard, [(name, tuple(tensor.shape), tensor.dtype) for name, tensor in group])
        for name, tensor in group:
            writer.write(name, tensor)
            weight_map[name] = shard
        writer.close()
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))


def sharded_base_and_adapter(folder, num_shards: int = 8, seed: int = 0, **config_overrides):
    r"""
    Save a random Llama base split into about `num_shards` safetensors shards, and a `longlora` PEFT adapter for
    it whose LoRA B matrices, embeddings and norms are all changed (so every kind of merge step has an effect).

    Returns:
        `tuple[Path, Path]`: The base folder and the adapter folder (its config names the base folder).
    """
    from pathlib import Path

    from peft import get_peft_model

    from .trainable import lora_config

    folder = Path(folder)
    model = tiny_llama(seed, **config_overrides)
    total = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    base = folder / "base"
    _save_in_shards(model, base, num_shards, total)
    build_tiny_tokenizer(model.config.vocab_size).save_pretrained(base)
    peft_model = get_peft_model(model, lora_config("longlora"))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:  # LoRA A and B, and the trainable copies of the embeddings and norms
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    adapter = folder / "adapter"
    peft_model.save_pretrained(adapter)
    config_path = adapter / "adapter_config.json"
    import json

    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base)
    config_path.write_text(json.dumps(config, indent=2))
    return base, adapter
