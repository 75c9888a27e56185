"""The local Hub (tests/hub_server.py) against the REAL clients: if these pass, publishing code can be tested
offline with huggingface_hub, transformers and datasets exactly as they will talk to huggingface.co."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import (
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
    upload_file,
    upload_folder,
)
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.utils._runtime import is_xet_available

from .conftest import LocalHub
from .helpers import HANG_TIMEOUT_S

README = "---\nlicense: mit\ntags:\n- test\n---\n# A test repo\n"


@pytest.fixture(autouse=True)
def _nothing_unhandled(hub: LocalHub):
    """Every test here must leave no route unanswered and no server-side crash: that is what proves the clients
    needed nothing the server does not implement (Xet endpoints included)."""
    yield
    assert hub.server.unhandled == []
    assert hub.server.errors == []


def _make_folder(root: Path, weights: bytes = b"") -> dict[str, bytes]:
    """A small model-like folder: one LFS-worthy file, text files, a nested folder and a README with YAML."""
    files = {
        "model.safetensors": weights or os.urandom(64 * 1024),
        "notes.txt": b"plain text, stored in git\n",
        "sub/dir/config.json": b'{"hidden_size": 8}\n',
        "README.md": README.encode(),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------------------- 1


def test_create_repo_exist_ok_private_and_repo_info(hub: LocalHub):
    api = HfApi()
    assert api.whoami()["name"] == "tester"
    assert api.whoami(token=hub.read_token)["auth"]["accessToken"]["role"] == "read"

    url = api.create_repo("tester/secret", private=True)
    assert url.repo_id == "tester/secret" and url.endpoint == hub.endpoint
    assert api.create_repo("tester/secret", exist_ok=True).repo_id == "tester/secret"
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("tester/secret")
    assert conflict.value.response.status_code == 409

    repo = hub.server.repo("tester/secret")
    assert repo.private  # `private=True` reached the server
    assert list(repo.files()) == [".gitattributes"]  # the Hub's initial commit

    info = api.repo_info("tester/secret")
    assert info.private and info.sha == repo.branches["main"]
    assert api.repo_info("tester/secret", token=hub.read_token).sha == info.sha
    with pytest.raises(RepositoryNotFoundError):  # private repos are hidden from anonymous clients
        api.repo_info("tester/secret", token=False)
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("tester/missing")

    api.create_repo("tester/open-data", repo_type="dataset")
    assert not hub.server.repo("tester/open-data", "dataset").private
    assert HfApi(token=False).repo_info("tester/open-data", repo_type="dataset").id == "tester/open-data"


# ---------------------------------------------------------------------------------------------------------- 2


def test_upload_folder_lfs_then_download(hub: LocalHub, tmp_path: Path):
    assert constants.HF_HUB_DISABLE_XET and not is_xet_available()
    src = tmp_path / "src"
    files = _make_folder(src)
    HfApi().create_repo("tester/model")
    info = upload_folder(repo_id="tester/model", folder_path=src, commit_message="add files")

    repo = hub.server.repo("tester/model")
    head = repo.head()
    assert info.oid == head.sha and head.message == "add files"
    assert head.files["model.safetensors"].lfs and not head.files["notes.txt"].lfs
    assert not head.files["README.md"].lfs
    assert hub.server.validated_yaml and set(hub.server.validated_yaml) == {README}  # upload_folder checks it twice
    assert len(hub.server.calls("POST", r"^/tester/model\.git/info/lfs/objects/batch$")) == 1
    assert len(hub.server.calls("PUT", r"^/__lfs__/[0-9a-f]+$")) == 1  # basic transfer, one file

    local = Path(snapshot_download("tester/model", cache_dir=tmp_path / "cache"))
    downloaded = _read_tree(local)
    assert {k: v for k, v in downloaded.items() if k != ".gitattributes"} == files
    single = hf_hub_download("tester/model", "sub/dir/config.json", cache_dir=tmp_path / "cache2")
    assert Path(single).read_bytes() == files["sub/dir/config.json"]

    hub.server.tree_page_size = 2  # force the paging cursor (Link header) through list_repo_tree
    tree = {e.path: e for e in HfApi().list_repo_tree("tester/model", recursive=True)}
    assert set(tree) == {".gitattributes", *files, "sub", "sub/dir"}
    weights = tree["model.safetensors"]
    assert weights.lfs is not None and weights.lfs.sha256 == hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert weights.size == len(files["model.safetensors"])
    assert tree["notes.txt"].lfs is None


# ---------------------------------------------------------------------------------------------------------- 3


def test_multipart_lfs_upload(hub: LocalHub, tmp_path: Path):
    hub.server.multipart_threshold = 1024 * 1024
    hub.server.multipart_chunk_size = 1024 * 1024
    data = os.urandom(3 * 1024 * 1024 + 17)  # 4 parts, the last one short
    (tmp_path / "big.bin").write_bytes(data)
    HfApi().create_repo("tester/big")
    upload_file(path_or_fileobj=tmp_path / "big.bin", path_in_repo="big.bin", repo_id="tester/big")

    assert len(hub.server.calls("PUT", r"^/__lfs__/[0-9a-f]+/\d+$")) == 4
    assert len(hub.server.calls("POST", r"^/__lfs__/[0-9a-f]+$")) == 1  # completion
    assert len(hub.server.calls("POST", r"\.git/info/lfs/objects/verify$")) == 1
    assert hub.server.repo("tester/big").head().files["big.bin"].lfs
    assert Path(hf_hub_download("tester/big", "big.bin", cache_dir=tmp_path / "cache")).read_bytes() == data


# ---------------------------------------------------------------------------------------------------------- 4


def test_regular_mode_with_xet_on(hub: LocalHub, tmp_path: Path):
    hub.use_upload_mode("regular")
    assert is_xet_available() and hub.env["HF_HUB_DISABLE_XET"] == "0"
    src = tmp_path / "src"
    files = _make_folder(src)
    HfApi().create_repo("tester/plain")
    upload_folder(repo_id="tester/plain", folder_path=src)

    head = hub.server.repo("tester/plain").head()
    assert not any(blob.lfs for blob in head.files.values())
    assert hub.server.calls("POST", r"lfs/objects/batch") == []
    local = Path(snapshot_download("tester/plain", cache_dir=tmp_path / "cache"))
    assert {k: v for k, v in _read_tree(local).items() if k != ".gitattributes"} == files


# ---------------------------------------------------------------------------------------------------------- 5


@pytest.mark.parametrize("mode", ["lfs", "regular"])
def test_unchanged_reupload_makes_no_commit(hub: LocalHub, tmp_path: Path, mode: str):
    hub.use_upload_mode(mode)
    src = tmp_path / "src"
    _make_folder(src)
    HfApi().create_repo("tester/again")
    repo = hub.server.repo("tester/again")
    first = upload_folder(repo_id="tester/again", folder_path=src)
    assert len(repo.commits) == 2  # initial commit + upload

    second = upload_folder(repo_id="tester/again", folder_path=src)
    assert len(repo.commits) == 2 and second.oid == first.oid

    (src / "notes.txt").write_bytes(b"changed\n")
    third = upload_folder(repo_id="tester/again", folder_path=src)
    assert len(repo.commits) == 3 and third.oid == repo.branches["main"]
    assert repo.files()["notes.txt"] == b"changed\n"


# ---------------------------------------------------------------------------------------------------------- 6


def test_bad_token_401_and_read_token_403(hub: LocalHub, tmp_path: Path):
    src = tmp_path / "src"
    _make_folder(src)
    HfApi().create_repo("tester/guarded")
    repo = hub.server.repo("tester/guarded")

    with pytest.raises(HfHubHTTPError) as unauthorized:
        HfApi(token="hf_not_a_token").whoami()
    assert unauthorized.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as unauthorized:
        HfApi(token="hf_not_a_token").upload_folder(repo_id="tester/guarded", folder_path=src)
    assert unauthorized.value.response.status_code == 401
    assert not isinstance(unauthorized.value, RepositoryNotFoundError)

    with pytest.raises(HfHubHTTPError) as forbidden:
        HfApi(token=hub.read_token).upload_folder(repo_id="tester/guarded", folder_path=src)
    assert forbidden.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as forbidden:
        HfApi(token=hub.read_token).create_repo("tester/other")
    assert forbidden.value.response.status_code == 403

    assert len(repo.commits) == 1 and ("model", "tester/other") not in hub.server.repos


# ---------------------------------------------------------------------------------------------------------- 7


@pytest.mark.parametrize("mode", ["lfs", "regular"])
def test_branches_pull_requests_and_pinned_revisions(hub: LocalHub, tmp_path: Path, mode: str):
    hub.use_upload_mode(mode)
    api = HfApi()
    src = tmp_path / "src"
    files = _make_folder(src)
    api.create_repo("tester/refs")
    repo = hub.server.repo("tester/refs")
    v1 = upload_folder(repo_id="tester/refs", folder_path=src).oid

    api.create_branch("tester/refs", branch="dev")
    with pytest.raises(HfHubHTTPError) as exists:
        api.create_branch("tester/refs", branch="dev")
    assert exists.value.response.status_code == 409
    api.create_branch("tester/refs", branch="dev", exist_ok=True)
    upload_file(path_or_fileobj=b"dev only\n", path_in_repo="dev.txt", repo_id="tester/refs", revision="dev")
    assert "dev.txt" in repo.files("dev") and "dev.txt" not in repo.files("main")

    (src / "notes.txt").write_bytes(b"proposed\n")
    pr = upload_folder(repo_id="tester/refs", folder_path=src, create_pr=True, commit_message="proposal")
    assert pr.pr_url == f"{hub.endpoint}/tester/refs/discussions/1" and pr.pr_revision == "refs/pr/1"
    assert repo.prs[1] == pr.oid and repo.branches["main"] == v1  # main unchanged

    refs = api.list_repo_refs("tester/refs", include_pull_requests=True)
    assert {b.name for b in refs.branches} == {"main", "dev"}
    assert [(p.ref, p.target_commit) for p in refs.pull_requests] == [("refs/pr/1", pr.oid)]

    proposed = hf_hub_download("tester/refs", "notes.txt", revision="refs/pr/1", cache_dir=tmp_path / "c1")
    assert Path(proposed).read_bytes() == b"proposed\n"
    pinned = hf_hub_download("tester/refs", "notes.txt", revision=v1, cache_dir=tmp_path / "c2")
    assert Path(pinned).read_bytes() == files["notes.txt"]
    snapshot = Path(snapshot_download("tester/refs", revision="dev", cache_dir=tmp_path / "c3"))
    assert (snapshot / "dev.txt").read_bytes() == b"dev only\n"

    with pytest.raises(HfHubHTTPError) as stale:  # parentCommit no longer the head of main
        api.upload_file(
            path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="tester/refs", parent_commit=repo.commits[0].sha
        )
    assert stale.value.response.status_code == 412


# ---------------------------------------------------------------------------------------------------------- 8


def test_transformers_push_to_hub_and_from_pretrained(hub: LocalHub):
    from transformers import AutoModelForCausalLM

    from longlora_hub.testing import tiny_llama

    model = tiny_llama(seed=3)
    model.push_to_hub("tester/tiny-llama", private=True, max_shard_size="200KB")  # sharded, like merged models
    repo = hub.server.repo("tester/tiny-llama")
    shards = [p for p in repo.files() if p.endswith(".safetensors")]
    assert repo.private and len(shards) > 1 and "model.safetensors.index.json" in repo.files()
    assert all(repo.head().files[p].lfs for p in shards)
    sha = repo.branches["main"]

    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        expected = model(ids).logits
        loaded = AutoModelForCausalLM.from_pretrained("tester/tiny-llama").eval()
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)
        pinned = AutoModelForCausalLM.from_pretrained("tester/tiny-llama", revision=sha).eval()
        torch.testing.assert_close(pinned(ids).logits, expected, rtol=0, atol=0)


def test_peft_adapter_push_and_load(hub: LocalHub):
    from peft import LoraConfig, PeftModel, get_peft_model

    from longlora_hub.testing import tiny_llama

    peft_model = get_peft_model(tiny_llama(seed=4), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    peft_model.eval().push_to_hub("tester/adapter")
    assert set(hub.server.repo("tester/adapter").files()) >= {"adapter_config.json", "adapter_model.safetensors"}

    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(tiny_llama(seed=4), "tester/adapter").eval()
        torch.testing.assert_close(loaded(ids).logits, peft_model(ids).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------- 9


def test_datasets_push_to_hub_and_load_dataset(hub: LocalHub):
    from datasets import Dataset, DatasetDict, load_dataset

    rows = {
        "train": {"text": ["a", "bb", "ccc"], "label": [0, 1, 0]},
        "validation": {"text": ["dd"], "label": [1]},
    }
    DatasetDict({split: Dataset.from_dict(data) for split, data in rows.items()}).push_to_hub("tester/tiny-ds")
    head = hub.server.repo("tester/tiny-ds", "dataset").head()
    assert any(p.startswith("data/train-") and b.lfs for p, b in head.files.items())
    assert b"configs:" in head.files["README.md"].data

    # The hf:// path the training code uses (HfFileSystem glob + download), first, so nothing is cached yet.
    train = load_dataset("parquet", data_files="hf://datasets/tester/tiny-ds/data/train-*.parquet", split="train")
    assert train.to_dict() == rows["train"]
    assert hub.server.calls("GET", r"^/datasets/tester/tiny-ds/resolve/.*/data/train-00000-of-00001\.parquet$")

    loaded = load_dataset("tester/tiny-ds")
    assert {split: loaded[split].to_dict() for split in loaded} == rows

    # Streaming reads the parquet files through HfFileSystem with HTTP Range requests.
    streamed = list(load_dataset("tester/tiny-ds", split="validation", streaming=True))
    assert streamed == [{"text": "dd", "label": 1}]


# --------------------------------------------------------------------------------------------------- contract


def test_resolve_headers_ranges_and_hf_filesystem(hub: LocalHub):
    """What the download clients rely on: HEAD without a body, quoted ETags, LFS linked headers, Range reads."""
    from huggingface_hub import HfFileSystem
    from huggingface_hub.utils import get_session

    data = bytes(range(256)) * 40
    HfApi().create_repo("tester/headers")
    upload_file(path_or_fileobj=data, path_in_repo="w.bin", repo_id="tester/headers")
    upload_file(path_or_fileobj=b"hello\n", path_in_repo="a.txt", repo_id="tester/headers")
    sha = hub.server.repo("tester/headers").branches["main"]
    auth = {"Authorization": f"Bearer {hub.write_token}"}
    url = f"{hub.endpoint}/tester/headers/resolve/main/"

    head = get_session().head(url + "w.bin", headers=auth)
    assert head.status_code == 200 and head.content == b"" and int(head.headers["Content-Length"]) == len(data)
    assert head.headers["X-Repo-Commit"] == sha and "X-Xet-Hash" not in head.headers
    digest = hashlib.sha256(data).hexdigest()
    assert head.headers["ETag"] == head.headers["X-Linked-Etag"] == f'"{digest}"'
    assert head.headers["X-Linked-Size"] == str(len(data))
    text = get_session().head(url + "a.txt")
    assert text.headers["ETag"].startswith('"') and "X-Linked-Etag" not in text.headers

    part = get_session().get(url + "w.bin", headers={**auth, "Range": "bytes=1000-1009"})
    assert part.status_code == 206 and part.content == data[1000:1010]
    assert part.headers["Content-Range"] == f"bytes 1000-1009/{len(data)}"
    missing = get_session().head(url + "nope.txt")
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"

    fs = HfFileSystem()
    with fs.open(f"tester/headers@{sha}/w.bin", "rb", block_size=1024) as f:
        f.seek(5000)
        assert f.read(100) == data[5000:5100]
    assert fs.info("tester/headers/w.bin")["lfs"]["sha256"] == digest
    assert sorted(fs.ls("tester/headers", detail=False)) == [
        "tester/headers/.gitattributes",
        "tester/headers/a.txt",
        "tester/headers/w.bin",
    ]


def test_subprocess_client_uses_hub_env(hub: LocalHub, tmp_path: Path):
    """A client in another process finds the local Hub, the token and the upload mode from `hub.env` alone."""
    script = (
        "from huggingface_hub import HfApi\n"
        "api = HfApi()\n"
        "api.create_repo('tester/from-subprocess', private=True)\n"
        "api.upload_file(path_or_fileobj=b'x' * 100, path_in_repo='w.safetensors', repo_id='tester/from-subprocess')\n"
        "print(api.whoami()['name'])\n"
    )
    env = {**os.environ, **hub.env}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "tester"
    repo = hub.server.repo("tester/from-subprocess")
    assert repo.private and repo.head().files["w.safetensors"].lfs  # lfs mode, Xet off in the child too
