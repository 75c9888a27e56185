"""Why S²-Attn costs a real pretrained model more than no shift at all, before any training.

On SmolLM2-135M-Instruct (the real-model tier's checkpoint: 9 query heads over 3 key-value heads) at 2048 tokens
with groups of 512, the loss in training mode is 2.98 with full attention, 3.17 when every head attends within its
group (no shift), but 4.05 with the paper's shifted half ("segments": 5 heads on [0, G), [G, 2G), ..., 4 heads on
[0, G/2), [G/2, 3G/2), ...). This script measures the variants that tell the candidate causes apart, with a dense
per-head mask on a stock `LlamaForCausalLM` (an attention function registered through `AttentionInterface`, so the
model's own code is untouched):

- `all shifted`: every head on the shifted groups. Same amount of context as `segments`, one consistent layout.
  If it is close to `no shift`, the shift itself is harmless and the cost comes from mixing two layouts in a layer.
- `+ sink`: every group may also attend to the first 4 tokens of the sequence (an attention sink, as in
  StreamingLLM). If the gap closes, group starts lack the sink the model dumps attention on.
- the loss of the tokens in the first 64 positions after a group boundary of EITHER layout, against the rest: where
  the extra loss sits.

Run: `python benchmarks/real_s2_gap.py` (about 3 minutes on 2 cores; makes the checkpoint on first use, see
`longlora_hub/real_model.py`). `--factor 4` also measures with Position Interpolation to 4x.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

SINK = 4
EDGE = 64


def head_groups(seq_len: int, group: int, layout: list[str]) -> torch.Tensor:
    """(H, N) group index of every token for every head: "plain" heads use p // G, "shifted" ones (p + G/2) // G."""
    positions = torch.arange(seq_len)
    plain, shifted = positions // group, (positions + group // 2) // group
    return torch.stack([shifted if kind == "shifted" else plain for kind in layout])


def probe_mask(seq_len: int, group: int, layout: list[str] | None, sink: int) -> torch.Tensor | None:
    """(H, N, N) bool, True where query i may attend to key j; `None` layout: full causal attention."""
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    if layout is None:
        return causal[None]
    groups = head_groups(seq_len, group, layout)  # (H, N)
    same = groups[:, :, None] == groups[:, None, :]  # (H, N, N)
    if sink:
        same[:, :, :sink] = True
    return same & causal


def make_attention(mask_of: dict):
    """A transformers attention function with a per-head dense mask (`mask_of["mask"]`, (H, N, N))."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query: (B, Hq, N, D), key/value: (B, Hk, N, D)
        repeat = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(repeat, dim=1)
        value = value.repeat_interleave(repeat, dim=1)
        scores = (query @ key.transpose(-1, -2)) * scaling  # (B, H, N, N)
        mask = mask_of["mask"]
        scores = scores.masked_fill(~mask[None], float("-inf"))
        out = scores.softmax(dim=-1) @ value  # (B, H, N, D)
        return out.transpose(1, 2).contiguous(), None  # (B, N, H, D)

    return attention


def edge_tokens(seq_len: int, group: int) -> torch.Tensor:
    """(N,) True for tokens within EDGE positions after a group start of either layout (the first group aside)."""
    positions = torch.arange(seq_len)
    plain = positions % group
    shifted = (positions + group // 2) % group
    return ((plain < EDGE) | (shifted < EDGE)) & (positions >= group // 2)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--group", type=int, default=512)
    parser.add_argument("--windows", type=int, default=1, help="2048-token windows of the license texts to average")
    parser.add_argument("--factor", type=float, nargs="*", default=[1.0], help="PI factors to measure (1 = none)")
    parser.add_argument("--output", default=None, help="write the numbers as JSON")
    args = parser.parse_args(argv)

    from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from longlora_hub.real_model import license_texts, smollm2_checkpoint

    folder = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids: list[int] = []
    for path in license_texts():
        ids += tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
    n, g = args.seq_len, args.group
    windows = torch.tensor(ids[: n * args.windows]).view(args.windows, n)

    heads = 9
    split = heads - heads // 2  # LlamaLongLoRA's split: the first ceil(H/2) heads unshifted
    variants = {
        "full attention": (None, 0),
        "no shift": (["plain"] * heads, 0),
        "segments (5 plain, 4 shifted)": (["plain"] * split + ["shifted"] * (heads - split), 0),
        "all shifted": (["shifted"] * heads, 0),
        "no shift + sink": (["plain"] * heads, SINK),
        "segments + sink": (["plain"] * split + ["shifted"] * (heads - split), SINK),
    }
    mask_of: dict = {}
    AttentionInterface.register("s2_probe", make_attention(mask_of))
    AttentionMaskInterface.register("s2_probe", ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])  # no 4D mask
    edge = edge_tokens(n, g)[1:]  # loss positions: token t+1 predicted at t
    results: dict = {}
    for factor in args.factor:
        kwargs = {}
        if factor != 1.0:
            config = json.loads((folder / "config.json").read_text())
            theta = config["rope_parameters"]["rope_theta"]
            kwargs["rope_parameters"] = {"rope_type": "linear", "factor": factor, "rope_theta": theta}
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="s2_probe", **kwargs).eval()
        for name, (layout, sink) in variants.items():
            start = time.perf_counter()
            mask_of["mask"] = probe_mask(n, g, layout, sink)
            token_losses = []
            with torch.no_grad():
                for row in windows:
                    logits = model(row[None]).logits[0, :-1].float()
                    token_losses.append(torch.nn.functional.cross_entropy(logits, row[1:], reduction="none"))
            losses = torch.stack(token_losses).mean(0)  # (N - 1,)
            entry = {
                "loss": losses.mean().item(),
                "edge": losses[edge].mean().item(),
                "rest": losses[~edge].mean().item(),
                "seconds": round(time.perf_counter() - start, 1),
            }
            results.setdefault(f"factor {factor:g}", {})[name] = entry
            print(
                f"factor {factor:g} | {name:32s} | loss {entry['loss']:.3f} | first {EDGE} after a boundary "
                f"{entry['edge']:.3f} | rest {entry['rest']:.3f} | {entry['seconds']} s",
                flush=True,
            )
    print(f"(ppl = exp(loss); exp(2.98) = {math.exp(2.98):.1f})")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as file:
            json.dump(results, file, indent=2)
    return results


if __name__ == "__main__":
    main()
