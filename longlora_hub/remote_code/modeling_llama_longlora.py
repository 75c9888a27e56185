"""LlamaLongLoRA: a Llama whose attention uses S²-Attn while training and standard attention otherwise.

Only the attention path differs from `LlamaForCausalLM`: the model lays out the batch for S² once per
forward (so no N x N mask is built) and each attention layer runs S² with the kernel the user chose through
`attn_implementation` (eager, sdpa, flex_attention, flash_attention_2). In eval mode, with a KV cache, or
with `config.s2_attention=False`, every call goes straight to the stock Llama code, so the trained weights
serve with ordinary full attention and any engine that runs Llama.

This file is shipped as remote code: it imports only torch, transformers and its sibling files.
"""

import torch
from torch import nn
from transformers import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, apply_rotary_pos_emb

from .configuration_llama_longlora import LlamaLongLoRAConfig
from .s2_attention import S2_BACKENDS, s2_attention
from .s2_context_parallel import ContextParallel, shard_layout
from .s2_flash import flash_inputs
from .s2_layout import build_s2_layout, s2_group_size


class LlamaLongLoRAAttention(LlamaAttention):
    """`LlamaAttention` that runs S²-Attn when the model hands it an `s2_layout` (training, no cache)."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        layout = kwargs.pop("s2_layout", None)
        if layout is None:
            return super().forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hq, N, D)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hk, N, D)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hk, N, D)
        # RoPE with the true positions, before grouping (the paper's order)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        backend = self.config._attn_implementation
        if backend == "flash_attention_2":
            query, key, value = flash_inputs(self, query, key, value)
        out = s2_attention(
            query, key, value, layout, self.scaling, self.attention_dropout if self.training else 0.0, backend
        )  # (B, N, Hq, D)
        return self.o_proj(out.reshape(*input_shape, -1)), None


class LlamaLongLoRADecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: LlamaLongLoRAConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = LlamaLongLoRAAttention(config=config, layer_idx=layer_idx)


class LlamaLongLoRAPreTrainedModel(LlamaPreTrainedModel):
    config_class = LlamaLongLoRAConfig
    config: LlamaLongLoRAConfig
    _no_split_modules = ["LlamaLongLoRADecoderLayer"]
    _can_record_outputs = {"hidden_states": LlamaDecoderLayer, "attentions": LlamaAttention}


class LlamaLongLoRAModel(LlamaLongLoRAPreTrainedModel, LlamaModel):
    def __init__(self, config: LlamaLongLoRAConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(
            [LlamaLongLoRADecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        # S² training with each row's tokens split over the ranks of a process group (see s2_context_parallel):
        # set by the trainer (or passed to forward as `s2_context_parallel`); None trains on whole rows
        self.s2_context_parallel: ContextParallel | None = None
        self.post_init()

    def s2_active(self, cache=None) -> bool:
        """S² runs only while training, when enabled, and when no KV cache is passed (generation always passes
        one, even for the prefill, so decoding never sees S²)."""
        return self.training and self.config.s2_attention and cache is None

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ):
        if "past_key_values" in kwargs:  # the name transformers deprecates until 5.40
            cache = kwargs.pop("past_key_values")
        parallel = kwargs.pop("s2_context_parallel", None) or self.s2_context_parallel
        if not self.s2_active(cache):
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **kwargs,
            )
        backend = self.config._attn_implementation
        if backend not in S2_BACKENDS:
            raise ValueError(
                f"S²-Attn runs on {S2_BACKENDS}, but attn_implementation={backend!r}. Load the model with one of "
                "them, or set config.s2_attention=False to train with full attention."
            )
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ValueError(
                "S²-Attn lays out groups from the 2D padding mask (batch, seq_len) and position_ids; got a "
                f"{attention_mask.ndim}D attention_mask. Pass the tokenizer's attention_mask as is."
            )
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, seq_len = reference.shape[:2]
        group = s2_group_size(seq_len, self.config.s2_group_size, self.config.s2_group_size_ratio)
        layout = build_s2_layout(
            seq_len,
            batch,
            group,
            self.config.s2_shift,
            padding_mask=attention_mask,
            position_ids=position_ids,
            device=reference.device,
        )
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=reference.device)[None]
        if parallel is not None and parallel.size > 1:  # this rank's shard of every row, with its halo lengths
            layout = shard_layout(layout, parallel)
            own = slice(layout.shard.start, layout.shard.start + layout.shard.length)
            input_ids = None if input_ids is None else input_ids[:, own]
            inputs_embeds = None if inputs_embeds is None else inputs_embeds[:, own]
            position_ids = position_ids[:, own]
        # A 4D mask makes transformers skip building its (B, 1, N, N) mask; this one is only the key-padding
        # mask (B, 1, 1, N), O(N). The attention layers read the layout instead.
        return super().forward(
            input_ids=input_ids,
            attention_mask=layout.valid[:, None, None, :],
            position_ids=position_ids,
            cache=None,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            s2_layout=layout,
            **kwargs,
        )


class LlamaLongLoRAForCausalLM(LlamaLongLoRAPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: LlamaLongLoRAConfig):
        super().__init__(config)
        self.model = LlamaLongLoRAModel(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, labels=None, **kwargs):
        """`LlamaForCausalLM.forward`; under context parallelism (S² training with `s2_context_parallel`) the logits
        are this rank's shard's, and so is the loss.

        Labels come as `labels` of the whole rows, or as `shift_labels` (already shifted) of the whole rows or of this
        shard (the convention of transformers' and TRL's context parallelism). The loss is scaled so that its mean
        over the ranks, and the mean of the gradients (what DDP, FSDP and DeepSpeed all-reduce), are those of the
        whole rows; given `num_items_in_batch` counted over the shards' labels (as Trainer counts them), it is the
        shard's share of that count.
        """
        if "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        parallel = kwargs.get("s2_context_parallel") or self.model.s2_context_parallel
        active = parallel is not None and parallel.size > 1 and self.model.s2_active(cache)
        if not active or (labels is None and "shift_labels" not in kwargs):
            return super().forward(input_ids, attention_mask, position_ids, cache, labels=labels, **kwargs)
        shift_labels = kwargs.pop("shift_labels", None)
        count = kwargs.pop("num_items_in_batch", None)
        outputs = super().forward(input_ids, attention_mask, position_ids, cache, **kwargs)
        length, rank = outputs.logits.shape[1], parallel.rank
        if shift_labels is None:  # the label of a shard's last token is the next shard's first: shift whole rows
            shift_labels = nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]  # (B, N)
        scale = parallel.size  # the ranks average: each contributes its part of the whole rows' loss, times P
        if shift_labels.shape[1] != length:  # the whole rows', the same on every rank
            count = (shift_labels != -100).sum() if count is None else count
            shift_labels = shift_labels[:, rank * length : (rank + 1) * length]  # (B, n)
        elif count is None:  # this shard's: the rows' count is the group's sum
            count = parallel.sum((shift_labels != -100).sum())
        else:  # this shard's, counted over every rank's shard (Trainer): the count already spans the ranks
            scale = 1
        outputs.loss = scale * self.loss_function(
            logits=outputs.logits,
            labels=None,
            shift_labels=shift_labels.contiguous(),
            vocab_size=self.config.vocab_size,
            num_items_in_batch=count,
        )
        return outputs


# `save_pretrained` then writes `auto_map` and copies these files next to the weights.
LlamaLongLoRAConfig.register_for_auto_class()
LlamaLongLoRAModel.register_for_auto_class("AutoModel")
LlamaLongLoRAForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "LlamaLongLoRAPreTrainedModel",
    "LlamaLongLoRAModel",
    "LlamaLongLoRAForCausalLM",
]
