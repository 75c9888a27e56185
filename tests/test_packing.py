"""`keep_documents_apart` end to end: what the model receives inside a real `recipes/sft.py` run of the tiny extend
recipe, and the loss the trainer computes on it, against the same documents run alone through the same weights."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from longlora_hub.training import TokensPerSecondCallback

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sft_recipe", ROOT / "recipes" / "sft.py")
sft = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sft)

TINY_EXTEND = str(ROOT / "recipes" / "configs" / "tiny" / "extend.yaml")
ROW = 512  # the corpus documents have about 120-560 tokens with the tiny tokenizer: several per row
GROUP = 128  # s2_group_size_ratio 0.25 of one row


def run_capturing(tmp_path, monkeypatch, batch_size: int, *overrides: str):
    """One training step of the tiny extend recipe; returns the trainer, the keyword arguments the model received for
    that step, and the model's weights at that moment. A forward pre-hook on the model the trainer calls is registered
    from `on_train_begin` of the recipe's own callback (added for this test only): nothing of transformers, PEFT or TRL
    is patched."""
    captured = {}

    def capture(module, args, kwargs):
        if not captured:  # the first (and only) training forward
            captured["batch"] = {
                key: value.clone() if torch.is_tensor(value) else value for key, value in kwargs.items()
            }
            captured["weights"] = {key: value.detach().clone() for key, value in module.state_dict().items()}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.register_forward_pre_hook(capture, with_kwargs=True)

    monkeypatch.setattr(TokensPerSecondCallback, "on_train_begin", on_train_begin, raising=False)
    trainer = sft.main(
        [
            "--config", TINY_EXTEND, "--output_dir", str(tmp_path), "--disable_tqdm", "true",
            "--max_length", str(ROW), "--context_length", str(ROW), "--max_steps", "1", "--logging_steps", "1",
            "--dataset_name", "builtin:corpus", "--builtin_rows", "16",
            "--per_device_train_batch_size", str(batch_size), *overrides,
        ]
    )  # fmt: skip
    monkeypatch.undo()
    return trainer, captured["batch"], captured["weights"]


def document_starts(input_ids: torch.Tensor, eos: int) -> torch.Tensor:
    """True at the first token of every document: each row start, and right after every EOS."""
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[ROW::ROW] = True  # a padding-free batch is its rows end to end
    starts[0] = True
    starts[1:] |= input_ids[:-1] == eos
    return starts


@pytest.mark.parametrize(
    "batch_size,s2", [(1, True), (2, True), (2, False)], ids=["one-row", "two-rows", "two-rows-full-attention"]
)
def test_documents_stay_apart_in_training(tmp_path, monkeypatch, batch_size, s2):
    trainer, batch, weights = run_capturing(
        tmp_path, monkeypatch, batch_size, "--keep_documents_apart", "true", "--s2_attention", str(s2).lower()
    )
    eos = trainer.processing_class.eos_token_id
    # TRL's padding-free batch: the rows end to end, positions instead of an attention mask
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, batch_size * ROW)
    ids, labels, positions = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    starts = document_starts(ids, eos)
    assert int(starts.sum()) > 2 * batch_size  # several documents per row
    # (1) positions restart at every document and count up inside it
    assert torch.equal(positions == 0, starts)
    assert torch.equal(positions[1:][~starts[1:]], positions[:-1][~starts[1:]] + 1)
    # no document's first token is predicted from the one before it; every other token is
    assert torch.equal(labels == -100, starts) and torch.equal(labels[~starts], ids[~starts])
    # the groups are those of one row of ROW tokens, not of the flattened batch
    assert trainer.model.config.s2_group_size == GROUP

    # (2) the loss of the step equals the token-weighted mean loss of the documents, each alone, same weights
    model = trainer.model
    model.load_state_dict(weights)
    model.train()  # S²-Attn (unless s2_attention is off), as in training
    bounds = [*torch.nonzero(starts).flatten().tolist(), len(ids)]
    total, count = 0.0, 0
    with torch.no_grad():
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            document = ids[start:end][None]  # (1, L)
            if document.shape[1] < 2:
                continue  # a one-token piece of a document cut by a row boundary predicts nothing
            logits = model(input_ids=document).logits[0, :-1]  # (L - 1, V)
            total += F.cross_entropy(logits.double(), document[0, 1:], reduction="sum").item()
            count += document.shape[1] - 1
    assert count == int((labels != -100).sum())
    alone = total / count
    step_loss = trainer.state.log_history[0]["loss"]
    print(f"batch {batch_size}, s2 {s2}: step loss {step_loss:.7f}, documents alone {alone:.7f}")
    assert step_loss == pytest.approx(alone, abs=1e-5, rel=0)


def test_without_keep_documents_apart_the_batch_is_as_before(tmp_path, monkeypatch):
    """(3) the default packing is untouched: rows side by side, an all-ones mask, every token a label."""
    trainer, batch, _ = run_capturing(tmp_path, monkeypatch, 2)
    tensors = {key for key, value in batch.items() if torch.is_tensor(value)}
    assert tensors == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, ROW)
    assert bool(batch["attention_mask"].all()) and torch.equal(batch["labels"], batch["input_ids"])
    assert trainer.model.config.s2_group_size is None  # the ratio, as configured


@pytest.mark.parametrize(
    "overrides,message",
    [
        (("--padding_free", "true"), "set keep_documents_apart: true instead"),
        (("--keep_documents_apart", "true", "--s2_shift", "roll"), "use s2_shift: segments"),
    ],
)
def test_settings_that_cannot_keep_documents_apart_fail_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        sft.main(["--config", TINY_EXTEND, "--output_dir", str(tmp_path), *overrides])
    assert not tmp_path.exists() or not list(tmp_path.iterdir())
