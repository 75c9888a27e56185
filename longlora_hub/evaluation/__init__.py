"""Evaluation of long-context models the way the LongLoRA paper does it: perplexity over long token streams
(`perplexity`) and passkey retrieval (`passkey`), with the loading (`loading`) and reporting (`report`) they share.

torch and transformers are imported inside the functions that need them, so importing this package is cheap.
"""

from .loading import (
    LoadedModel,
    ModelSource,
    check_reachable,
    load_config,
    load_model,
    load_tokenizer,
    resolve_source,
    software_versions,
)
from .passkey import PasskeyPrompt, build_passkey_prompt, is_exact_match, plan_trials, run_passkey
from .perplexity import PROTOCOLS, Window, evaluate_perplexity, load_tokens, plan_windows, s2_evaluation, token_nll
from .report import load_result, make_result, markdown_table, plot_passkey_heatmap, save_result

__all__ = [
    "PROTOCOLS",
    "LoadedModel",
    "ModelSource",
    "PasskeyPrompt",
    "Window",
    "build_passkey_prompt",
    "check_reachable",
    "evaluate_perplexity",
    "is_exact_match",
    "load_config",
    "load_model",
    "load_result",
    "load_tokenizer",
    "load_tokens",
    "make_result",
    "markdown_table",
    "plan_trials",
    "plan_windows",
    "plot_passkey_heatmap",
    "resolve_source",
    "run_passkey",
    "s2_evaluation",
    "save_result",
    "software_versions",
    "token_nll",
]
