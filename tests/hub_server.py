"""A small in-memory server that speaks enough of the Hugging Face Hub HTTP protocol for the REAL clients
(huggingface_hub, transformers, peft, datasets) to publish and download against it, with no internet.

Why not mock the clients: huggingface_hub 2.x talks through `httpx2`, so request mocks do not intercept it, and a
mock would only test our own idea of the protocol. Here the clients run unchanged over HTTP on 127.0.0.1; the
facts this server follows are in `/work/shared/docs/hub-protocol.md` and in the client sources it was checked
against (huggingface_hub 2.4.0).

Only the standard library is used. State is in memory, behind one lock. Conventions worth knowing:

- Repos are keyed by (type, "owner/name"); a namespace is required. Any namespace is accepted for the user
  "tester" (there are no organisations).
- Like the Hub, a new repo has one "initial commit" on `main` holding a `.gitattributes` file.
- Tokens: `hf_test_write` may write, `hf_test_read` may only read; any other token gets 401 everywhere; without a
  token public reads work, writes get 401 and private repos look missing (404 RepoNotFound, as on the Hub).
- `upload_mode` decides what `preupload` answers: "lfs" (binaries and files over `lfs_threshold` go through the
  LFS batch API; run the clients with Xet disabled) or "regular" (every file is inlined in the commit; Xet may stay
  on, since no Xet endpoint is ever needed). `multipart_threshold` / `multipart_chunk_size` force multipart LFS.
- Every request is logged in `requests`; a route this server does not know gets 501 and lands in `unhandled`, so a
  test can assert that the clients needed nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import secrets
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

WRITE_TOKEN = "hf_test_write"
READ_TOKEN = "hf_test_read"
USER = "tester"
DEFAULT_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".parquet", ".arrow", ".gguf")
DEFAULT_LFS_THRESHOLD = 10 * 1024 * 1024
DEFAULT_MULTIPART_THRESHOLD = 1 << 40  # effectively never, unless a test lowers it
DEFAULT_MULTIPART_CHUNK_SIZE = 8 * 1024 * 1024
DEFAULT_TREE_PAGE_SIZE = 1000
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.gguf filter=lfs diff=lfs merge=lfs -text\n"
    b"*.parquet filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    b"*.arrow filter=lfs diff=lfs merge=lfs -text\n"
)


def _now() -> str:
    """The Hub's timestamp format (parse_datetime in huggingface_hub expects milliseconds and a Z)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a file's `oid` and the ETag of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file stored in git in place of an LFS file's content."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Blob:
    """An immutable file version. LFS blobs keep their content too (we are the LFS storage as well)."""

    data: bytes
    lfs: bool
    git_oid: str
    sha256: str

    @classmethod
    def make(cls, data: bytes, lfs: bool) -> Blob:
        sha256 = hashlib.sha256(data).hexdigest()
        oid = git_blob_oid(lfs_pointer(sha256, len(data)) if lfs else data)
        return cls(data=data, lfs=lfs, git_oid=oid, sha256=sha256)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def etag(self) -> str:
        """The Hub's ETag: the sha256 for LFS files, the git blob oid otherwise."""
        return self.sha256 if self.lfs else self.git_oid

    def tree_entry(self, path: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": self.git_oid, "size": self.size, "path": path}
        if self.lfs:
            pointer_size = len(lfs_pointer(self.sha256, self.size))
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": pointer_size}
        return entry


@dataclass
class Commit:
    """One snapshot of the whole repo: files never change after the commit is made."""

    sha: str
    parent: str | None
    message: str
    description: str
    files: dict[str, Blob]
    date: str = field(default_factory=_now)


@dataclass
class Repo:
    """A repo's state: its history, refs and the LFS objects uploaded to it."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: str = field(default_factory=_now)
    commits: list[Commit] = field(default_factory=list)  # every commit ever made, oldest first
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit sha
    tags: dict[str, str] = field(default_factory=dict)  # tag name -> commit sha
    prs: dict[int, str] = field(default_factory=dict)  # PR number (refs/pr/N) -> commit sha
    discussions: dict[int, dict[str, Any]] = field(default_factory=dict)  # num -> title/is_pr/status
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content

    def commit(self, sha: str) -> Commit:
        for commit in self.commits:
            if commit.sha == sha:
                return commit
        raise KeyError(sha)

    def head(self, revision: str = "main") -> Commit:
        """The commit a revision (branch, tag, refs/pr/N or sha) points to; KeyError if there is none."""
        sha = self.resolve(revision)
        if sha is None:
            raise KeyError(revision)
        return self.commit(sha)

    def files(self, revision: str = "main") -> dict[str, bytes]:
        """The content of every file at a revision, for assertions."""
        return {path: blob.data for path, blob in self.head(revision).files.items()}

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        if revision.startswith("refs/heads/") and revision[len("refs/heads/") :] in self.branches:
            return self.branches[revision[len("refs/heads/") :]]
        if revision in self.tags:
            return self.tags[revision]
        if revision.startswith("refs/tags/") and revision[len("refs/tags/") :] in self.tags:
            return self.tags[revision[len("refs/tags/") :]]
        match = re.fullmatch(r"refs/pr/(\d+)", revision)
        if match:
            return self.prs.get(int(match[1]))
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            found = [c.sha for c in self.commits if c.sha.startswith(revision)]
            if len(found) == 1:
                return found[0]
        return None

    def last_commit_touching(self, head: Commit, path: str) -> Commit:
        """The newest commit (from `head` back) that changed `path` or anything under it, for `expand=True`."""

        def view(commit: Commit) -> dict[str, str]:
            prefix = path + "/"
            return {p: b.git_oid for p, b in commit.files.items() if p == path or p.startswith(prefix)}

        current = head
        while current.parent is not None:
            parent = self.commit(current.parent)
            if view(parent) != view(current):
                return current
            current = parent
        return current


class HubError(Exception):
    """An HTTP error answered the way the Hub does: JSON `{"error": ...}` plus `X-Error-Code`/`X-Error-Message`."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any
    body: bytes
    raw_query: str = ""
    params: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body or b"{}")

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    def flag(self, name: str) -> bool:
        return (self.arg(name) or "").lower() in ("1", "true", "yes")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_json(cls, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return cls(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})


@dataclass
class _PendingUpload:
    """An LFS upload the batch endpoint handed out: its URL is the only credential (like a presigned S3 URL)."""

    repo: Repo
    oid: str
    size: int
    chunk_size: int | None
    parts: dict[int, bytes] = field(default_factory=dict)


_REPO = r"(?P<T>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
_GIT_REPO = r"/(?:(?P<P>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects"


class HubServer:
    """The Hub stand-in. Start with `start()`, point clients at `endpoint`, inspect with `repo()` / `requests`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.lock = threading.RLock()
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None
        self.host, self.port = self._httpd.server_address[:2]
        self.endpoint = f"http://{self.host}:{self.port}"
        self._routes: list[tuple[set[str], re.Pattern[str], Callable[[Request], Response]]] = [
            ({"GET"}, re.compile(r"/api/whoami-v2"), self._whoami),
            ({"POST"}, re.compile(r"/api/repos/create"), self._create_repo),
            ({"DELETE"}, re.compile(r"/api/repos/delete"), self._delete_repo),
            ({"POST"}, re.compile(r"/api/validate-yaml"), self._validate_yaml),
            ({"GET", "POST", "HEAD"}, re.compile(r"/api/telemetry/.*"), lambda req: Response.of_json({})),
            ({"GET"}, re.compile(rf"/api/{_REPO}(?:/revision/(?P<rev>.+))?"), self._repo_info),
            ({"GET"}, re.compile(rf"/api/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"), self._tree),
            ({"POST"}, re.compile(rf"/api/{_REPO}/paths-info/(?P<rev>.+)"), self._paths_info),
            ({"POST"}, re.compile(rf"/api/{_REPO}/preupload/(?P<rev>.+)"), self._preupload),
            ({"POST"}, re.compile(rf"/api/{_REPO}/commit/(?P<rev>.+)"), self._commit),
            ({"GET"}, re.compile(rf"/api/{_REPO}/commits/(?P<rev>.+)"), self._list_commits),
            ({"GET"}, re.compile(rf"/api/{_REPO}/refs"), self._refs),
            ({"POST"}, re.compile(rf"/api/{_REPO}/branch/(?P<name>.+)"), self._create_branch),
            ({"DELETE"}, re.compile(rf"/api/{_REPO}/branch/(?P<name>.+)"), self._delete_branch),
            ({"POST"}, re.compile(rf"/api/{_REPO}/tag/(?P<rev>.+)"), self._create_tag),
            ({"PUT"}, re.compile(rf"/api/{_REPO}/settings"), self._settings),
            ({"POST"}, re.compile(rf"/api/{_REPO}/discussions"), self._create_discussion),
            ({"GET"}, re.compile(rf"/api/{_REPO}/discussions/(?P<num>\d+)"), self._discussion),
            ({"POST"}, re.compile(rf"{_GIT_REPO}/batch"), self._lfs_batch),
            ({"POST"}, re.compile(rf"{_GIT_REPO}/verify"), self._lfs_verify),
            ({"PUT"}, re.compile(r"/__lfs__/(?P<uid>[0-9a-f]+)"), self._lfs_put),
            ({"PUT"}, re.compile(r"/__lfs__/(?P<uid>[0-9a-f]+)/(?P<part>\d+)"), self._lfs_put_part),
            ({"POST"}, re.compile(r"/__lfs__/(?P<uid>[0-9a-f]+)"), self._lfs_complete),
            (
                {"GET", "HEAD"},
                re.compile(r"/(?:(?P<P>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
                self._resolve,
            ),
        ]
        self.reset()

    # ------------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def reset(self) -> None:
        """Forget every repo, log and setting, so each test starts from an empty Hub with the defaults."""
        with self.lock:
            self.repos: dict[tuple[str, str], Repo] = {}
            self.requests: list[tuple[str, str, str]] = []
            self.unhandled: list[str] = []
            self.errors: list[str] = []  # server-side exceptions (answered with 500)
            self.validated_yaml: list[str] = []  # README contents sent to /api/validate-yaml
            self.upload_mode = "lfs"
            self.lfs_threshold = DEFAULT_LFS_THRESHOLD
            self.lfs_suffixes = DEFAULT_LFS_SUFFIXES
            self.multipart_threshold = DEFAULT_MULTIPART_THRESHOLD
            self.multipart_chunk_size = DEFAULT_MULTIPART_CHUNK_SIZE
            self.tree_page_size = DEFAULT_TREE_PAGE_SIZE
            self._uploads: dict[str, _PendingUpload] = {}
            self._counter = 0

    # ----------------------------------------------------------------------------------------------- inspection

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """The stored state of one repo (KeyError if it was never created)."""
        with self.lock:
            return self.repos[(repo_type, repo_id)]

    def calls(self, method: str, pattern: str) -> list[tuple[str, str, str]]:
        """Logged requests with this method whose path matches the regex `pattern` (re.search)."""
        with self.lock:
            return [r for r in self.requests if r[0] == method and re.search(pattern, r[1])]

    def upload_mode_for(self, path: str, size: int) -> str:
        """The rule the Hub roughly follows: LFS for binaries and big files (in "lfs" mode), else regular."""
        if self.upload_mode == "regular" or size == 0:
            return "regular"
        if size > self.lfs_threshold or path.lower().endswith(tuple(self.lfs_suffixes)):
            return "lfs"
        return "regular"

    # ------------------------------------------------------------------------------------------------- dispatch

    def handle(self, req: Request) -> Response:
        with self.lock:
            self.requests.append((req.method, req.path, req.raw_query))
        for methods, pattern, handler in self._routes:
            match = pattern.fullmatch(req.path)
            if match and req.method in methods:
                req.params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                try:
                    with self.lock:
                        return handler(req)
                except HubError as err:
                    return _error_response(err)
                except Exception:  # a bug here must fail the test loudly, not hang the client
                    with self.lock:
                        self.errors.append(traceback.format_exc())
                    return _error_response(HubError(500, "internal error in the test Hub server"))
        route = f"{req.method} {req.path}"
        with self.lock:
            self.unhandled.append(route)
        return _error_response(HubError(501, f"Route not implemented by the test Hub server: {route}"))

    # ------------------------------------------------------------------------------------------------- helpers

    def _role(self, req: Request, *, required: bool = False) -> str | None:
        """'write', 'read' or None (no token). An unknown token is a 401 everywhere, as on the Hub."""
        auth = req.headers.get("Authorization")
        if not auth:
            if required:
                raise HubError(401, INVALID_CREDENTIALS)
            return None
        token = auth.split(" ", 1)[1].strip() if " " in auth else auth.strip()
        if token == WRITE_TOKEN:
            return "write"
        if token == READ_TOKEN:
            return "read"
        raise HubError(401, INVALID_CREDENTIALS)

    def _require_write(self, req: Request, action: str) -> None:
        role = self._role(req)
        if role is None:
            raise HubError(401, f"You must be authenticated to {action}. Pass a write token.")
        if role != "write":
            raise HubError(403, f"You don't have the rights to {action}: this token is read-only, use a write token")

    def _repo_for(self, req: Request, repo_type: str | None = None, *, write: str | None = None) -> Repo:
        """Look the repo up and check access; a private repo without a valid token looks missing (404)."""
        repo_type = repo_type or REPO_TYPES.get(req.params.get("T", ""), "model")
        if req.params.get("P"):
            repo_type = REPO_TYPES[req.params["P"]]
        role = self._role(req)
        repo = self.repos.get((repo_type, req.params["repo"]))
        if repo is None or (repo.private and role is None):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write is not None:
            self._require_write(req, write)
        return repo

    def _resolve_rev(self, repo: Repo, revision: str) -> Commit:
        sha = repo.resolve(revision)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commit(sha)

    def _new_commit(self, repo: Repo, parent: Commit | None, files: dict[str, Blob], message: str, desc: str) -> Commit:
        self._counter += 1
        oids = "\n".join(f"{p}:{b.git_oid}" for p, b in sorted(files.items()))
        seed = f"{parent.sha if parent else ''}\n{message}\n{oids}\n{self._counter}"
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent.sha if parent else None, message, desc, files)
        repo.commits.append(commit)
        return commit

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.endpoint}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    def _open_pr(self, repo: Repo, title: str, description: str, head: Commit) -> int:
        num = len(repo.discussions) + 1
        repo.discussions[num] = {"title": title, "description": description, "is_pr": True, "created": _now()}
        repo.prs[num] = head.sha
        return num

    # ------------------------------------------------------------------------------------------ account, repos

    def _whoami(self, req: Request) -> Response:
        role = self._role(req, required=True)
        return Response.of_json(
            {
                "type": "user",
                "id": "0" * 24,
                "name": USER,
                "fullname": "Test User",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}},
            }
        )

    def _create_repo(self, req: Request) -> Response:
        body = req.json()
        repo_type = body.get("type") or "model"
        namespace = body.get("organization") or USER
        repo_id = f"{namespace}/{body['name']}"
        self._require_write(req, f'create a {repo_type} under the namespace "{namespace}"')
        url = f"{self.endpoint}/{URL_PREFIXES[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.repos:
            return Response.of_json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
        private = bool(body.get("private")) or body.get("visibility") == "private"
        repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private)
        initial = self._new_commit(
            repo, None, {".gitattributes": Blob.make(GITATTRIBUTES, False)}, "initial commit", ""
        )
        repo.branches["main"] = initial.sha
        self.repos[(repo_type, repo_id)] = repo
        return Response.of_json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, req: Request) -> Response:
        body = req.json()
        key = (body.get("type") or "model", f"{body.get('organization') or USER}/{body['name']}")
        self._require_write(req, "delete this repo")
        if key not in self.repos:
            raise HubError(404, "Repository not found", "RepoNotFound")
        del self.repos[key]
        return Response.of_json({})

    def _settings(self, req: Request) -> Response:
        repo = self._repo_for(req, write="change the settings of this repo")
        body = req.json()
        if "private" in body:
            repo.private = bool(body["private"])
        if "visibility" in body:
            repo.private = body["visibility"] == "private"
        return Response.of_json({})

    def _validate_yaml(self, req: Request) -> Response:
        content = req.json().get("content", "")
        self.validated_yaml.append(content)
        if content.startswith("---") and "\n---" not in content[3:]:
            return Response.of_json({"errors": [{"message": "unterminated YAML front matter"}], "warnings": []}, 400)
        return Response.of_json({"errors": [], "warnings": []})

    def _repo_info(self, req: Request) -> Response:
        repo = self._repo_for(req)
        head = self._resolve_rev(repo, req.params.get("rev", "main"))
        with_blobs = req.flag("blobs")
        siblings = []
        for path, blob in sorted(head.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=blob.size, blobId=blob.git_oid)
                if blob.lfs:
                    pointer_size = len(lfs_pointer(blob.sha256, blob.size))
                    sibling["lfs"] = {"size": blob.size, "sha256": blob.sha256, "pointerSize": pointer_size}
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": head.sha,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "createdAt": repo.created_at,
            "lastModified": head.date,
            "siblings": siblings,
            "usedStorage": sum(b.size for b in head.files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        if repo.repo_type == "space":
            info.update(sdk="static", runtime={"stage": "RUNNING", "hardware": {"current": None, "requested": None}})
        return Response.of_json(info)

    # ------------------------------------------------------------------------------------------- reading trees

    def _tree(self, req: Request) -> Response:
        repo = self._repo_for(req)
        head = self._resolve_rev(repo, req.params["rev"])
        folder = req.params.get("path", "").strip("/")
        entries = self._list_folder(repo, head, folder, recursive=req.flag("recursive"), expand=req.flag("expand"))
        start = int(req.arg("cursor") or 0)
        page = entries[start : start + self.tree_page_size]
        headers = {}
        if start + self.tree_page_size < len(entries):
            query = {k: v for k, v in req.query.items() if k != "cursor"}
            query["cursor"] = [str(start + self.tree_page_size)]
            next_url = f"{self.endpoint}{req.path}?{'&'.join(_flatten(query))}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        return Response.of_json(page, headers=headers)

    def _list_folder(self, repo: Repo, head: Commit, folder: str, *, recursive: bool, expand: bool) -> list[dict]:
        prefix = folder + "/" if folder else ""
        files = {p: b for p, b in head.files.items() if p.startswith(prefix)}
        if folder and not files:
            raise HubError(404, f"Entry not found: {folder}", "EntryNotFound", {"X-Repo-Commit": head.sha})
        dirs: set[str] = set()
        for path in files:
            parts = path[len(prefix) :].split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                if recursive or depth == 1:
                    dirs.add(prefix + "/".join(parts[:depth]))
        entries = [self._entry(repo, head, d, None, expand) for d in dirs]
        entries += [
            self._entry(repo, head, p, b, expand) for p, b in files.items() if recursive or "/" not in p[len(prefix) :]
        ]
        return sorted(entries, key=lambda e: (e["type"] != "directory", e["path"]))

    def _entry(self, repo: Repo, head: Commit, path: str, blob: Blob | None, expand: bool) -> dict[str, Any]:
        if blob is None:
            listing = "\n".join(f"{p}:{b.git_oid}" for p, b in sorted(head.files.items()) if p.startswith(path + "/"))
            entry: dict[str, Any] = {
                "type": "directory",
                "oid": hashlib.sha1(listing.encode()).hexdigest(),
                "path": path,
            }
        else:
            entry = blob.tree_entry(path)
        if expand:
            last = repo.last_commit_touching(head, path)
            entry["lastCommit"] = {"id": last.sha, "title": last.message, "date": last.date}
            if blob is not None:
                entry["securityFileStatus"] = {"status": "safe", "avScan": None, "pickleImportScan": None}
        return entry

    def _paths_info(self, req: Request) -> Response:
        repo = self._repo_for(req)
        head = self._resolve_rev(repo, req.params["rev"])
        content_type = req.headers.get("Content-Type", "")
        if "json" in content_type:
            body = req.json()
            paths, expand = body.get("paths", []), bool(body.get("expand"))
        else:
            form = parse_qs(req.body.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), (form.get("expand") or ["false"])[0].lower() == "true"
        entries = []
        for raw in paths:
            path = raw.strip("/")
            if path in head.files:
                entries.append(self._entry(repo, head, path, head.files[path], expand))
            elif path == "" or any(p.startswith(path + "/") for p in head.files):
                entries.append(self._entry(repo, head, path, None, expand))
        return Response.of_json(entries)

    def _list_commits(self, req: Request) -> Response:
        repo = self._repo_for(req)
        commit: Commit | None = self._resolve_rev(repo, req.params["rev"])
        items = []
        while commit is not None:
            items.append(
                {
                    "id": commit.sha,
                    "title": commit.message,
                    "message": commit.description,
                    "authors": [{"user": USER, "avatar": ""}],
                    "date": commit.date,
                }
            )
            commit = repo.commit(commit.parent) if commit.parent else None
        return Response.of_json(items)

    def _refs(self, req: Request) -> Response:
        repo = self._repo_for(req)
        refs: dict[str, Any] = {
            "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in repo.branches.items()],
            "converts": [],
            "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in repo.tags.items()],
        }
        if req.flag("include_prs"):
            refs["pullRequests"] = [
                {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": s} for n, s in repo.prs.items()
            ]
        return Response.of_json(refs)

    def _resolve(self, req: Request) -> Response:
        repo = self._repo_for(req)
        head = self._resolve_rev(repo, req.params["rev"])
        path = req.params["path"]
        blob = head.files.get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": head.sha})
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{blob.etag}"',
            "X-Repo-Commit": head.sha,
        }
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        byte_range = req.headers.get("Range")
        if not byte_range:
            return Response(200, blob.data, headers)
        start, end = _parse_range(byte_range, blob.size)
        if start > end:
            raise HubError(416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{blob.size}"})
        headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
        return Response(206, blob.data[start : end + 1], headers)

    # ----------------------------------------------------------------------------------------------- writing

    def _preupload(self, req: Request) -> Response:
        repo = self._repo_for(req, write="upload files to this repo")
        head = self._resolve_rev(repo, req.params["rev"])
        answers = []
        for item in req.json().get("files", []):
            path, size = item["path"], int(item.get("size", 0))
            mode = self.upload_mode_for(path, size)
            stored = head.files.get(path)
            oid = None
            if stored is not None:  # what the client compares with its local oid to skip unchanged files
                oid = stored.sha256 if mode == "lfs" else git_blob_oid(stored.data)
            answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return Response.of_json({"files": answers, "commitOid": head.sha})

    def _commit(self, req: Request) -> Response:
        repo = self._repo_for(req, write="push to this repo")
        revision = req.params["rev"]
        lines = [json.loads(line) for line in req.body.decode().splitlines() if line.strip()]
        header = next((item["value"] for item in lines if item["key"] == "header"), {})
        parent_commit = header.get("parentCommit")
        create_pr = req.flag("create_pr")

        if create_pr:
            base = self._resolve_rev(repo, parent_commit or revision)
        else:
            branch = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
            pr_match = re.fullmatch(r"refs/pr/(\d+)", revision)
            if pr_match and int(pr_match[1]) in repo.prs:
                base = repo.commit(repo.prs[int(pr_match[1])])
            elif branch in repo.branches:
                base = repo.commit(repo.branches[branch])
            elif repo.resolve(revision) is not None:
                raise HubError(400, f"Invalid rev id: {revision} is not a branch; commits must target a branch")
            else:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            if parent_commit and not base.sha.startswith(parent_commit):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")

        files = dict(base.files)
        for item in lines:
            key, value = item["key"], item.get("value", {})
            if key == "file":
                data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"]
                data = data.encode() if isinstance(data, str) else data
                if self.upload_mode_for(value["path"], len(data)) == "lfs":
                    raise HubError(
                        400,
                        f"Your push was rejected because {value['path']} must be stored with Git LFS "
                        "(binary or larger than 10 MiB); the preupload endpoint said so.",
                    )
                files[value["path"]] = Blob.make(data, lfs=False)
            elif key == "lfsFile":
                data = repo.lfs_objects.get(value["oid"])
                if data is None:
                    data = next(
                        (r.lfs_objects[value["oid"]] for r in self.repos.values() if value["oid"] in r.lfs_objects),
                        None,
                    )
                if data is None or ("size" in value and int(value["size"]) != len(data)):
                    raise HubError(400, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]] = Blob.make(data, lfs=True)
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                doomed = [p for p in files if p.startswith(prefix)]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {value['path']}", "EntryNotFound")
                for path in doomed:
                    del files[path]
            elif key != "header":
                raise HubError(400, f"Unknown commit operation: {key}")

        commit = self._new_commit(repo, base, files, header.get("summary", ""), header.get("description", ""))
        pr_url = None
        if create_pr:
            num = self._open_pr(repo, commit.message, commit.description, commit)
            pr_url = f"{self._repo_url(repo)}/discussions/{num}"
        elif revision.startswith("refs/pr/"):
            repo.prs[int(revision.rsplit("/", 1)[1])] = commit.sha
        else:
            repo.branches[branch] = commit.sha
        return Response.of_json(
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{self._repo_url(repo)}/commit/{commit.sha}",
                "commitMessage": commit.message,
                "pullRequestUrl": pr_url,
            }
        )

    def _create_branch(self, req: Request) -> Response:
        repo = self._repo_for(req, write="create a branch in this repo")
        name = req.params["name"]
        if name.startswith("refs/") or not name:
            raise HubError(400, f"Invalid branch name: {name}")
        if name in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{name}")
        body = req.json()
        start = self._resolve_rev(repo, body.get("startingPoint") or "main")
        if body.get("emptyBranch"):
            start = self._new_commit(repo, None, {}, "empty branch", "")
        repo.branches[name] = start.sha
        return Response.of_json({})

    def _delete_branch(self, req: Request) -> Response:
        repo = self._repo_for(req, write="delete a branch in this repo")
        if req.params["name"] not in repo.branches:
            raise HubError(404, f"Invalid rev id: {req.params['name']}", "RevisionNotFound")
        del repo.branches[req.params["name"]]
        return Response.of_json({})

    def _create_tag(self, req: Request) -> Response:
        repo = self._repo_for(req, write="create a tag in this repo")
        target = self._resolve_rev(repo, req.params["rev"])
        tag = req.json()["tag"]
        if tag in repo.tags:
            raise HubError(409, f"Tag reference refs/tags/{tag} already exists")
        repo.tags[tag] = target.sha
        return Response.of_json({})

    def _create_discussion(self, req: Request) -> Response:
        repo = self._repo_for(req, write="open a discussion")
        body = req.json()
        if body.get("pullRequest"):
            num = self._open_pr(repo, body["title"], body.get("description", ""), repo.head("main"))
        else:
            num = len(repo.discussions) + 1
            repo.discussions[num] = {"title": body["title"], "description": "", "is_pr": False, "created": _now()}
        return Response.of_json({"num": num, "url": f"{self._repo_url(repo)}/discussions/{num}"})

    def _discussion(self, req: Request) -> Response:
        repo = self._repo_for(req)
        num = int(req.params["num"])
        if num not in repo.discussions:
            raise HubError(404, "Discussion not found")
        item = repo.discussions[num]
        return Response.of_json(
            {
                "num": num,
                "title": item["title"],
                "status": "draft" if item["is_pr"] else "open",
                "isPullRequest": item["is_pr"],
                "author": {"name": USER},
                "createdAt": item["created"],
                "repo": {"name": repo.repo_id, "type": repo.repo_type},
                "events": [],
                "changes": {"base": "refs/heads/main"},
                "filesWithConflicts": [],
                "diff": "",
            }
        )

    # ---------------------------------------------------------------------------------------------------- LFS

    def _lfs_batch(self, req: Request) -> Response:
        repo = self._repo_for(req, write="upload LFS files to this repo")
        body = req.json()
        if body.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported")
        multipart_allowed = "multipart" in body.get("transfers", ["basic"])
        base = f"{self.endpoint}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}.git/info/lfs/objects"
        objects, chose_multipart = [], False
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            answer: dict[str, Any] = {"oid": oid, "size": size}
            if repo.lfs_objects.get(oid) is None:  # unknown content: hand out an upload URL
                uid = secrets.token_hex(16)
                upload_url = f"{self.endpoint}/__lfs__/{uid}"
                chunk = self.multipart_chunk_size if multipart_allowed and size > self.multipart_threshold else None
                self._uploads[uid] = _PendingUpload(repo, oid, size, chunk)
                upload: dict[str, Any] = {"href": upload_url}
                if chunk is not None:
                    chose_multipart = True
                    parts = {str(n): f"{upload_url}/{n}" for n in range(1, math.ceil(size / chunk) + 1)}
                    upload["header"] = {"chunk_size": str(chunk), **parts}
                answer["authenticated"] = True
                answer["actions"] = {"upload": upload, "verify": {"href": f"{base}/verify"}}
            objects.append(answer)
        transfer = "multipart" if chose_multipart else "basic"
        return Response(
            200,
            json.dumps({"transfer": transfer, "objects": objects, "hash_algo": "sha256"}).encode(),
            {"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _store_lfs(self, upload: _PendingUpload, data: bytes) -> None:
        if len(data) != upload.size or hashlib.sha256(data).hexdigest() != upload.oid:
            raise HubError(400, f"Uploaded content does not match oid {upload.oid} / size {upload.size}")
        upload.repo.lfs_objects[upload.oid] = data

    def _pending(self, uid: str) -> _PendingUpload:
        if uid not in self._uploads:
            raise HubError(404, "Unknown or expired upload URL")
        return self._uploads[uid]

    def _lfs_put(self, req: Request) -> Response:
        upload = self._pending(req.params["uid"])
        if upload.chunk_size is not None:
            raise HubError(400, "This upload is multipart: PUT the parts")
        self._store_lfs(upload, req.body)
        del self._uploads[req.params["uid"]]
        return Response(200, b"", {"ETag": f'"{hashlib.md5(req.body).hexdigest()}"'})

    def _lfs_put_part(self, req: Request) -> Response:
        upload = self._pending(req.params["uid"])
        number = int(req.params["part"])
        if upload.chunk_size is None or not 1 <= number <= math.ceil(upload.size / upload.chunk_size):
            raise HubError(400, f"Unexpected part number {number}")
        upload.parts[number] = req.body
        return Response(200, b"", {"ETag": f'"{hashlib.md5(req.body).hexdigest()}"'})

    def _lfs_complete(self, req: Request) -> Response:
        upload = self._pending(req.params["uid"])
        body = req.json()
        if body.get("oid") != upload.oid or upload.chunk_size is None:
            raise HubError(400, "Completion does not match the upload")
        expected = math.ceil(upload.size / upload.chunk_size)
        numbers = [int(p["partNumber"]) for p in body.get("parts", [])]
        if numbers != list(range(1, expected + 1)) or set(upload.parts) != set(numbers):
            raise HubError(400, f"Parts {numbers} do not cover the {expected} expected parts")
        for part in body["parts"]:
            if part["etag"].strip('"') != hashlib.md5(upload.parts[int(part["partNumber"])]).hexdigest():
                raise HubError(400, f"ETag mismatch for part {part['partNumber']}")
        self._store_lfs(upload, b"".join(upload.parts[n] for n in numbers))
        del self._uploads[req.params["uid"]]
        return Response.of_json({})

    def _lfs_verify(self, req: Request) -> Response:
        repo = self._repo_for(req, write="verify LFS uploads")
        body = req.json()
        data = repo.lfs_objects.get(body.get("oid", ""))
        if data is None or len(data) != int(body.get("size", -1)):
            raise HubError(404, f"LFS object {body.get('oid')} of size {body.get('size')} was not uploaded")
        return Response.of_json({})


def _flatten(query: dict[str, list[str]]) -> list[str]:
    return [f"{quote(k)}={quote(v)}" for k, values in query.items() for v in values]


def _parse_range(header: str, size: int) -> tuple[int, int]:
    """One `bytes=a-b` / `bytes=a-` / `bytes=-n` range, clamped; start > end means unsatisfiable."""
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not match or not (match[1] or match[2]):
        raise HubError(400, f"Unsupported Range header: {header}")
    if not match[1]:
        return max(size - int(match[2]), 0), size - 1
    start = int(match[1])
    end = min(int(match[2]), size - 1) if match[2] else size - 1
    return start, end


def _error_response(err: HubError) -> Response:
    header_safe = err.message.encode("ascii", "backslashreplace").decode()  # header values must be latin-1
    headers = {"X-Error-Message": header_safe, **err.headers}
    if err.code:
        headers["X-Error-Code"] = err.code
    return Response.of_json({"error": err.message}, err.status, headers)


class _Handler(BaseHTTPRequestHandler):
    """Reads the whole request, lets the HubServer answer it, writes the response (no body for HEAD)."""

    protocol_version = "HTTP/1.1"  # keep-alive: httpx reuses connections
    server: Any

    def _handle(self) -> None:
        body = self._read_body()
        split = urlsplit(self.path)
        query = parse_qs(split.query, keep_blank_values=True)
        req = Request(self.command, split.path, query, self.headers, body, split.query)
        resp = self.server.hub.handle(req)
        self.send_response(resp.status)
        for name, value in resp.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(resp.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(resp.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are logged in `HubServer.requests`, not on stderr."""
