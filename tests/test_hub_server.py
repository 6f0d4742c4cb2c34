"""The test Hub server, driven by the real huggingface_hub and datasets clients."""

import dataclasses
import hashlib
import http.client
import os
from urllib.parse import urlsplit

import datasets
import pytest
from hub_server import git_blob_id
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


def make_folder(root, files: dict[str, bytes]):
    root.mkdir(parents=True, exist_ok=True)
    for relative_path, content in files.items():
        path = root / relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def read(path) -> bytes:
    with open(path, "rb") as file:
        return file.read()


@dataclasses.dataclass
class RawResponse:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def request(method: str, url: str, headers: dict | None = None) -> RawResponse:
    """Send one request without following redirects, to see exactly what the server returns."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request(method, f"{parts.path}?{parts.query}" if parts.query else parts.path, headers=headers or {})
        response = connection.getresponse()
        return RawResponse(response.status, response.headers, response.read())
    finally:
        connection.close()


def test_create_repo_conflict_and_types(hub_server):
    api = HfApi()

    repo_url = api.create_repo("created")
    assert repo_url.repo_id == f"{hub_server.user}/created"
    assert repo_url.startswith(hub_server.url)

    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("created")
    assert conflict.value.response.status_code == 409
    assert api.create_repo("created", exist_ok=True).repo_id == repo_url.repo_id

    dataset_url = api.create_repo("created", repo_type="dataset", private=True)
    assert dataset_url.repo_type == "dataset"
    assert api.dataset_info(dataset_url.repo_id).private is True
    assert api.model_info(repo_url.repo_id).private is False

    # A new repository starts with one commit, which adds .gitattributes.
    assert api.list_repo_files(repo_url.repo_id) == [".gitattributes"]
    assert len(api.list_repo_commits(repo_url.repo_id)) == 1

    with pytest.raises(HfHubHTTPError) as forbidden:
        api.create_repo("someone-else/created")
    assert forbidden.value.response.status_code == 403


def test_upload_again_commits_only_changes(hub_server, tmp_path):
    api = HfApi()
    repo_id = api.create_repo("pushed").repo_id
    weights = os.urandom(4096)
    folder = make_folder(
        tmp_path / "folder",
        {
            "config.json": b'{"a": 1}',
            "notes.txt": b"first",
            "unet/weights.safetensors": weights,
        },
    )

    first = api.upload_folder(repo_id=repo_id, folder_path=folder)
    assert sorted(api.list_repo_files(repo_id)) == [
        ".gitattributes",
        "config.json",
        "notes.txt",
        "unet/weights.safetensors",
    ]
    assert hub_server.server.lfs_uploads == [hashlib.sha256(weights).hexdigest()]

    (folder / "notes.txt").write_bytes(b"second")
    (folder / "extra.txt").write_bytes(b"new file")
    second = api.upload_folder(repo_id=repo_id, folder_path=folder)

    commits = hub_server.server.commits(repo_id)
    assert [commit["id"] for commit in commits[:2]] == [second.oid, first.oid]
    assert len(commits) == 3
    assert commits[0]["parents"] == [first.oid]
    assert sorted(op["path"] for op in commits[0]["operations"]) == ["extra.txt", "notes.txt"]
    # The unchanged LFS file was neither uploaded nor committed again.
    assert len(hub_server.server.lfs_uploads) == 1

    third = api.upload_folder(repo_id=repo_id, folder_path=folder)
    assert third.oid == second.oid
    assert len(hub_server.server.commits(repo_id)) == 3


def test_large_text_file_goes_through_lfs(hub_server, tmp_path):
    api = HfApi()
    repo_id = api.create_repo("large").repo_id
    # Text, not binary, and matching no .gitattributes pattern: only its size sends it through LFS.
    line = b"0123456789abcdef" * 4 + b"\n"
    large = line * (hub_server.server.lfs_threshold // len(line) + 1)
    folder = make_folder(tmp_path / "folder", {"large.txt": large, "small.txt": b"small"})

    api.upload_folder(repo_id=repo_id, folder_path=folder)

    siblings = {sibling.rfilename: sibling for sibling in api.model_info(repo_id, files_metadata=True).siblings}
    assert siblings["large.txt"].lfs is not None
    assert siblings["large.txt"].lfs.sha256 == hashlib.sha256(large).hexdigest()
    assert siblings["large.txt"].size == len(large)
    assert siblings["small.txt"].lfs is None
    assert siblings["small.txt"].blob_id == git_blob_id(b"small")

    downloaded = hf_hub_download(repo_id, "large.txt")
    assert hashlib.sha256(read(downloaded)).hexdigest() == hashlib.sha256(large).hexdigest()
    # The download went through the CDN listener, without the token.
    cdn_requests = [record for record in hub_server.server.requests if record.listener == "cdn"]
    assert [record.method for record in cdn_requests] == ["PUT", "GET"]
    assert all(record.user is None for record in cdn_requests)


def test_download_at_old_revision(hub_server, tmp_path):
    api = HfApi()
    repo_id = api.create_repo("history").repo_id
    folder = make_folder(tmp_path / "v1", {"data.txt": b"version 1", "removed.bin": b"\0\1\2\3"})
    old = api.upload_folder(repo_id=repo_id, folder_path=folder)
    api.create_commit(
        repo_id,
        operations=[
            CommitOperationAdd("data.txt", b"version 2"),
            CommitOperationDelete("removed.bin"),
        ],
        commit_message="Update data, remove binary",
    )

    assert read(hf_hub_download(repo_id, "data.txt")) == b"version 2"
    assert read(hf_hub_download(repo_id, "data.txt", revision=old.oid)) == b"version 1"
    assert read(hf_hub_download(repo_id, "removed.bin", revision=old.oid)) == b"\0\1\2\3"
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(repo_id, "removed.bin")

    old_snapshot = snapshot_download(repo_id, revision=old.oid)
    new_snapshot = snapshot_download(repo_id)
    assert sorted(os.listdir(old_snapshot)) == [".gitattributes", "data.txt", "removed.bin"]
    assert sorted(os.listdir(new_snapshot)) == [".gitattributes", "data.txt"]
    assert read(os.path.join(old_snapshot, "data.txt")) == b"version 1"
    assert os.path.basename(old_snapshot) == old.oid

    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "data.txt", revision="no-such-branch")


def test_private_repo_rejects_missing_or_foreign_token(hub_server, tmp_path):
    api = HfApi()
    repo_id = api.create_repo("secret", private=True).repo_id
    api.upload_file(path_or_fileobj=b"hidden", path_in_repo="secret.txt", repo_id=repo_id)
    hub_server.server.tokens["hf_other_user_token"] = "other-user"

    assert read(hf_hub_download(repo_id, "secret.txt")) == b"hidden"

    with pytest.raises(RepositoryNotFoundError) as anonymous:
        HfApi(token=False).model_info(repo_id)
    assert anonymous.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "secret.txt", token=False, cache_dir=tmp_path / "anonymous-cache")

    with pytest.raises(RepositoryNotFoundError) as foreign:
        HfApi(token="hf_other_user_token").model_info(repo_id)
    assert foreign.value.response.status_code == 404

    with pytest.raises(HfHubHTTPError) as invalid:
        HfApi(token="hf_not_a_known_token").model_info(repo_id)
    assert invalid.value.response.status_code == 401
    assert "Invalid credentials" in str(invalid.value)


def test_tree_pages_and_deletes(hub_server):
    api = HfApi()
    repo_id = api.create_repo("paged").repo_id
    names = [f"folder/file_{index}.txt" for index in range(5)] + ["top.txt"]
    api.create_commit(
        repo_id,
        operations=[CommitOperationAdd(name, name.encode()) for name in names],
        commit_message="Add files",
    )
    hub_server.server.tree_page_size = 2

    assert sorted(api.list_repo_files(repo_id)) == sorted(names + [".gitattributes"])
    tree_pages = [record for record in hub_server.server.requests if "/tree/" in record.path]
    assert len(tree_pages) == 4  # 8 entries (6 files, .gitattributes, one folder) at 2 per page
    top_level = {entry.path for entry in api.list_repo_tree(repo_id)}
    assert top_level == {".gitattributes", "folder", "top.txt"}

    api.delete_folder("folder", repo_id=repo_id)
    api.delete_file("top.txt", repo_id=repo_id)
    assert api.list_repo_files(repo_id) == [".gitattributes"]
    with pytest.raises(RemoteEntryNotFoundError):
        api.delete_file("top.txt", repo_id=repo_id)


def test_branch_commit_and_refs(hub_server):
    api = HfApi()
    repo_id = api.create_repo("branched").repo_id
    api.create_branch(repo_id, branch="dev")
    api.upload_file(path_or_fileobj=b"on dev", path_in_repo="dev.txt", repo_id=repo_id, revision="dev")

    refs = api.list_repo_refs(repo_id)
    assert {branch.name for branch in refs.branches} == {"main", "dev"}
    assert "dev.txt" in api.list_repo_files(repo_id, revision="dev")
    assert "dev.txt" not in api.list_repo_files(repo_id)
    assert read(hf_hub_download(repo_id, "dev.txt", revision="dev")) == b"on dev"


def test_resolve_headers_ranges_and_signatures(hub_server):
    api = HfApi()
    repo_id = api.create_repo("headers").repo_id
    binary = bytes(range(256)) * 4
    commit = api.create_commit(
        repo_id,
        operations=[CommitOperationAdd("text.txt", b"plain text"), CommitOperationAdd("blob.bin", binary)],
        commit_message="Add a regular and an LFS file",
    )
    auth = {"Authorization": f"Bearer {hub_server.token}"}

    regular = request("HEAD", f"{hub_server.url}/{repo_id}/resolve/main/text.txt", auth)
    assert regular.status == 200
    assert regular.headers["ETag"] == f'"{git_blob_id(b"plain text")}"'
    assert regular.headers["X-Repo-Commit"] == commit.oid
    assert regular.headers["Content-Length"] == str(len(b"plain text"))

    lfs = request("HEAD", f"{hub_server.url}/{repo_id}/resolve/{commit.oid}/blob.bin", auth)
    assert lfs.status == 302
    assert lfs.headers["X-Linked-Etag"] == f'"{hashlib.sha256(binary).hexdigest()}"'
    assert lfs.headers["X-Linked-Size"] == str(len(binary))
    location = lfs.headers["Location"]
    assert location.startswith(hub_server.server.cdn_url)

    partial = request("GET", location, {"Range": "bytes=10-19"})
    assert partial.status == 206
    assert partial.body == binary[10:20]
    assert partial.headers["Content-Range"] == f"bytes 10-19/{len(binary)}"
    assert request("GET", location, {"Range": f"bytes={len(binary)}-"}).status == 416

    tampered = location.replace("signature=", "signature=0")
    assert request("GET", tampered).status == 403

    missing = request("HEAD", f"{hub_server.url}/{repo_id}/resolve/main/missing.txt", auth)
    assert missing.status == 404
    assert missing.headers["X-Error-Code"] == "EntryNotFound"
    assert missing.headers["X-Repo-Commit"] == commit.oid


def test_load_dataset_from_parquet_repo(hub_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    rows = {"label": [3, 1, 4, 1, 5], "name": ["three", "one", "four", "one", "five"]}
    parquet_path = tmp_path / "train.parquet"
    datasets.Dataset.from_dict(rows).to_parquet(parquet_path)
    api = HfApi()
    repo_id = api.create_repo("digits", repo_type="dataset").repo_id
    api.upload_file(
        path_or_fileobj=parquet_path,
        path_in_repo="data/train-00000-of-00001.parquet",
        repo_id=repo_id,
        repo_type="dataset",
    )

    loaded = datasets.load_dataset(repo_id, split="train", cache_dir=str(tmp_path / "datasets-cache"))

    assert loaded.to_dict() == rows
    assert any("/datasets/" in record.path and "/resolve/" in record.path for record in hub_server.server.requests)
