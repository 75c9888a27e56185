"""`longlora-hub push` against the local Hub-compatible server (tests/hub_server.py): the real huggingface_hub,
peft and transformers clients push and pull; the pulled adapter and the pulled merged model (in a process that
cannot import longlora_hub) reproduce the local logits; the card, the allowlist, re-pushes, branches, pull
requests, privacy and every failure reach the server (or do not) as asked; nothing outside the folder (a link's
target, a local path) reaches it, and files deleted locally go from the repository too."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from longlora_hub.cli import main as cli
from longlora_hub.evaluation.report import make_result, save_result
from longlora_hub.merge import merge_adapter

from .test_training import TINY_EXTEND, run, short

PULL_MERGED = textwrap.dedent(
    """
    import sys
    sys.modules["longlora_hub"] = None  # the pulled model must stand on its own remote code
    import torch
    from transformers import AutoModelForCausalLM

    repo_id, revision, ids_path, out_path = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True, revision=revision).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        torch.save(model(torch.load(ids_path)).logits, out_path)
    """
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny extend run (its output folder holds the adapter, checkpoint-3, base/ and the Trainer's extras), its
    merged model, and an evaluation result saved next to the adapter."""
    root = tmp_path_factory.mktemp("push")
    trainer = run(TINY_EXTEND, root / "run", *short("--max_steps", "3"))
    merged = merge_adapter(root / "run", root / "merged")
    result = make_result(
        "perplexity",
        "longlora",
        {"model": "run"},
        {"data": "pg19-tiny", "stride": 256},
        [{"seq_len": 512, "perplexity": 42.125, "windows": 2, "scored_tokens": 1022}],
    )
    save_result(result, root / "run" / "eval" / "ppl.json")
    ids = torch.randint(3, 300, (1, 384), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = trainer.model.eval()(ids).logits
    return {"run": root / "run", "merged": merged, "ids": ids, "logits": logits, "root": root}


def push(*args):
    return CliRunner().invoke(cli, ["push", *map(str, args)])


@pytest.mark.parametrize("mode", ["lfs", "regular"])
def test_adapter_push_pull_and_card(hub, trained, mode):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hub.use_upload_mode(mode)
    result = push(trained["run"], "me/tiny-adapter")
    assert result.exit_code == 0, result.output
    assert "left out: base/, builtin-base/, training_args.bin" in result.output
    repo = hub.server.repo("me/tiny-adapter")
    assert len(repo.commits) == 2  # the repository's initial commit, then ONE commit with everything
    files = repo.files("main")
    assert set(files) == {
        ".gitattributes",
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "eval/ppl.json",
        "longlora_hub.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "trainer_state.json",
    }
    card = files["README.md"].decode()
    for line in ("library_name: peft", "base_model_relation: adapter", "pipeline_tag: text-generation", "- s2-attn"):
        assert line in card
    assert "| 512 | 42.125 | 2 | 1022 |" in card  # the evaluation table
    assert "| context length | 512 tokens |" in card and "| Position Interpolation factor | 2 |" in card
    assert 'PeftModel.from_pretrained(base, "me/tiny-adapter")' in card
    assert (trained["run"] / "README.md").read_text() != card  # the local files are never rewritten

    base = AutoModelForCausalLM.from_pretrained(trained["run"] / "base", trust_remote_code=True)
    pulled = PeftModel.from_pretrained(base, "me/tiny-adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(pulled(trained["ids"]).logits, trained["logits"], atol=1e-5, rtol=0)

    again = push(trained["run"], "me/tiny-adapter")
    assert again.exit_code == 0 and "Nothing changed" in again.output, again.output
    assert len(hub.server.repo("me/tiny-adapter").commits) == 2


def test_merged_push_private_pinned_pull_without_the_package(hub, trained, tmp_path):
    # LFS multipart for the weights (Xet off): the tiny model's 100 kB safetensors go up in 32 kB parts
    hub.server.multipart_threshold = hub.server.multipart_chunk_size = 32 * 1024
    result = push(trained["merged"], "me/tiny-merged", "--private", "--commit-message", "first")
    assert result.exit_code == 0, result.output
    assert len(hub.server.calls("PUT", r"^/__lfs__/[0-9a-f]+/\d+$")) > 1  # parts
    assert len(hub.server.calls("POST", r"^/__lfs__/[0-9a-f]+$")) == 1  # one completion: one multipart file
    repo = hub.server.repo("me/tiny-merged")
    assert repo.private and repo.commits[-1].message == "first"
    sha = repo.head("main").sha
    assert f"revision={sha!r}" in result.output
    files = repo.files("main")
    assert {"modeling_llama_longlora.py", "s2_attention.py", "configuration_llama_longlora.py"} <= set(files)
    card = files["README.md"].decode()
    assert "library_name: transformers" in card and "trust_remote_code=True, revision=REVISION" in card
    # the tokenizer too: its config names remote code, and without the flag transformers stops to ask
    assert 'AutoTokenizer.from_pretrained("me/tiny-merged", trust_remote_code=True, revision=REVISION)' in card

    torch.save(trained["ids"], tmp_path / "ids.pt")
    env = {**os.environ, **hub.env, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run(
        [sys.executable, "-c", PULL_MERGED, "me/tiny-merged", sha, tmp_path / "ids.pt", tmp_path / "out.pt"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), trained["logits"], atol=1e-4, rtol=0)


def test_branch_and_pull_request(hub, trained):
    assert push(trained["merged"], "me/branched").exit_code == 0
    main_sha = hub.server.repo("me/branched").head("main").sha
    to_branch = push(trained["run"], "me/branched", "--revision", "adapter")
    assert to_branch.exit_code == 0, to_branch.output
    repo = hub.server.repo("me/branched")
    assert "adapter_config.json" in repo.files("adapter") and repo.head("main").sha == main_sha
    # a pull request proposing the adapter's files on main
    as_pr = push(trained["run"], "me/branched", "--create-pr")
    assert as_pr.exit_code == 0 and "Opened" in as_pr.output, as_pr.output
    repo = hub.server.repo("me/branched")
    assert repo.prs and repo.head("main").sha == main_sha
    assert "adapter_config.json" in repo.files("refs/pr/1")


def test_checkpoints_allowlist_and_training_state(hub, trained, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(trained["run"] / "checkpoint-3", unfinished / "checkpoint-3")
    (unfinished / ".env").write_text("HF_TOKEN=hf_secret\n")
    refused = push(unfinished, "me/ckpt")
    assert refused.exit_code == 1 and "--checkpoint last" in refused.output
    assert ("model", "me/ckpt") not in hub.server.repos  # refused before any request
    (unfinished / "checkpoint-3" / ".env").write_text("HF_TOKEN=hf_secret\n")
    (unfinished / "checkpoint-3" / "token").write_text("hf_secret\n")
    plain = push(unfinished, "me/ckpt", "--checkpoint", "last")
    assert plain.exit_code == 0, plain.output
    files = set(hub.server.repo("me/ckpt").files("main"))
    assert "adapter_model.safetensors" in files and "trainer_state.json" in files
    assert not files & {".env", "token", "optimizer.pt", "rng_state.pth", "scheduler.pt", "training_args.bin"}
    full = push(unfinished, "me/ckpt-resumable", "--checkpoint", "checkpoint-3", "--include-training-state")
    assert full.exit_code == 0, full.output
    files = set(hub.server.repo("me/ckpt-resumable").files("main"))
    assert {"optimizer.pt", "rng_state.pth", "scheduler.pt", "training_args.bin"} <= files
    assert not files & {".env", "token"}


def test_failures_are_clear_and_push_nothing(hub, trained, monkeypatch):
    bad = push(trained["merged"], "me/nope", "--token", "hf_wrong")
    assert bad.exit_code == 1 and "rejected the token" in bad.output and "(401)" in bad.output
    read_only = push(trained["merged"], "me/nope", "--token", hub.read_token)
    assert read_only.exit_code == 1 and "(403)" in read_only.output
    assert "needs the right to create it" in read_only.output
    monkeypatch.delenv("HF_TOKEN")
    no_token = push(trained["merged"], "me/nope")
    assert no_token.exit_code == 1 and "No Hugging Face token" in no_token.output
    assert ("model", "me/nope") not in hub.server.repos and not hub.server.calls("POST", r"/commit/")
    # the repository exists, and a read-only token may not add to it: nothing changes there
    assert push(trained["merged"], "me/kept", "--token", hub.write_token).exit_code == 0
    before = len(hub.server.repo("me/kept").commits)
    refused = push(trained["run"], "me/kept", "--token", hub.read_token)
    assert refused.exit_code == 1 and "(403)" in refused.output
    assert len(hub.server.repo("me/kept").commits) == before
    bad_id = push(trained["merged"], "not a repo id")
    assert bad_id.exit_code == 1 and "not a valid repository id" in bad_id.output


def test_unreachable_hub(trained, monkeypatch):
    from longlora_hub.push import PushError, push_folder

    monkeypatch.setenv("HF_TOKEN", "hf_anything")
    with pytest.raises(PushError, match="Cannot reach the Hub at http://127.0.0.1:9"):
        push_folder(trained["merged"], "me/offline", endpoint="http://127.0.0.1:9")


def test_merged_stock_llama_card(trained, tmp_path):
    from longlora_hub.push import plan_push

    stock = merge_adapter(trained["run"], tmp_path / "stock", architecture="llama")
    plan = plan_push(stock, "me/stock", base_model="someone/tiny-llama")
    assert plan.kind == "llama" and not [name for name in plan.files if name.endswith(".py")]
    assert "base_model: someone/tiny-llama" in plan.card and "base_model_relation: finetune" in plan.card
    assert "no remote code" in plan.card
    record = json.loads((stock / "longlora_hub.json").read_text())
    assert record["architecture"] == "llama"


def test_adapter_names_its_hub_base(trained):
    """A local base path means nothing on the Hub: the pushed adapter_config.json names the base's Hub id."""
    from longlora_hub.push import plan_push

    plan = plan_push(trained["run"], "me/tiny-adapter", base_model="someone/tiny-llama")
    pushed = json.loads(plan.files["adapter_config.json"])
    assert pushed["base_model_name_or_path"] == "someone/tiny-llama"
    assert json.loads((trained["run"] / "adapter_config.json").read_text())["base_model_name_or_path"].endswith("base")
    assert "base_model: someone/tiny-llama" in plan.card and 'from_pretrained(\n    "someone/tiny-llama"' in plan.card


def test_license_travels_from_the_base_card(tmp_path):
    """convert records the base card's license; merge and push carry it to the published card."""
    from longlora_hub.convert import convert_checkpoint
    from longlora_hub.push import plan_push
    from longlora_hub.testing import build_tiny_tokenizer, tiny_llama

    base = tmp_path / "stock"
    tiny_llama().save_pretrained(base)
    build_tiny_tokenizer().save_pretrained(base)
    (base / "README.md").write_text("---\nlicense: llama2\n---\n# A base\n")
    converted = convert_checkpoint(base, tmp_path / "converted", 512, base_model="meta-llama/Llama-2-7b-hf")
    record = json.loads((converted / "longlora_hub.json").read_text())
    assert record["license"] == "llama2" and record["base_model"] == "meta-llama/Llama-2-7b-hf"
    plan = plan_push(converted, "me/converted")
    assert "license: llama2" in plan.card and "base_model: meta-llama/Llama-2-7b-hf" in plan.card


def adapter_copy(trained, folder):
    """The trainer output's adapter and records, as plain files (no base/, no checkpoints) in `folder`."""
    ignored = shutil.ignore_patterns("base", "builtin-base", "checkpoint-*")
    return shutil.copytree(trained["run"], folder, ignore=ignored)


def test_links_out_of_the_folder_are_never_uploaded(hub, trained, tmp_path):
    folder = adapter_copy(trained, tmp_path / "adapter")
    private = tmp_path / "private"
    private.mkdir()
    (private / "passwd").write_text("root:x:0:0:secret\n")
    outside_eval = make_result(
        "perplexity",
        "longlora",
        {"model": "x"},
        {"data": "d", "stride": 1},
        [{"seq_len": 64, "perplexity": 7.777, "windows": 1, "scored_tokens": 63}],
    )
    save_result(outside_eval, private / "ppl.json")
    (folder / "tokenizer.model").symlink_to(private / "passwd")
    (folder / "LICENSE").symlink_to(private / "passwd")
    (folder / "evaluation").symlink_to(private)  # a linked folder: what it holds lies outside too
    (folder / "notes").mkdir()
    (folder / "notes" / "license.txt").write_text("MIT, inside the folder\n")
    (folder / "NOTICE").symlink_to(os.path.join("notes", "license.txt"))  # a link inside the folder is fine
    (folder / "special_tokens_map.json").symlink_to(tmp_path / "gone.json")  # broken: left out, not a traceback
    result = push(folder, "me/links")
    assert result.exit_code == 0, result.output
    files = hub.server.repo("me/links").files("main")
    assert not [name for name, data in files.items() if b"secret" in data or str(private).encode() in data]
    assert not {"tokenizer.model", "LICENSE", "evaluation/ppl.json"} & set(files)
    assert "7.777" not in files["README.md"].decode()
    assert files["NOTICE"] == b"MIT, inside the folder\n"
    for name in ("tokenizer.model", "LICENSE", "evaluation/ppl.json"):
        assert f"{name} is not uploaded: it is a link to {private}" in result.output, result.output
    assert "special_tokens_map.json is not uploaded: it is a broken link" in result.output

    # a recipe's output_dir/base links its weights to the original checkpoint: refused before any request, with the fix
    refused = push(trained["run"] / "base", "me/linked-base")
    assert refused.exit_code == 1 and "model.safetensors is a link to" in refused.output, refused.output
    assert "cp --remove-destination" in refused.output and "push the trainer output" in refused.output
    assert ("model", "me/linked-base") not in hub.server.repos
    copied = shutil.copytree(trained["run"] / "base", tmp_path / "base")  # the fix named: the real files copied in
    assert push(copied, "me/linked-base").exit_code == 0
    assert "model.safetensors" in hub.server.repo("me/linked-base").files("main")


def test_local_paths_are_never_published(hub, trained, tmp_path):
    folder = adapter_copy(trained, tmp_path / "adapter")
    local_eval = make_result(
        "perplexity",
        "longlora",
        {"model": str(folder), "adapter": str(folder), "base_model": str(trained["run"] / "base")},
        {"data": str(tmp_path / "data" / "pg19.bin"), "stride": 256},
        [{"seq_len": 512, "perplexity": 33.5, "windows": 1, "scored_tokens": 511}],
    )
    save_result(local_eval, folder / "eval" / "local.json")
    local = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    assert str(trained["root"]) in json.loads(local[folder / "adapter_config.json"])["base_model_name_or_path"]

    result = push(folder, "me/paths")
    assert result.exit_code == 0, result.output
    files = hub.server.repo("me/paths").files("main")
    for name, data in files.items():
        assert str(tmp_path).encode() not in data and str(trained["root"]).encode() not in data, name
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] is None
    assert "names no base model" in result.output and "--base-model USER/NAME" in result.output
    assert json.loads(files["eval/local.json"])["data"] == "pg19.bin"
    card = files["README.md"].decode()
    assert "Perplexity of `adapter` on `pg19.bin`" in card and "| 512 | 33.500 | 1 | 511 |" in card
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == local  # never rewritten

    # the Hub id the run recorded replaces the local path
    record = json.loads((folder / "longlora_hub.json").read_text())
    (folder / "longlora_hub.json").write_text(json.dumps({**record, "base_model": "someone/tiny-llama"}))
    named = push(folder, "me/paths-named")
    assert named.exit_code == 0 and "names no base model" not in named.output, named.output
    pushed = json.loads(hub.server.repo("me/paths-named").files("main")["adapter_config.json"])
    assert pushed["base_model_name_or_path"] == "someone/tiny-llama"

    # a merged model records the adapter it was made from: by name only
    assert push(trained["merged"], "me/merged-paths").exit_code == 0
    files = hub.server.repo("me/merged-paths").files("main")
    assert json.loads(files["longlora_hub.json"])["adapter"] == "run"
    assert not [name for name, data in files.items() if str(trained["root"]).encode() in data]

    bad_base = push(folder, "me/paths-bad", "--base-model", str(trained["run"] / "base"))
    assert bad_base.exit_code == 1 and "is not a Hub id" in bad_base.output
    assert ("model", "me/paths-bad") not in hub.server.repos


def test_push_mirrors_the_folder_unless_keep_remote(hub, trained, tmp_path):
    from huggingface_hub import HfApi

    folder = adapter_copy(trained, tmp_path / "adapter")
    (folder / "tokenizer.model").write_bytes(b"a sentencepiece model\n")
    (folder / "LICENSE").write_text("Apache-2.0\n")
    assert push(folder, "me/mirror").exit_code == 0
    # files the user put there by other means are theirs: no push deletes them
    api = HfApi(endpoint=hub.endpoint, token=hub.write_token)
    api.upload_file(path_or_fileobj=b"my notes\n", path_in_repo="notes.md", repo_id="me/mirror")
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="checkpoint-3/adapter_model.safetensors", repo_id="me/mirror")
    (folder / "tokenizer.model").unlink()
    (folder / "eval" / "ppl.json").unlink()
    commits = len(hub.server.repo("me/mirror").commits)

    again = push(folder, "me/mirror")
    assert again.exit_code == 0, again.output
    repo = hub.server.repo("me/mirror")
    files = repo.files("main")
    assert not {"tokenizer.model", "eval/ppl.json"} & set(files)
    assert len(repo.commits) == commits + 1  # the deletions and the new card in one commit
    assert files["notes.md"] == b"my notes\n" and "checkpoint-3/adapter_model.safetensors" in files
    assert files["LICENSE"] == b"Apache-2.0\n" and "42.125" not in files["README.md"].decode()
    assert "deleted on the Hub (no longer in the folder): eval/ppl.json, tokenizer.model" in again.output

    (folder / "LICENSE").unlink()
    kept = push(folder, "me/mirror", "--keep-remote")
    assert kept.exit_code == 0, kept.output
    assert "kept on the Hub (--keep-remote), though gone from the folder: LICENSE" in kept.output
    assert "Nothing changed" in kept.output and "LICENSE" in hub.server.repo("me/mirror").files("main")
    mirrored = push(folder, "me/mirror")  # without the flag, the next push mirrors the folder again
    assert "deleted on the Hub (no longer in the folder): LICENSE" in mirrored.output, mirrored.output
    assert "LICENSE" not in hub.server.repo("me/mirror").files("main")


def test_card_model_index_holds_the_evaluation_numbers(hub, trained, tmp_path):
    """The card's `model-index` (what the Hub shows on the model page and in leaderboards) is built from the eval
    JSONs with huggingface_hub's own EvalResult: the pushed README.md parses back into exactly their numbers, and
    its `model-index` round-trips through huggingface_hub's converters (`ModelCard.validate` needs the network)."""
    import yaml
    from huggingface_hub import EvalResult, ModelCard
    from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

    folder = adapter_copy(trained, tmp_path / "adapter")
    press = make_result(
        "perplexity",
        "press",
        {"model": str(folder)},
        {"data": str(tmp_path / "proof-pile.bin"), "stride": 256, "s2": False},
        [
            {"seq_len": 256, "stride": 256, "perplexity": 9.876543, "windows": 3, "scored_tokens": 700},
            {"seq_len": 512, "stride": 256, "perplexity": 7.25, "windows": 2, "scored_tokens": 700},
        ],
    )
    save_result(press, folder / "eval" / "press.json")
    from_hub = make_result(
        "perplexity",
        "longlora",
        {"model": "run"},
        {"data": "someone/pg19-test", "split": "test", "data_config": "books", "stride": 128, "s2": True},
        [{"seq_len": 512, "stride": 128, "perplexity": 11.5, "windows": 4, "scored_tokens": 2044}],
    )
    save_result(from_hub, folder / "eval" / "hub.json")
    cells = [{"length": length, "depth": 0.5, "depth_range": [0.4, 0.6], "trials": 3, "correct": 1, "accuracy": 1 / 3}
             for length in (256, 512)]  # fmt: skip
    passkey = make_result(
        "passkey",
        "passkey",
        {"model": "run"},
        {"lengths": [256, 512], "depths": None, "depth_bins": 5, "trials": 3, "seed": 0},
        {"accuracy": {"256": 1 / 3, "512": 0.0}, "overall_accuracy": 1 / 6, "cells": cells},
    )
    save_result(passkey, folder / "eval" / "passkey.json")

    result = push(folder, "me/evals")
    assert result.exit_code == 0, result.output
    text = hub.server.repo("me/evals").files("main")["README.md"].decode()
    card = ModelCard(text)
    got = {(r.metric_type, r.metric_name): r for r in card.data.eval_results}
    expected = {
        ("perplexity", "perplexity @ 512 (pg19-tiny, LongLoRA windows)"): (42.125, "pg19-tiny", None, None),
        ("perplexity", "perplexity @ 256 (proof-pile, sliding window)"): (9.876543, "proof-pile", None, None),
        ("perplexity", "perplexity @ 512 (proof-pile, sliding window)"): (7.25, "proof-pile", None, None),
        ("perplexity", "perplexity @ 512 (someone/pg19-test, LongLoRA windows, S²-Attn)"): (
            11.5,
            "someone/pg19-test",
            "books",
            "test",
        ),
        ("accuracy", "passkey accuracy @ 256"): (1 / 3, "passkey", None, None),
        ("accuracy", "passkey accuracy @ 512"): (0.0, "passkey", None, None),
    }
    assert set(got) == set(expected) and len(card.data.eval_results) == len(expected)
    for key, (value, dataset, config, split) in expected.items():
        found = got[key]
        assert found.metric_value == value and type(found.metric_value) is float, key  # the JSON's number, exactly
        assert found.task_type == "text-generation" and found.dataset_type == dataset, key
        assert (found.dataset_config, found.dataset_split) == (config, split), key
    assert got[("perplexity", "perplexity @ 256 (proof-pile, sliding window)")].metric_args == {
        "seq_len": 256,
        "stride": 256,
    }
    assert card.data.model_name == "evals"

    # the YAML is a valid model-index: huggingface_hub's converters read it and write it back unchanged
    index = yaml.safe_load(text.split("---\n")[1])["model-index"]
    name, results = model_index_to_eval_results(index)
    assert name == "evals" and all(isinstance(r, EvalResult) for r in results)
    assert eval_results_to_model_index(name, results) == index
    # the Markdown tables stay for readers, and no local path reaches the card
    assert "| 256 | 9.877 | 3 | 700 |" in text and "| 512 | 42.125 | 2 | 1022 |" in text
    assert str(tmp_path) not in text
