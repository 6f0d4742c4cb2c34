"""A Hugging Face Hub-compatible HTTP server for tests, built on the standard library only.

The real `huggingface_hub` and `datasets` clients talk to it when `HF_ENDPOINT` points at `HubServer.url`. It
implements the subset of the Hub API that huggingface_hub 2.4 and datasets 5.2 call to create a repository, commit
to it and download from it, read from their source:

- `GET /api/whoami-v2`, `POST /api/repos/create`, `POST /api/repos/delete`, `POST /api/validate-yaml`;
- per repository (`/api/{models,datasets,spaces}/{namespace}/{name}/...`): the info route, `revision/{rev}`,
  `tree/{rev}[/{path}]`, `paths-info/{rev}`, `refs`, `commits/{rev}`, `preupload/{rev}`, `commit/{rev}` (the
  NDJSON protocol) and `branch/{name}`;
- the Git LFS batch API (`{repo}.git/info/lfs/objects/batch` and `.../verify`) with the "basic" transfer;
- `HEAD` and `GET` on `{repo}/resolve/{rev}/{path}`, with the headers the download code reads (`ETag`,
  `X-Repo-Commit`, `X-Linked-Etag`, `X-Linked-Size`, `Content-Length`, `Content-Range`).

As on the Hub, LFS content does not travel through the API host. A second listener, `HubServer.cdn_url`, plays the
storage bucket. The batch API returns signed upload URLs on it, and `resolve` redirects (302) a request for an LFS
file to a signed download URL on it. Because the two listeners are different origins, the client drops its
`Authorization` header on those requests, as it does against the real Hub.

Repositories are stored under a folder (a temporary one by default) with their full history: every commit has a
40-hex id, a parent and a snapshot of the file tree, `main` is created with an initial commit holding
`.gitattributes`, and a revision is a branch name or a full commit id.

Authentication uses a fixed table of tokens, each mapped to a user name. A private repository is visible to its
owner only: a request without a token gets 401, one with another user's token gets 404, both with
`X-Error-Code: RepoNotFound`, as the Hub answers. A token that is not in the table gets 401 "Invalid credentials in
Authorization header" on every route.

The server records what it served (`requests`, `lfs_uploads`) and what went wrong (`errors` for exceptions raised
while handling a request, `unknown_routes` for requests it has no handler for), so that tests can check both.

Usage:

    with HubServer(tokens={"hf_write": "alice"}) as server:
        os.environ["HF_ENDPOINT"] = server.url
        ...
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import fnmatch
import hashlib
import hmac
import http.server
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

logger = logging.getLogger(__name__)

# Files of this size or more go through Git LFS, whatever their type, as the Hub requires LFS above 10 MB.
# NOTE: whether the Hub counts 10 MB as 10**7 or 10 * 2**20 bytes was not checked; this server uses the latter.
DEFAULT_LFS_THRESHOLD = 10 * 1024 * 1024

# The Hub returns at most 1,000 entries per page of a tree listing.
DEFAULT_TREE_PAGE_SIZE = 1000

# Signed CDN and upload URLs stay valid this long (seconds).
SIGNED_URL_LIFETIME = 3600

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}

# Written as `.gitattributes` by the initial commit of every repository: common weight, array and archive formats
# go through LFS. Any other binary file goes through LFS too, because preupload detects binary content.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.bin",
        "*.safetensors",
        "*.pt",
        "*.pth",
        "*.ckpt",
        "*.h5",
        "*.msgpack",
        "*.onnx",
        "*.pkl",
        "*.npy",
        "*.npz",
        "*.parquet",
        "*.arrow",
        "*.tar",
        "*.tar.*",
        "*.zip",
        "*.gz",
        "*.zst",
        "*tfevents*",
    )
)

COMMIT_ID_PATTERN = re.compile(r"[0-9a-f]{40}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class HubError(Exception):
    """An error sent to the client as an HTTP status, a JSON body and the Hub's error headers."""

    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}


@dataclasses.dataclass
class RequestRecord:
    """One request that the server handled."""

    listener: str  # "api" or "cdn"
    method: str
    path: str
    status: int
    user: str | None


def git_blob_id(data: bytes) -> str:
    """Return the git object id of a blob, as `git hash-object` computes it."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """Return the Git LFS pointer file that git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def match_git_pattern(pattern: str, path: str) -> bool:
    """Match a `.gitattributes` or `.gitignore` pattern against a repository path.

    A pattern without a slash matches the file name at any depth, and one with a slash matches the whole path.
    NOTE: negation (`!`) and the finer rules of `**` are not implemented; `fnmatch` lets `*` cross slashes.
    """
    pattern = pattern.rstrip("/")
    if "/" not in pattern:
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern) or fnmatch.fnmatchcase(path, pattern)
    return fnmatch.fnmatchcase(path, pattern.lstrip("/"))


def parse_pattern_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


class RepoStore:
    """Repositories, their history and their file content, kept in memory and mirrored under a folder.

    Layout: `blobs/<git blob id>` contains regular files, `repos/<type>s/<namespace>/<name>/lfs/<sha256>` the LFS
    objects uploaded to that repository, and `.../repo.json` its metadata and commits. A commit stores the whole
    tree as `{path: {"oid", "size", "lfs"}}`, where `lfs` is `{"oid": sha256, "size", "pointerSize"}` or None.
    Callers hold `lock` around every call.
    """

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], dict] = {}
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        for metadata_path in sorted(root.glob("repos/*/*/*/repo.json")):
            repo = json.loads(metadata_path.read_text())
            self.repos[(repo["type"], repo["id"])] = repo

    # Repositories

    def repo_folder(self, repo: dict) -> Path:
        return self.root / "repos" / f"{repo['type']}s" / repo["id"]

    def save(self, repo: dict) -> None:
        folder = self.repo_folder(repo)
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / "repo.json.tmp"
        temporary.write_text(json.dumps(repo, indent=1))
        os.replace(temporary, folder / "repo.json")

    def create_repo(self, repo_type: str, repo_id: str, private: bool, author: str) -> dict:
        repo = {
            "type": repo_type,
            "id": repo_id,
            "private": private,
            "created_at": now_iso(),
            "branches": {},
            "commits": {},
        }
        self.repos[(repo_type, repo_id)] = repo
        self.add_commit(
            repo,
            branch="main",
            parent=None,
            files={".gitattributes": self.store_blob(DEFAULT_GITATTRIBUTES.encode())},
            title="initial commit",
            message="",
            author=author,
            operations=[{"type": "file", "path": ".gitattributes"}],
        )
        return repo

    def delete_repo(self, repo: dict) -> None:
        del self.repos[(repo["type"], repo["id"])]
        shutil.rmtree(self.repo_folder(repo), ignore_errors=True)

    # Content

    def store_blob(self, data: bytes) -> dict:
        """Store a regular file and return its tree entry."""
        oid = git_blob_id(data)
        path = self.root / "blobs" / oid
        if not path.exists():
            path.write_bytes(data)
        return {"oid": oid, "size": len(data), "lfs": None}

    def lfs_path(self, repo: dict, sha256: str) -> Path:
        return self.repo_folder(repo) / "lfs" / sha256

    def has_lfs_object(self, repo: dict, sha256: str, size: int | None = None) -> bool:
        path = self.lfs_path(repo, sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def lfs_entry(self, sha256: str, size: int) -> dict:
        """Return the tree entry of an LFS file: git stores its pointer, whose blob id is the entry's oid."""
        pointer = lfs_pointer(sha256, size)
        return {
            "oid": git_blob_id(pointer),
            "size": size,
            "lfs": {"oid": sha256, "size": size, "pointerSize": len(pointer)},
        }

    def content_path(self, repo: dict, entry: dict) -> Path:
        if entry["lfs"] is not None:
            return self.lfs_path(repo, entry["lfs"]["oid"])
        return self.root / "blobs" / entry["oid"]

    # History

    def add_commit(
        self,
        repo: dict,
        *,
        branch: str,
        parent: str | None,
        files: dict[str, dict] | None = None,
        title: str,
        message: str,
        author: str,
        operations: list[dict],
        tree: dict[str, dict] | None = None,
    ) -> str:
        """Record a commit on `branch` and return its id.

        `tree` is the complete new tree; without it, `files` are added to the parent's tree.
        """
        if tree is None:
            tree = dict(repo["commits"][parent]["tree"]) if parent else {}
            tree.update(files or {})
        date = now_iso()
        # The id hashes the tree, parent, message and time, so two commits never share one.
        digest_source = json.dumps(
            [sorted(tree.items()), parent, title, message, author, date, time.perf_counter_ns()]
        )
        commit_id = hashlib.sha1(digest_source.encode()).hexdigest()
        repo["commits"][commit_id] = {
            "id": commit_id,
            "parents": [parent] if parent else [],
            "title": title,
            "message": message,
            "author": author,
            "date": date,
            "tree": tree,
            "operations": operations,
        }
        repo["branches"][branch] = commit_id
        self.save(repo)
        return commit_id

    def resolve_revision(self, repo: dict, revision: str) -> str:
        """Return the commit id that a branch name or a full commit id points to."""
        if revision in repo["branches"]:
            return repo["branches"][revision]
        if COMMIT_ID_PATTERN.fullmatch(revision) and revision in repo["commits"]:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def history(self, repo: dict, commit_id: str) -> Iterator[dict]:
        """Yield the commits reachable from `commit_id` through first parents, newest first."""
        while commit_id:
            commit = repo["commits"][commit_id]
            yield commit
            commit_id = commit["parents"][0] if commit["parents"] else None

    def last_commit_touching(self, repo: dict, commit_id: str, path: str) -> dict:
        """Return the newest commit that changed `path` (a file, or any file under a folder)."""

        def snapshot(commit: dict) -> list:
            tree = commit["tree"]
            if path in tree:
                return [tree[path]["oid"]]
            prefix = path + "/"
            return sorted((name, entry["oid"]) for name, entry in tree.items() if name.startswith(prefix))

        newest = None
        for commit in self.history(repo, commit_id):
            if newest is not None and snapshot(commit) != snapshot(newest):
                return newest
            newest = commit
        return newest


def folders_of(tree: dict[str, dict]) -> set[str]:
    folders = set()
    for path in tree:
        parts = path.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            folders.add("/".join(parts[:depth]))
    return folders


def folder_oid(tree: dict[str, dict], folder: str) -> str:
    prefix = folder + "/"
    listing = sorted((path, entry["oid"]) for path, entry in tree.items() if path.startswith(prefix))
    return hashlib.sha1(json.dumps(listing).encode()).hexdigest()


class HubServer:
    """A Hub-compatible server on 127.0.0.1: an API listener and a CDN listener, each on a free port.

    Args:
        tokens: the accepted access tokens, each mapped to its user name.
        storage_dir: the folder that stores the repositories; a temporary folder, removed by `stop()`, by default.
        lfs_threshold: the size in bytes from which preupload sends any file through LFS.
        tree_page_size: the number of entries per page of a tree listing or commit list.
    """

    def __init__(
        self,
        tokens: dict[str, str] | None = None,
        storage_dir: str | os.PathLike | None = None,
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
        tree_page_size: int = DEFAULT_TREE_PAGE_SIZE,
    ):
        self.tokens = dict(tokens) if tokens is not None else {"hf_test_token": "test-user"}
        self._owns_storage = storage_dir is None
        self.storage_dir = (
            Path(storage_dir) if storage_dir is not None else Path(tempfile.mkdtemp(prefix="hub-server-"))
        )
        self.lfs_threshold = lfs_threshold
        self.tree_page_size = tree_page_size
        self.store = RepoStore(self.storage_dir)
        self.requests: list[RequestRecord] = []
        self.lfs_uploads: list[str] = []
        self.errors: list[str] = []
        self.unknown_routes: list[str] = []
        self._signing_key = secrets.token_bytes(32)
        self._pending_uploads: dict[str, dict] = {}
        self._api: _ThreadingServer | None = None
        self._cdn: _ThreadingServer | None = None
        self._threads: list[threading.Thread] = []

    # Lifecycle

    @property
    def url(self) -> str:
        """The API endpoint, for `HF_ENDPOINT`."""
        if self._api is None:
            raise RuntimeError("HubServer is not running: call start() first.")
        return f"http://127.0.0.1:{self._api.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        """The origin that serves LFS uploads and downloads through signed URLs."""
        if self._cdn is None:
            raise RuntimeError("HubServer is not running: call start() first.")
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def start(self) -> HubServer:
        if self._api is not None:
            raise RuntimeError(f"HubServer is already running at {self.url}.")
        self._api = _ThreadingServer(("127.0.0.1", 0), _ApiHandler, self)
        self._cdn = _ThreadingServer(("127.0.0.1", 0), _CdnHandler, self)
        for listener in (self._api, self._cdn):
            thread = threading.Thread(
                target=listener.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"hub-server-{listener.server_address[1]}",
            )
            thread.daemon = True
            thread.start()
            self._threads.append(thread)
        logger.info("Hub server listening at %s (CDN %s), storage %s", self.url, self.cdn_url, self.storage_dir)
        return self

    def stop(self) -> None:
        """Stop both listeners, close open connections and remove the storage folder if the server created it."""
        for listener in (self._api, self._cdn):
            if listener is not None:
                listener.shutdown()
                listener.close_connections()
                listener.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._api = self._cdn = None
        self._threads = []
        if self._owns_storage:
            shutil.rmtree(self.storage_dir, ignore_errors=True)
        logger.info("Hub server stopped")

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # Inspection helpers for tests

    def commits(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list[dict]:
        """Return the commits of a repository reachable from `revision`, newest first."""
        with self.store.lock:
            repo = self.store.repos[(repo_type, repo_id)]
            return [dict(commit) for commit in self.store.history(repo, self.store.resolve_revision(repo, revision))]

    # URL signing for the CDN listener

    def sign(self, path: str, expires: int) -> str:
        return hmac.new(self._signing_key, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def signed_cdn_url(self, path: str, **params: str) -> str:
        expires = int(time.time()) + SIGNED_URL_LIFETIME
        query = "".join(f"&{key}={quote(value, safe='')}" for key, value in params.items())
        return f"{self.cdn_url}{path}?expires={expires}&signature={self.sign(path, expires)}{query}"

    def check_signature(self, path: str, query: dict[str, list[str]]) -> None:
        try:
            expires = int(query["expires"][0])
            signature = query["signature"][0]
        except (KeyError, ValueError):
            raise HubError(403, "Missing or malformed signature.")
        if expires < time.time() or not hmac.compare_digest(signature, self.sign(path, expires)):
            raise HubError(403, "Request signature does not match or has expired.")


class _ThreadingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler_class, hub: HubServer):
        self.hub = hub
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler_class)

    def close_connections(self) -> None:
        """Close idle keep-alive connections, so that their handler threads end."""
        with self.connections_lock:
            for connection in list(self.open_connections):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _BaseHandler(http.server.BaseHTTPRequestHandler):
    """Request plumbing shared by both listeners: body reading, responses, errors and the request log."""

    protocol_version = "HTTP/1.1"
    server_version = "HubTestServer/1.0"
    timeout = 60  # seconds an idle keep-alive connection stays open
    listener_name = "api"
    server: _ThreadingServer

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.open_connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.open_connections.discard(self.connection)
        super().finish()

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.listener_name, format % args)

    # Request parsing

    def split_path(self) -> tuple[str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        return parts.path, parse_qs(parts.query, keep_blank_values=True)

    def iter_body(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Yield the request body, whether sent with Content-Length or with chunked transfer encoding.

        The body can be read once: a second call yields nothing.
        """
        if self.body_read:
            return
        self.body_read = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size_line = self.rfile.readline(1024)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailer headers
                    return
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(remaining, chunk_size))
                    if not chunk:
                        raise HubError(400, "Request body ended before the announced chunk size.")
                    remaining -= len(chunk)
                    yield chunk
                self.rfile.readline(1024)  # the CRLF that ends each chunk
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                chunk = self.rfile.read(min(remaining, chunk_size))
                if not chunk:
                    raise HubError(400, "Request body ended before Content-Length bytes.")
                remaining -= len(chunk)
                yield chunk

    def read_body(self) -> bytes:
        return b"".join(self.iter_body())

    def read_json(self) -> Any:
        body = self.read_body()
        try:
            return json.loads(body or b"{}")
        except ValueError as error:
            raise HubError(400, f"Request body is not valid JSON: {error}")

    # Responses

    def send(
        self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str | None = None
    ) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self.response_status = status

    def send_json(self, data: Any, status: int = 200, headers: dict | None = None) -> None:
        self.send(status, json.dumps(data).encode(), headers, "application/json; charset=utf-8")

    def send_error_response(self, error: HubError) -> None:
        headers = dict(error.headers)
        if error.error_code:
            headers["X-Error-Code"] = error.error_code
        headers["X-Error-Message"] = error.message.encode("ascii", "replace").decode()
        self.send_json({"error": error.message}, error.status, headers)

    def send_file(self, path: Path, size: int, headers: dict) -> None:
        """Send a file, or the byte range that the Range header requests."""
        headers = {"Accept-Ranges": "bytes", **headers}
        start, end, status = 0, size - 1, 200
        range_header = self.headers.get("Range")
        if range_header:
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())
            if not match or match.groups() == ("", ""):
                raise HubError(
                    416, f"Invalid Range header: {range_header}", headers={"Content-Range": f"bytes */{size}"}
                )
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:
                start = max(size - int(match.group(2)), 0)
            if start >= size or start > end:
                raise HubError(
                    416,
                    f"Range {range_header} is outside the file of {size} bytes.",
                    headers={"Content-Range": f"bytes */{size}"},
                )
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1 if size else 0
        self.send_response(status)
        self.send_header("Content-Type", headers.pop("Content-Type", "application/octet-stream"))
        self.send_header("Content-Length", str(length))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.response_status = status
        if self.command == "HEAD" or not length:
            return
        with open(path, "rb") as file:
            file.seek(start)
            remaining = length
            while remaining:
                chunk = file.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)

    # Dispatch

    def handle_request(self) -> None:
        self.response_status = 0
        self.body_read = False
        self.user: str | None = None
        try:
            self.route()
        except HubError as error:
            logger.info(
                "%s %s %s failed with %d: %s", self.listener_name, self.command, self.path, error.status, error.message
            )
            self.drain_body()
            self.send_error_response(error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            self.hub.errors.append(f"{self.command} {self.path}\n{traceback.format_exc()}")
            logger.exception("Hub server failed on %s %s", self.command, self.path)
            self.drain_body()
            self.send_error_response(HubError(500, "Internal error in the test Hub server; see HubServer.errors."))
        self.hub.requests.append(
            RequestRecord(self.listener_name, self.command, self.path, self.response_status, self.user)
        )

    def drain_body(self) -> None:
        """Read what is left of the request body, so that the connection can serve the next request."""
        try:
            for _ in self.iter_body():
                pass
        except (HubError, ValueError, OSError):
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = handle_request

    def route(self) -> None:
        raise NotImplementedError

    def unknown_route(self) -> None:
        self.hub.unknown_routes.append(f"{self.listener_name} {self.command} {self.path}")
        logger.warning("Hub server has no handler for %s %s", self.command, self.path)
        raise HubError(404, f"No route for {self.command} {urlsplit(self.path).path} in the test Hub server.")


class _CdnHandler(_BaseHandler):
    """The storage-bucket stand-in: signed LFS uploads (`PUT /lfs-upload/<id>`) and downloads."""

    listener_name = "cdn"

    def route(self) -> None:
        path, query = self.split_path()
        upload = re.fullmatch(r"/lfs-upload/([A-Za-z0-9_-]+)", path)
        download = re.fullmatch(r"/lfs-objects/(model|dataset|space)/([^/]+)/([^/]+)/([0-9a-f]{64})", path)
        if upload and self.command == "PUT":
            self.hub.check_signature(path, query)
            self.receive_upload(upload.group(1))
        elif download and self.command in ("GET", "HEAD"):
            self.hub.check_signature(path, query)
            repo_type, namespace, name, sha256 = download.groups()
            with self.hub.store.lock:
                repo = self.hub.store.repos.get((repo_type, f"{namespace}/{name}"))
                if repo is None or not self.hub.store.has_lfs_object(repo, sha256):
                    raise HubError(404, "The object does not exist.")
                object_path = self.hub.store.lfs_path(repo, sha256)
            headers = {"ETag": f'"{sha256}"'}
            if "filename" in query:
                headers["Content-Disposition"] = f'inline; filename="{query["filename"][0]}"'
            self.send_file(object_path, object_path.stat().st_size, headers)
        else:
            self.unknown_route()

    def receive_upload(self, upload_id: str) -> None:
        """Store an LFS object sent by the basic transfer, after checking its size and sha256."""
        with self.hub.store.lock:
            pending = self.hub._pending_uploads.get(upload_id)
        if pending is None:
            raise HubError(404, f"Unknown or finished upload {upload_id}.")
        repo_folder, sha256, size = pending["folder"], pending["oid"], pending["size"]
        (repo_folder / "lfs").mkdir(parents=True, exist_ok=True)
        temporary = repo_folder / "lfs" / f".{sha256}.{upload_id}.part"
        digest, received = hashlib.sha256(), 0
        with open(temporary, "wb") as file:
            for chunk in self.iter_body():
                digest.update(chunk)
                received += len(chunk)
                file.write(chunk)
        if received != size or digest.hexdigest() != sha256:
            temporary.unlink()
            raise HubError(
                400,
                f"Uploaded content does not match the announced object: expected {size} bytes with "
                f"sha256 {sha256}, received {received} bytes with sha256 {digest.hexdigest()}.",
            )
        with self.hub.store.lock:
            os.replace(temporary, repo_folder / "lfs" / sha256)
            self.hub._pending_uploads.pop(upload_id, None)
            self.hub.lfs_uploads.append(sha256)
        self.send(200, headers={"ETag": f'"{sha256}"'})


class _ApiHandler(_BaseHandler):
    """The Hub API and `resolve` downloads."""

    listener_name = "api"

    # Authentication and access

    def authenticate(self) -> str | None:
        """Return the user of the request's token, or None without a token; reject an unknown token."""
        authorization = self.headers.get("Authorization", "")
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        user = self.hub.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self.user = user
        return user

    def find_repo(self, repo_type: str, repo_id: str, *, write: bool = False) -> dict:
        """Return a repository that the request may read (or write); otherwise raise the error that the Hub returns."""
        user = self.authenticate()
        repo = self.hub.store.repos.get((repo_type, repo_id))
        visible = repo is not None and (not repo["private"] or user == repo_id.split("/")[0])
        if not visible:
            message = "Repository not found" if user else "Invalid username or password."
            raise HubError(404 if user else 401, message, "RepoNotFound")
        if write:
            self.require_write(repo_id.split("/")[0])
        return repo

    def require_write(self, namespace: str) -> str:
        user = self.authenticate()
        if user is None:
            raise HubError(401, "You must be authenticated to write to the Hub.")
        if user != namespace:
            raise HubError(403, f"You don't have the rights to write to the namespace {namespace}.")
        return user

    def repo_url(self, repo: dict) -> str:
        return f"{self.hub.url}/{URL_PREFIXES[repo['type']]}{repo['id']}"

    # Routing

    def route(self) -> None:
        path, query = self.split_path()
        segments = [unquote(segment) for segment in path.strip("/").split("/")]
        method = self.command
        with self.hub.store.lock:
            if segments[:1] == ["api"]:
                self.route_api(method, segments[1:], query)
            else:
                self.route_git(method, segments, query)

    def route_api(self, method: str, segments: list[str], query: dict) -> None:
        if method == "GET" and segments == ["whoami-v2"]:
            return self.whoami()
        if method == "POST" and segments == ["repos", "create"]:
            return self.create_repo()
        if method == "POST" and segments == ["repos", "delete"]:
            return self.delete_repo()
        if method == "POST" and segments == ["validate-yaml"]:
            return self.validate_yaml()
        if len(segments) >= 3 and segments[0] in REPO_TYPES:
            repo_type, repo_id, rest = REPO_TYPES[segments[0]], "/".join(segments[1:3]), segments[3:]
            if method == "GET" and not rest:
                return self.repo_info(repo_type, repo_id, None, query)
            if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                return self.repo_info(repo_type, repo_id, rest[1], query)
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                return self.list_tree(repo_type, repo_id, rest[1], "/".join(rest[2:]), query)
            if method == "POST" and len(rest) == 2 and rest[0] == "paths-info":
                return self.paths_info(repo_type, repo_id, rest[1])
            if method == "GET" and rest == ["refs"]:
                return self.list_refs(repo_type, repo_id)
            if method == "GET" and len(rest) == 2 and rest[0] == "commits":
                return self.list_commits(repo_type, repo_id, rest[1], query)
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                return self.preupload(repo_type, repo_id, rest[1], query)
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                return self.commit(repo_type, repo_id, rest[1], query)
            if method in ("POST", "DELETE") and len(rest) == 2 and rest[0] == "branch":
                return self.branch(repo_type, repo_id, rest[1])
        self.unknown_route()

    def route_git(self, method: str, segments: list[str], query: dict) -> None:
        repo_type = "model"
        if segments and segments[0] in ("datasets", "spaces"):
            repo_type, segments = REPO_TYPES[segments[0]], segments[1:]
        if len(segments) >= 2 and segments[1].endswith(".git"):
            repo_id = f"{segments[0]}/{segments[1][: -len('.git')]}"
            if method == "POST" and segments[2:] == ["info", "lfs", "objects", "batch"]:
                return self.lfs_batch(repo_type, repo_id)
            if method == "POST" and segments[2:] == ["info", "lfs", "objects", "verify"]:
                return self.lfs_verify(repo_type, repo_id)
        if len(segments) >= 5 and segments[2] == "resolve" and method in ("GET", "HEAD"):
            return self.resolve(repo_type, "/".join(segments[:2]), segments[3], "/".join(segments[4:]))
        self.unknown_route()

    # Account and repository routes

    def whoami(self) -> None:
        user = self.authenticate()
        if user is None:
            raise HubError(401, "You must be authenticated to call whoami.")
        self.send_json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test token", "role": "write"}},
            }
        )

    def create_repo(self) -> None:
        payload = self.read_json()
        user = self.authenticate()
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository.")
        namespace = payload.get("organization") or user
        self.require_write(namespace)
        name = payload.get("name") or ""
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise HubError(400, f"Invalid repo type {repo_type!r}: expected one of {sorted(URL_PREFIXES)}.")
        if not NAME_PATTERN.fullmatch(name) or "--" in name or ".." in name or name.endswith(".git"):
            raise HubError(400, f"Invalid repository name {name!r}.")
        repo_id = f"{namespace}/{name}"
        url = f"{self.hub.url}/{URL_PREFIXES[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.hub.store.repos:
            # The Hub answers 409 with the existing repository's URL; `create_repo(exist_ok=True)` accepts it.
            self.send_json({"error": "You already created this repo", "url": url}, 409)
            return
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.hub.store.create_repo(repo_type, repo_id, private, user)
        self.send_json({"url": url, "name": repo_id, "id": hashlib.sha1(url.encode()).hexdigest()[:24]})

    def delete_repo(self) -> None:
        payload = self.read_json()
        user = self.authenticate()
        repo_id = f"{payload.get('organization') or user}/{payload.get('name')}"
        repo = self.find_repo(payload.get("type") or "model", repo_id, write=True)
        self.hub.store.delete_repo(repo)
        self.send(200)

    def validate_yaml(self) -> None:
        """Check that a README's metadata block is closed.

        NOTE: the Hub also parses the YAML and checks known fields. This server has no YAML parser (standard library
        only), so a README with malformed YAML inside a closed block passes here but fails on the Hub.
        """
        content = self.read_json().get("content") or ""
        lines = content.splitlines()
        if lines and lines[0].strip() == "---" and not any(line.strip() == "---" for line in lines[1:]):
            self.send_json({"errors": [{"message": "The metadata block that starts with --- is never closed."}]}, 400)
            return
        self.send_json({"errors": [], "warnings": []})

    def repo_info(self, repo_type: str, repo_id: str, revision: str | None, query: dict) -> None:
        repo = self.find_repo(repo_type, repo_id)
        commit = repo["commits"][self.hub.store.resolve_revision(repo, revision or "main")]
        with_blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path, entry in sorted(commit["tree"].items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if entry["lfs"]:
                    lfs = entry["lfs"]
                    sibling["lfs"] = {"sha256": lfs["oid"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
            siblings.append(sibling)
        info = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit["id"],
            "lastModified": commit["date"],
            "createdAt": repo["created_at"],
            "private": repo["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(entry["size"] for entry in commit["tree"].values()),
        }
        expand = query.get("expand", []) + query.get("expand[]", [])
        if expand:
            info = {key: value for key, value in info.items() if key in ("_id", "id") or key in expand}
        self.send_json(info)

    def tree_entry(self, repo: dict, commit: dict, path: str, expand: bool) -> dict:
        tree = commit["tree"]
        if path in tree:
            entry = tree[path]
            result: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
            if entry["lfs"]:
                result["lfs"] = dict(entry["lfs"])
        else:
            result = {"type": "directory", "oid": folder_oid(tree, path), "size": 0, "path": path}
        if expand:
            last = self.hub.store.last_commit_touching(repo, commit["id"], path)
            result["lastCommit"] = {"id": last["id"], "title": last["title"], "date": last["date"]}
        return result

    def list_tree(self, repo_type: str, repo_id: str, revision: str, folder: str, query: dict) -> None:
        repo = self.find_repo(repo_type, repo_id)
        commit = repo["commits"][self.hub.store.resolve_revision(repo, revision)]
        folder = folder.strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = query.get("expand", ["false"])[0].lower() in ("1", "true")
        all_paths = set(commit["tree"]) | folders_of(commit["tree"])
        if folder and folder not in folders_of(commit["tree"]):
            raise HubError(
                404,
                f"Folder {folder!r} does not exist at revision {revision}.",
                "EntryNotFound",
                {"X-Repo-Commit": commit["id"]},
            )
        prefix = folder + "/" if folder else ""
        paths = sorted(
            path for path in all_paths if path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])
        )
        self.send_page([self.tree_entry(repo, commit, path, expand) for path in paths], query)

    def send_page(self, items: list, query: dict) -> None:
        """Send one page of `items`, with a Link header to the next page as the Hub paginates."""
        start = int(query.get("cursor", ["0"])[0] or 0)
        page_size = self.hub.tree_page_size
        headers = {}
        if start + page_size < len(items):
            parts = urlsplit(self.path)
            other_params = "&".join(
                f"{quote(key)}={quote(value)}" for key, values in query.items() if key != "cursor" for value in values
            )
            next_url = f"{self.hub.url}{parts.path}?{other_params}&cursor={start + page_size}".replace("?&", "?")
            headers["Link"] = f'<{next_url}>; rel="next"'
        self.send_json(items[start : start + page_size], headers=headers)

    def paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self.find_repo(repo_type, repo_id)
        commit = repo["commits"][self.hub.store.resolve_revision(repo, revision)]
        body = self.read_body().decode()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            form = json.loads(body or "{}")
            paths, expand = form.get("paths", []), bool(form.get("expand"))
        else:
            form = parse_qs(body, keep_blank_values=True)
            paths, expand = form.get("paths", []), form.get("expand", ["false"])[0].lower() in ("1", "true")
        known = set(commit["tree"]) | folders_of(commit["tree"])
        self.send_json(
            [self.tree_entry(repo, commit, path.strip("/"), expand) for path in paths if path.strip("/") in known]
        )

    def list_refs(self, repo_type: str, repo_id: str) -> None:
        repo = self.find_repo(repo_type, repo_id)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": commit_id}
            for name, commit_id in sorted(repo["branches"].items())
        ]
        self.send_json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def list_commits(self, repo_type: str, repo_id: str, revision: str, query: dict) -> None:
        repo = self.find_repo(repo_type, repo_id)
        history = self.hub.store.history(repo, self.hub.store.resolve_revision(repo, revision))
        items = [
            {
                "id": commit["id"],
                "title": commit["title"],
                "message": commit["message"],
                "date": commit["date"],
                "authors": [{"user": commit["author"]}],
            }
            for commit in history
        ]
        self.send_page(items, query)

    def branch(self, repo_type: str, repo_id: str, name: str) -> None:
        repo = self.find_repo(repo_type, repo_id, write=True)
        if self.command == "DELETE":
            if name not in repo["branches"]:
                raise HubError(404, f"Branch {name} does not exist.", "RevisionNotFound")
            if name == "main":
                raise HubError(403, "Cannot delete the main branch.")
            del repo["branches"][name]
            self.hub.store.save(repo)
            return self.send(200)
        payload = self.read_json()
        if name in repo["branches"]:
            raise HubError(409, f"Branch {name} already exists.")
        if not NAME_PATTERN.fullmatch(name) or COMMIT_ID_PATTERN.fullmatch(name):
            raise HubError(400, f"Invalid branch name {name!r}.")
        start = self.hub.store.resolve_revision(repo, payload.get("startingPoint") or "main")
        repo["branches"][name] = start
        self.hub.store.save(repo)
        self.send(200)

    # Upload routes

    def writable_branch(self, repo: dict, revision: str, query: dict) -> str:
        if query.get("create_pr", ["0"])[0] not in ("", "0", "false"):
            raise HubError(400, "This test server does not support pull requests (create_pr).")
        if revision not in repo["branches"]:
            if COMMIT_ID_PATTERN.fullmatch(revision):
                raise HubError(400, f"Cannot commit to commit id {revision}: pass a branch name.")
            raise HubError(404, f"Branch {revision} does not exist.", "RevisionNotFound")
        return revision

    def upload_mode(self, repo: dict, commit: dict, path: str, size: int, sample: bytes) -> str:
        """Decide "lfs" or "regular": LFS for `.gitattributes` matches, large files and binary files.

        A file is binary when its 512-byte sample contains a NUL byte; the Hub does not accept binary files as regular
        git files either.
        """
        attributes_entry = commit["tree"].get(".gitattributes")
        attributes = ""
        if attributes_entry and attributes_entry["lfs"] is None:
            attributes = self.hub.store.content_path(repo, attributes_entry).read_text(errors="replace")
        for line in parse_pattern_lines(attributes):
            pattern, *attrs = line.split()
            if "filter=lfs" in attrs and match_git_pattern(pattern, path):
                return "lfs"
        if size >= self.hub.lfs_threshold or b"\0" in sample:
            return "lfs"
        return "regular"

    def preupload(self, repo_type: str, repo_id: str, revision: str, query: dict) -> None:
        repo = self.find_repo(repo_type, repo_id, write=True)
        commit = repo["commits"][self.hub.store.resolve_revision(repo, self.writable_branch(repo, revision, query))]
        payload = self.read_json()
        gitignore = payload.get("gitIgnore")
        if gitignore is None and ".gitignore" in commit["tree"]:
            gitignore_entry = commit["tree"][".gitignore"]
            gitignore = self.hub.store.content_path(repo, gitignore_entry).read_text(errors="replace")
        ignore_patterns = parse_pattern_lines(gitignore or "")
        files = []
        for item in payload.get("files", []):
            path = item["path"]
            try:
                sample = base64.b64decode(item.get("sample", ""), validate=True)
            except binascii.Error:
                raise HubError(400, f"The sample of {path!r} is not valid base64.")
            result = {
                "path": path,
                "uploadMode": self.upload_mode(repo, commit, path, int(item.get("size", 0)), sample),
                "shouldIgnore": any(match_git_pattern(pattern, path) for pattern in ignore_patterns),
            }
            existing = commit["tree"].get(path)
            if existing is not None:
                # The client compares this with its own oid to skip unchanged files: the sha256 of an LFS file's
                # content, the git blob id of a regular file.
                result["oid"] = existing["lfs"]["oid"] if existing["lfs"] else existing["oid"]
            files.append(result)
        self.send_json({"files": files, "commitOid": commit["id"]})

    def commit(self, repo_type: str, repo_id: str, revision: str, query: dict) -> None:
        """Apply an NDJSON commit: a header line, then one line per added, LFS or deleted file or folder."""
        repo = self.find_repo(repo_type, repo_id, write=True)
        branch = self.writable_branch(repo, revision, query)
        head = repo["branches"][branch]
        lines = [line for line in self.read_body().splitlines() if line.strip()]
        try:
            items = [json.loads(line) for line in lines]
        except ValueError as error:
            raise HubError(400, f"Commit payload is not valid NDJSON: {error}")
        if not items or items[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be the header.")
        header = items[0]["value"]
        summary = (header.get("summary") or "").strip()
        if not summary:
            raise HubError(400, "The commit summary must not be empty.")
        parent_commit = header.get("parentCommit")
        if parent_commit and parent_commit != head:
            raise HubError(412, f"A commit has happened since {parent_commit}: the branch is now at {head}.")

        tree = dict(repo["commits"][head]["tree"])
        operations = []
        for item in items[1:]:
            key, value = item.get("key"), item.get("value") or {}
            path = (value.get("path") or "").strip("/")
            if not path or ".." in path.split("/") or path.startswith(".git/"):
                raise HubError(400, f"Invalid path in commit: {value.get('path')!r}.")
            if key == "file":
                tree[path] = self.regular_file_entry(path, value)
            elif key == "lfsFile":
                tree[path] = self.lfs_file_entry(repo, path, value)
            elif key == "deletedFile":
                if path not in tree:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del tree[path]
            elif key == "deletedFolder":
                removed = [name for name in tree if name.startswith(path + "/")]
                if not removed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for name in removed:
                    del tree[name]
            else:
                raise HubError(400, f"Unknown commit operation {key!r}.")
            operations.append({"type": key, "path": path})

        commit_id = self.hub.store.add_commit(
            repo,
            branch=branch,
            parent=head,
            tree=tree,
            title=summary,
            message=header.get("description") or "",
            author=self.user or "",
            operations=operations,
        )
        self.send_json(
            {
                "success": True,
                "commitOid": commit_id,
                "commitUrl": f"{self.repo_url(repo)}/commit/{commit_id}",
                "hookOutput": "",
            }
        )

    def regular_file_entry(self, path: str, value: dict) -> dict:
        if value.get("encoding") != "base64":
            raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}: expected base64.")
        try:
            content = base64.b64decode(value.get("content") or "", validate=True)
        except binascii.Error:
            raise HubError(400, f"The content of {path} is not valid base64.")
        if len(content) >= self.hub.lfs_threshold:
            raise HubError(
                400,
                f"{path} is {len(content)} bytes: files of {self.hub.lfs_threshold} bytes or more "
                "must be uploaded through LFS.",
            )
        if b"\0" in content[:8000]:
            raise HubError(400, f"{path} is a binary file: binary files must be uploaded through LFS.")
        return self.hub.store.store_blob(content)

    def lfs_file_entry(self, repo: dict, path: str, value: dict) -> dict:
        sha256 = value.get("oid") or ""
        if value.get("algo", "sha256") != "sha256" or not SHA256_PATTERN.fullmatch(sha256):
            raise HubError(400, f"Invalid LFS object id for {path}: {sha256!r}.")
        if not self.hub.store.has_lfs_object(repo, sha256, value.get("size")):
            raise HubError(400, f"LFS object {sha256} for {path} was never uploaded to this repository.")
        return self.hub.store.lfs_entry(sha256, self.hub.store.lfs_path(repo, sha256).stat().st_size)

    def lfs_batch(self, repo_type: str, repo_id: str) -> None:
        """Return a signed upload URL for each object of an LFS batch request that the repository does not have yet."""
        payload = self.read_json()
        if payload.get("operation") != "upload":
            raise HubError(
                422, f"Unsupported LFS batch operation {payload.get('operation')!r}: only upload is served."
            )
        repo = self.find_repo(repo_type, repo_id, write=True)
        if "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(422, "Only the basic LFS transfer is supported.")
        objects = []
        for item in payload.get("objects", []):
            sha256, size = item.get("oid", ""), item.get("size")
            if not SHA256_PATTERN.fullmatch(sha256) or not isinstance(size, int) or size < 0:
                objects.append(
                    {
                        "oid": str(sha256),
                        "size": size if isinstance(size, int) else 0,
                        "error": {"code": 422, "message": "Invalid object id or size."},
                    }
                )
                continue
            result: dict[str, Any] = {"oid": sha256, "size": size, "authenticated": True}
            if not self.hub.store.has_lfs_object(repo, sha256, size):
                upload_id = secrets.token_urlsafe(16)
                self.hub._pending_uploads[upload_id] = {
                    "folder": self.hub.store.repo_folder(repo),
                    "oid": sha256,
                    "size": size,
                }
                result["actions"] = {
                    "upload": {"href": self.hub.signed_cdn_url(f"/lfs-upload/{upload_id}")},
                    "verify": {"href": f"{self.repo_url(repo)}.git/info/lfs/objects/verify"},
                }
            objects.append(result)
        self.send(
            200,
            json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def lfs_verify(self, repo_type: str, repo_id: str) -> None:
        repo = self.find_repo(repo_type, repo_id, write=True)
        payload = self.read_json()
        if not self.hub.store.has_lfs_object(repo, str(payload.get("oid")), payload.get("size")):
            raise HubError(404, f"LFS object {payload.get('oid')} of {payload.get('size')} bytes was not uploaded.")
        self.send_json({"success": True})

    # Downloads

    def resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self.find_repo(repo_type, repo_id)
        commit_id = self.hub.store.resolve_revision(repo, revision)
        entry = repo["commits"][commit_id]["tree"].get(path)
        if entry is None:
            raise HubError(
                404, f"Entry not found: {path} at revision {revision}.", "EntryNotFound", {"X-Repo-Commit": commit_id}
            )
        headers = {"X-Repo-Commit": commit_id, "ETag": f'"{entry["oid"]}"'}
        if entry["lfs"] is None:
            content_path = self.hub.store.content_path(repo, entry)
            self.send_file(content_path, entry["size"], headers)
            return
        sha256 = entry["lfs"]["oid"]
        headers["X-Linked-Etag"] = f'"{sha256}"'
        headers["X-Linked-Size"] = str(entry["size"])
        headers["Location"] = self.hub.signed_cdn_url(
            f"/lfs-objects/{repo_type}/{repo_id}/{sha256}", filename=path.rsplit("/", 1)[-1]
        )
        self.send(302, headers=headers)
