r"""Perplexity of a causal LM on a long token stream, with the two windowing protocols of the long-context papers.

- `"longlora"`: the LongLoRA reference (`eval.py`, from landmark attention). Windows of `seq_len` tokens start every
  `stride` tokens at `0, stride, 2 * stride, ...` while `start < num_tokens - seq_len`; every window is scored in
  full (the `seq_len - 1` tokens it predicts) and the perplexity is `exp(mean of the window losses)`. Windows overlap
  when `stride < seq_len`, so most tokens are scored several times, each time with a different amount of context.
  The reference script also drops the last window start (a stray `pop()`); this one keeps it: on a real test set
  (tens of thousands of windows) that changes nothing, and on short data it would drop the only window.
- `"press"`: the sliding window of Press et al. (ALiBi) and the transformers perplexity guide. Windows start every
  `stride` tokens, the last one ends at the end of the data, and each window scores only the tokens no earlier
  window scored; every token but the first is scored exactly once, with at least `seq_len - stride` tokens of
  context after the first window, and the perplexity is `exp(total NLL / scored tokens)`.

The loss never materialises `seq_len x vocab` logits: the decoder runs once per window and the LM head plus the
cross-entropy run on chunks of `chunk_size` positions, so the largest tensor is `batch x chunk_size x vocab`.
Since that bypasses `model.forward`, what `forward` does to the head's output is applied here too (final logit
soft-capping, Cohere's and Granite's logit scales: `logit_transform`), and every evaluation first checks the chunked
loss against `forward`'s own on a few tokens, refusing an architecture whose transform it does not know.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PROTOCOLS = ("longlora", "press")
DEFAULT_CHUNK_SIZE = 1024
TOKEN_FILE_SUFFIXES = (".bin",)
TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
DATA_SUFFIXES = TOKEN_FILE_SUFFIXES + TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES


@dataclass(frozen=True)
class Window:
    r"""
    One forward pass of a perplexity evaluation.

    Args:
        start (`int`):
            Index of the window's first token in the data.
        end (`int`):
            One past its last token: the model reads tokens `[start, end)`.
        score_start (`int`):
            The first scored token: the losses of predicting tokens `[score_start, end)` count (each from the tokens
            before it in the window), so `score_start > start`.
    """

    start: int
    end: int
    score_start: int

    @property
    def scored(self) -> range:
        """The indices (in the data) of the tokens whose prediction this window scores."""
        return range(self.score_start, self.end)


def plan_windows(num_tokens: int, seq_len: int, stride: int = 256, protocol: str = "longlora") -> list[Window]:
    r"""
    The windows a protocol evaluates, and the tokens each one scores.

    Args:
        num_tokens (`int`):
            Tokens in the data.
        seq_len (`int`):
            Tokens per window (the evaluated context length).
        stride (`int`, *optional*, defaults to `256`):
            Distance between two window starts (the reference's `sliding_window`).
        protocol (`str`, *optional*, defaults to `"longlora"`):
            `"longlora"` or `"press"` (see the module docstring).

    Returns:
        `list[Window]`: In data order. `"longlora"` windows all hold `seq_len` tokens; the last `"press"` window may
        be shorter.

    Raises:
        `ValueError`: If the protocol is unknown, a size is not positive, `"press"` gets `stride >= seq_len` (tokens
            would go unscored), or the data holds fewer than `seq_len + 1` tokens.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"The protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}.")
    if seq_len < 2 or stride < 1:
        raise ValueError(f"seq_len must be >= 2 and stride >= 1, got seq_len={seq_len}, stride={stride}.")
    if num_tokens < seq_len + 1:
        raise ValueError(
            f"The data holds {num_tokens} tokens, fewer than the {seq_len + 1} that one window of --seq-len {seq_len} "
            f"needs. Evaluate at --seq-len {max(num_tokens - 1, 2)} or less, or give more data."
        )
    if protocol == "longlora":
        # the reference's `range(0, len(data) - seq_length, sliding_window)`
        return [Window(start, start + seq_len, start + 1) for start in range(0, num_tokens - seq_len, stride)]
    if stride >= seq_len:
        # a window's first token has no context inside it, so only overlapping windows can score every token
        raise ValueError(
            f"The press protocol scores every token once, so --stride ({stride}) must be below --seq-len ({seq_len})."
        )
    windows: list[Window] = []
    scored_until = 1  # token 0 has no context: nothing predicts it
    for start in range(0, num_tokens, stride):
        end = min(start + seq_len, num_tokens)
        windows.append(Window(start, end, max(scored_until, start + 1)))
        scored_until = end
        if end == num_tokens:
            break
    return windows


def decoder_and_head(model: Any) -> tuple[Any, Any]:
    """The decoder stack (returning hidden states) and the LM head of a causal LM, through a PEFT wrapper if any
    (PEFT injects its layers in place, so the unwrapped modules still run the adapter)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else model.lm_head
    if decoder is None or head is None:
        raise ValueError(f"{type(model).__name__} has no decoder and LM head to evaluate; pass a causal LM.")
    return decoder, head


# How transformers' causal-LM heads change the LM head's output before the loss, by the `model_type` of the (text)
# config and the config field they read: `forward` applies these, and the chunked loss, which calls the head itself,
# must too. Final logit soft-capping (`final_logit_softcapping`: Gemma 2 and 3, VaultGemma, nanochat, ...) means the
# same in every architecture that has it and is applied wherever the config sets it.
LOGIT_SCALES = (
    ("cohere", "logit_scale", "multiply"),  # Cohere, Cohere 2: logits * logit_scale
    ("granite", "logits_scaling", "divide"),  # Granite, Granite MoE (shared, hybrid, SWA): logits / logits_scaling
    ("falcon_h1", "lm_head_multiplier", "multiply"),
    ("hyperclovax", "logits_scaling", "multiply"),  # the same field name as Granite's, the other way round
)
CHECK_TOKENS = 64  # the positions on which the chunked loss is compared with `model.forward`'s once per evaluation


def _unwrapped(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _text_config(model: Any) -> Any:
    config = getattr(_unwrapped(model), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def logit_transform(model: Any) -> Callable[[Any], Any] | None:
    r"""
    What the model's `forward` does to the LM head's output before its loss, as a function of float32 logits, or
    `None` when it uses them as they are (Llama and most decoders).

    Handled: final logit soft-capping (`cap * tanh(logits / cap)`, Gemma 2 and 3 and every config with
    `final_logit_softcapping` set) and the scales of [`LOGIT_SCALES`] (Cohere's `logit_scale`, Granite's
    `logits_scaling`, Falcon-H1's `lm_head_multiplier`, HyperCLOVA X's `logits_scaling`), in the order `forward`
    applies them. Anything else (a remote-code model with its own scaling) is caught by [`check_chunked_loss`].
    """
    config = _text_config(model)
    if config is None:
        return None
    model_type = str(getattr(config, "model_type", "") or "")
    steps: list[Callable[[Any], Any]] = []
    for prefix, name, how in LOGIT_SCALES:
        value = getattr(config, name, None)
        if model_type.startswith(prefix) and value is not None and float(value) != 1.0:
            scale = float(value)
            steps.append((lambda x, s=scale: x * s) if how == "multiply" else (lambda x, s=scale: x / s))
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        import torch

        cap = float(cap)
        steps.append(lambda x: torch.tanh(x / cap) * cap)
    if not steps:
        return None

    def transform(logits: Any) -> Any:
        for step in steps:
            logits = step(logits)
        return logits

    return transform


def token_nll(model: Any, input_ids: Any, chunk_size: int | None = DEFAULT_CHUNK_SIZE) -> Any:
    r"""
    The negative log-likelihood of every token of each row given the tokens before it in the row.

    Runs the decoder once, then the LM head, the model's own output transform ([`logit_transform`]: soft-capping,
    logit scales) and the cross-entropy on `chunk_size` positions at a time (in float32, like transformers' loss), so
    no `seq_len x vocab` tensor is ever built. Call it under `torch.no_grad()`.

    Args:
        model (`PreTrainedModel` or `PeftModel`):
            A causal LM.
        input_ids (`torch.LongTensor` of shape `(batch, seq_len)`):
            The windows, on the model's device.
        chunk_size (`int`, *optional*, defaults to `1024`):
            Positions per LM-head chunk; `None` computes all positions at once (the naive way, for comparison).

    Returns:
        `torch.FloatTensor` of shape `(batch, seq_len - 1)`: entry `[b, t]` is the loss of predicting token `t + 1`.
    """
    import torch
    import torch.nn.functional as F

    decoder, head = decoder_and_head(model)
    transform = logit_transform(model)
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]  # the last one predicts beyond
    targets = input_ids[:, 1:]
    batch, positions = targets.shape
    step = positions if chunk_size is None else chunk_size
    losses = torch.empty(batch, positions, dtype=torch.float32, device=hidden.device)
    for begin in range(0, positions, step):
        logits = head(hidden[:, begin : begin + step]).float()  # (B, chunk, V): the only vocab-sized tensor
        if transform is not None:
            logits = transform(logits)
        chunk_targets = targets[:, begin : begin + step].to(logits.device)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk_targets.reshape(-1), reduction="none")
        losses[:, begin : begin + step] = nll.view_as(chunk_targets).to(losses.device)
        del logits, nll  # free this chunk before the next one is allocated
    return losses


def check_chunked_loss(model: Any, input_ids: Any, chunk_size: int | None = DEFAULT_CHUNK_SIZE) -> None:
    r"""
    Refuse a model whose `forward` computes its logits in a way the chunked loss does not reproduce.

    The chunked loss calls the decoder and the LM head itself, so whatever `forward` does between them and the loss
    is only there when [`logit_transform`] knows it. This compares the two on the first `CHECK_TOKENS` tokens of
    `input_ids` (one short forward pass with full logits, once per evaluation) and raises when they differ by more
    than the dtype's rounding. Call it under `torch.no_grad()`, in the mode the evaluation runs in.

    Raises:
        `ValueError`: The model's own loss and the chunked one differ; the message names the architecture.
    """
    import torch
    import torch.nn.functional as F

    probe = input_ids[:1, :CHECK_TOKENS]
    if probe.shape[1] < 2:
        return
    chunked = token_nll(model, probe, chunk_size).mean().item()
    logits = model(input_ids=probe, use_cache=False).logits[:, :-1].float()
    targets = probe[:, 1:].to(logits.device)
    reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).item()
    dtype = getattr(_unwrapped(model), "dtype", torch.float32)
    tolerance = 1e-3 if dtype == torch.float32 else 2e-2  # half precision: the two paths round differently
    if abs(chunked - reference) > tolerance * max(1.0, abs(reference)):
        config = _text_config(model)
        name = type(_unwrapped(model)).__name__
        model_type = getattr(config, "model_type", None)
        raise ValueError(
            f"{name} ({model_type}) computes its logits in a way longlora-hub's chunked perplexity does not "
            f"reproduce: on the first {probe.shape[1]} tokens its own forward gives a mean loss of {reference:.4f}, "
            f"the chunked loss {chunked:.4f}. Its forward transforms the LM head's output (a logit scale or "
            "soft-capping this package does not know), so its perplexity cannot be measured here without being "
            "wrong; evaluate it with its own forward (transformers' perplexity guide) instead."
        )


@contextlib.contextmanager
def s2_evaluation(model: Any) -> Iterator[None]:
    r"""
    Run a LlamaLongLoRA model with its S²-Attn pattern for evaluation (the paper's ablation), then restore it.

    LlamaLongLoRA uses S²-Attn only in training mode (evaluation and generation always use full attention), so this
    puts the model in training mode with every dropout at 0 (`nn.Dropout` modules, LoRA dropout included, and the
    attention dropout) and leaves gradients off; run the forward under `torch.no_grad()`.

    Raises:
        `ValueError`: If the model has no S²-Attn (a stock Llama, or `s2_attention=False` in its config).
    """
    from torch import nn

    decoder, _ = decoder_and_head(model)
    config = getattr(decoder, "config", None)
    if not hasattr(decoder, "s2_active") or not getattr(config, "s2_attention", False):
        raise ValueError(
            "--s2 evaluates with S²-Attn, which only LlamaLongLoRA models with s2_attention=True have; convert the "
            "model with `longlora-hub convert` (or drop --s2 for full attention)."
        )
    was_training = model.training
    saved: list[tuple[Any, str, float]] = []
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p:
            saved.append((module, "p", module.p))
            module.p = 0.0
        if getattr(module, "attention_dropout", 0.0):
            saved.append((module, "attention_dropout", module.attention_dropout))
            module.attention_dropout = 0.0
    model.train()
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------------
# data


def _documents_from_rows(columns: Sequence[str], get_column, text_field: str, where: str) -> list:
    if text_field in columns:
        return list(get_column(text_field))
    if "input_ids" in columns:  # pre-tokenized rows (e.g. the tokenized PG19 / GovReport test sets)
        return [np.asarray(ids, dtype=np.int64) for ids in get_column("input_ids")]
    raise ValueError(
        f"{where} has no {text_field!r} column (it has {sorted(columns)}); pass --text-field with the column that "
        "holds the text, or give an input_ids column of token ids."
    )


def _read_json_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):  # one JSON array rather than JSON Lines
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _join_documents(documents: list, tokenizer: Any, where: str) -> np.ndarray:
    """Tokenize the text documents (no special tokens) and join all of them with EOS between two documents."""
    if not documents:
        raise ValueError(f"{where} holds no documents.")
    texts = [i for i, document in enumerate(documents) if isinstance(document, str)]
    if texts:
        if tokenizer is None:
            raise ValueError(f"{where} holds text: a tokenizer is needed to evaluate it.")
        encoded = tokenizer([documents[i] for i in texts], add_special_tokens=False, verbose=False)["input_ids"]
        for i, ids in zip(texts, encoded, strict=True):
            documents[i] = np.asarray(ids, dtype=np.int64)
    separator = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if len(documents) > 1 and separator is None:
        raise ValueError(f"{where} holds several documents, and the tokenizer has no EOS token to separate them.")
    parts: list[np.ndarray] = []
    for index, ids in enumerate(documents):
        if index:
            parts.append(np.asarray([separator], dtype=np.int64))
        parts.append(np.asarray(ids, dtype=np.int64))
    tokens = np.concatenate(parts)
    # int32 halves the memory of a long test set; every vocabulary fits
    return tokens.astype(np.int32) if tokens.size and tokens.max() < 2**31 else tokens


def load_tokens(
    source: str | Path,
    tokenizer: Any | None = None,
    text_field: str = "text",
    split: str = "test",
    dataset_config: str | None = None,
    max_tokens: int | None = None,
) -> np.ndarray:
    r"""
    Load evaluation data as one flat array of token ids.

    - `.bin`: pre-tokenized ids, a flat `np.uint16` array (the LongLoRA reference's PG19 / proof-pile format),
      memory-mapped, never read whole.
    - `.txt` / `.md`: one document.
    - `.jsonl` / `.json` (JSON Lines or one array of objects) and `.parquet`: one document per row, from the
      `text_field` column (or pre-tokenized `input_ids`).
    - a folder or a Hub dataset name: loaded with `datasets.load_dataset(source, dataset_config, split=split)`.

    Text is tokenized without special tokens, and documents are joined with the tokenizer's EOS token between them,
    so a `.bin` holding `doc_1 EOS doc_2` evaluates exactly like a JSONL file with the rows `doc_1` and `doc_2`.

    Args:
        source (`str` or `Path`):
            A file, a dataset folder, or a Hub dataset name.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Needed for text; its EOS separates documents.
        text_field (`str`, *optional*, defaults to `"text"`):
            The column holding the text of JSONL, parquet and dataset rows.
        split (`str`, *optional*, defaults to `"test"`):
            The split of a folder or Hub dataset.
        dataset_config (`str`, *optional*):
            The configuration name of a Hub dataset.
        max_tokens (`int`, *optional*):
            Keep only the first `max_tokens` tokens.

    Returns:
        `np.ndarray`: The token ids (a read-only memmap for `.bin` files).

    Raises:
        `FileNotFoundError`: If a local file is missing.
        `ValueError`: If the file kind is unknown, a `.bin` file is not a uint16 array, a column is missing, or a
            dataset cannot be loaded.
    """
    name = str(source)
    path = Path(name).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix in TOKEN_FILE_SUFFIXES:
            size = path.stat().st_size
            if size == 0 or size % 2:
                raise ValueError(
                    f"{path} holds {size} bytes, which is not a flat array of uint16 token ids (2 bytes each)."
                )
            tokens = np.memmap(path, dtype=np.uint16, mode="r")
        elif suffix in TEXT_SUFFIXES:
            tokens = _join_documents([path.read_text(encoding="utf-8")], tokenizer, name)
        elif suffix in JSON_SUFFIXES:
            rows = _read_json_rows(path)
            columns = sorted({key for row in rows for key in row})
            documents = _documents_from_rows(columns, lambda key: [row.get(key) for row in rows], text_field, name)
            tokens = _join_documents(documents, tokenizer, name)
        elif suffix in PARQUET_SUFFIXES:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            documents = _documents_from_rows(
                table.column_names, lambda key: table.column(key).to_pylist(), text_field, name
            )
            tokens = _join_documents(documents, tokenizer, name)
        else:
            raise ValueError(
                f"Cannot read {path}: its kind is unknown. Evaluation data is a {', '.join(DATA_SUFFIXES)} file, a "
                "dataset folder, or a Hub dataset name."
            )
    elif path.is_dir() or not _looks_like_a_path(name):
        tokens = _join_documents(_dataset_documents(name, text_field, split, dataset_config), tokenizer, name)
    else:
        raise FileNotFoundError(f"No data file at {name}; check the path given to --data.")
    return tokens[:max_tokens] if max_tokens else tokens


def _looks_like_a_path(name: str) -> bool:
    """A name with a data-file suffix or path syntax is a file the user meant, never a Hub dataset."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(name).suffix.lower() in DATA_SUFFIXES or name.startswith((".", "/", "~")) or "\\" in name:
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _dataset_documents(name: str, text_field: str, split: str, dataset_config: str | None) -> list:
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, dataset_config, split=split)
    except Exception as error:  # a missing split, the network, a gated or missing dataset: all end the same way
        raise ValueError(
            f"Could not load the dataset {name!r}, split {split!r} ({type(error).__name__}: {error}). Check the "
            "name, --split and --data-config, your network and token, or pass a local file to --data."
        ) from error
    return _documents_from_rows(dataset.column_names, lambda key: dataset[key], text_field, name)


# ----------------------------------------------------------------------------------------------------------------
# evaluation


def _batches(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows of one length (only the last press window differs), at most `batch_size` at a time."""
    batch: list[Window] = []
    for window in windows:
        if batch and (len(batch) == batch_size or window.end - window.start != batch[0].end - batch[0].start):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


def evaluate_perplexity(
    model: Any,
    tokens: np.ndarray | Sequence[int],
    seq_len: int,
    stride: int = 256,
    protocol: str = "longlora",
    batch_size: int = 1,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    device: Any | None = None,
    s2: bool = False,
    progress: bool = True,
    check: bool = True,
) -> dict[str, Any]:
    r"""
    The perplexity of `model` on `tokens` at one context length.

    Args:
        model (`PreTrainedModel` or `PeftModel`):
            A causal LM (put in eval mode here: full attention, no dropout).
        tokens (`np.ndarray` or `Sequence[int]`):
            The data, from [`load_tokens`].
        seq_len (`int`):
            Tokens per window.
        stride (`int`, *optional*, defaults to `256`):
            Distance between two window starts.
        protocol (`str`, *optional*, defaults to `"longlora"`):
            `"longlora"` or `"press"`; see the module docstring.
        batch_size (`int`, *optional*, defaults to `1`):
            Windows per forward pass.
        chunk_size (`int`, *optional*, defaults to `1024`):
            Positions per LM-head chunk; `None` builds all the logits at once.
        device (`torch.device` or `str`, *optional*):
            Where the windows go; defaults to the device of the model's input embeddings (its first shard).
        s2 (`bool`, *optional*, defaults to `False`):
            Evaluate with the S²-Attn pattern (LlamaLongLoRA only; see [`s2_evaluation`]).
        progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar on stderr.
        check (`bool`, *optional*, defaults to `True`):
            First compare the chunked loss with the model's own `forward` on a few tokens ([`check_chunked_loss`]),
            so an architecture whose output transform the chunked loss lacks is refused, not mismeasured.

    Returns:
        `dict[str, Any]`: `seq_len`, `protocol`, `stride`, `windows`, `scored_tokens`, `loss` (natural log),
        `perplexity`, `data_tokens`, `elapsed_s` and `tokens_per_s` (window tokens read per second).

    Raises:
        `ValueError`: From [`plan_windows`] or [`check_chunked_loss`], or if a token id is outside the model's
            vocabulary.
    """
    import torch

    from ..log import progress_bar

    tokens = np.asarray(tokens) if not isinstance(tokens, np.ndarray) else tokens
    windows = plan_windows(len(tokens), seq_len, stride, protocol)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and len(tokens) and int(tokens.max()) >= vocab:
        raise ValueError(
            f"The data holds token id {int(tokens.max())}, outside the model's vocabulary of {vocab}: it was "
            "tokenized with another tokenizer. Re-tokenize it with the model's tokenizer (or pass the text)."
        )
    if device is None:
        from .loading import model_device

        device = model_device(model)
    window_losses: list[float] = []
    total_nll, total_scored = 0.0, 0
    if check:  # in eval mode (no dropout, full attention): the head's transform is the same in either mode
        was_training = model.training
        model.eval()
        first = np.asarray(tokens[windows[0].start : windows[0].start + CHECK_TOKENS], dtype=np.int64)
        with torch.no_grad():
            check_chunked_loss(model, torch.from_numpy(first)[None].to(device), chunk_size)
        model.train(was_training)
    mode = s2_evaluation(model) if s2 else contextlib.nullcontext()
    if not s2:
        model.eval()
    started = time.perf_counter()
    with mode, torch.no_grad():
        bar = progress_bar(
            "perplexity", total=len(windows), desc=f"ppl {protocol} @ {seq_len}", unit="window", disable=not progress
        )
        for batch in _batches(windows, batch_size):
            rows = np.stack([np.asarray(tokens[w.start : w.end], dtype=np.int64) for w in batch])
            nll = token_nll(model, torch.from_numpy(rows).to(device), chunk_size).double().cpu()
            for row, window in enumerate(batch):
                # nll[:, t] scores token start + t + 1
                scored = nll[row, window.score_start - window.start - 1 :]
                window_losses.append(scored.mean().item())
                total_nll += scored.sum().item()
                total_scored += scored.numel()
            bar.update(len(batch))
        bar.close()
    elapsed = time.perf_counter() - started
    loss = sum(window_losses) / len(window_losses) if protocol == "longlora" else total_nll / total_scored
    read = sum(w.end - w.start for w in windows)
    return {
        "seq_len": seq_len,
        "protocol": protocol,
        "stride": stride,
        "windows": len(windows),
        "scored_tokens": total_scored,
        "loss": loss,
        "perplexity": math.exp(loss),
        "data_tokens": len(tokens),
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": round(read / elapsed, 1) if elapsed > 0 else None,
    }


__all__ = [
    "DATA_SUFFIXES",
    "DEFAULT_CHUNK_SIZE",
    "LOGIT_SCALES",
    "PROTOCOLS",
    "Window",
    "check_chunked_loss",
    "decoder_and_head",
    "evaluate_perplexity",
    "load_tokens",
    "logit_transform",
    "plan_windows",
    "s2_evaluation",
    "token_nll",
]
