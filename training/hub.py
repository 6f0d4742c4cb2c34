"""Push a training output folder to the Hugging Face Hub.

Only what a user of the model needs is uploaded. That is the saved pipeline: `model_index.json`, the component folders
that it names (such as `unet/` and `scheduler/`) and the pipeline's module file, so that the repository also loads as
remote code. Then the model card `README.md`, the sample images (`*.png` at the top level and the `samples/` folder)
and the JSON reports at the top level. Checkpoints, optimizer state, logs, TensorBoard event files and files named like
credentials stay local, and the push stops before uploading anything when a file to upload contains an access token.

Pushing again uploads only the files whose content changed, in one new commit (none when nothing changed).

Command line:

    python -m diffusers_cfg.training.hub OUTPUT_DIR --hub_model_id NAME_OR_NAMESPACE/NAME [--private]
"""

import argparse
import fnmatch
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from huggingface_hub import CommitInfo, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, HTTPError

from diffusers_cfg.pipelines.command_line import configure_logging, first_line

logger = logging.getLogger(__name__)

PIPELINE_INDEX = "model_index.json"
MODEL_CARD = "README.md"
SAMPLES_FOLDER = "samples"
DEFAULT_COMMIT_MESSAGE = "Upload class-conditional diffusion pipeline"

# Folders that are never uploaded, at any depth. The training script keeps accelerate checkpoints (model, optimizer
# and random states) under `checkpoints/checkpoint-<step>`; diffusers' own training scripts write `checkpoint-<step>`
# folders directly into the output folder.
EXCLUDED_FOLDERS = (
    "checkpoints",
    "checkpoint-*",
    ".partial-checkpoint-*",
    "logs",
    "runs",
    "wandb",
    "__pycache__",
    ".*",
)

# File names that are never uploaded, even inside a folder that is: optimizer and accelerate state, TensorBoard event
# files, pickles (which run code when loaded), and names that suggest credentials.
EXCLUDED_FILES = (
    "optimizer*", "*.optimizer*", "random_states*", "scaler.pt", "*.pkl", "*.pickle", "events.out.tfevents.*",
    "*.pem", "*.key", ".env", ".netrc", "id_rsa*", "id_ed25519*",
)  # fmt: skip
CREDENTIAL_NAME = re.compile(r"(^|[._-])(tokens?|credentials?|secrets?|passwords?|passwd)([._-]|$)", re.IGNORECASE)

# The form of a Hugging Face user access token, searched for in text files before they are uploaded.
ACCESS_TOKEN_PATTERN = re.compile(rb"\bhf_[A-Za-z0-9]{30,}\b")
TEXT_SUFFIXES = (".json", ".md", ".py", ".txt", ".yaml", ".yml", ".csv", ".cfg", ".toml", ".ini")


def push_to_hub(
    output_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
) -> CommitInfo:
    """Create the repository if needed and upload the pipeline, card, samples and reports of `output_dir`.

    Args:
        output_dir: a training output folder that contains a saved pipeline (`model_index.json`).
        repo_id: `namespace/name`, or `name` for the token's own namespace.
        private: create the repository as private. A repository that already exists keeps its visibility.
        token: an access token with write access; by default `HF_TOKEN` or the token saved by `hf auth login`.
        commit_message: the commit title; `DEFAULT_COMMIT_MESSAGE` by default.
        revision: the branch to push to, created from `main` when it does not exist; `main` by default.

    Returns:
        The `CommitInfo` of the commit: a `str` equal to the commit URL, with the commit id in `.oid`. When no file
        changed since the last push, no commit is made and the latest commit is returned.

    Raises:
        ValueError: `output_dir` is not a folder, has no `model_index.json`, or a file to upload contains an
            access token.
    """
    output_dir = Path(output_dir)
    files, excluded = _sort_files(output_dir)
    check_for_access_tokens(output_dir, files, token or get_token())
    api = HfApi(token=token)

    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    repo_id = repo_url.repo_id
    if private and not api.model_info(repo_id).private:
        logger.warning("%s already exists as a public repository; private=True does not change it.", repo_id)
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)

    logger.info("Pushing %d files from %s to %s", len(files), output_dir, repo_url)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
        revision=revision,
        # Exact paths: fnmatch lets `*` cross folders, so a pattern such as "*.png" would also pick up checkpoints.
        allow_patterns=[escape_pattern(path) for path in files],
        ignore_patterns=[escape_pattern(path) for path in excluded],
    )
    logger.info("Pushed %s to %s (commit %s)", output_dir, repo_url, commit.oid)
    return commit


def select_files_to_push(output_dir: str | Path) -> list[str]:
    """Return the files of `output_dir` that a push uploads, as sorted POSIX paths relative to it.

    Raises:
        ValueError: `output_dir` is not a folder or has no `model_index.json`.
    """
    return _sort_files(Path(output_dir))[0]


def _sort_files(output_dir: Path) -> tuple[list[str], list[str]]:
    """Split the files of `output_dir` into those to push and those that the exclusion rules keep local."""
    if not output_dir.is_dir():
        raise ValueError(f"Cannot push {output_dir}: it is not a folder.")
    index_path = output_dir / PIPELINE_INDEX
    if not index_path.is_file():
        raise ValueError(
            f"Cannot push {output_dir}: {PIPELINE_INDEX} is missing, so the folder contains no saved pipeline. Push "
            "the folder that `save_pretrained` wrote (the training script's --output_dir after training finished)."
        )
    component_folders = pipeline_component_folders(index_path)

    selected, excluded = [], []
    for path in sorted(output_dir.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        relative = PurePosixPath(path.relative_to(output_dir).as_posix())
        if is_excluded(relative):
            excluded.append(str(relative))
        elif is_pushed(relative, component_folders):
            selected.append(str(relative))
        else:
            logger.debug("Not pushing %s: it is not part of the pipeline, card, samples or reports", relative)
    return sorted(selected), sorted(excluded)


def pipeline_component_folders(index_path: Path) -> set[str]:
    """Return the component names of a `model_index.json`: the entries that map to a [library, class] pair."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"Cannot push {index_path.parent}: {index_path} is not valid JSON ({error}).") from error
    return {
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None
    }


def is_excluded(relative: PurePosixPath) -> bool:
    """Return whether a file is checkpoint or optimizer state, a log, hidden, or named like a credential."""
    if any(fnmatch.fnmatchcase(folder, pattern) for folder in relative.parts[:-1] for pattern in EXCLUDED_FOLDERS):
        return True
    name = relative.name
    if name.startswith("."):
        return True
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in EXCLUDED_FILES) or bool(CREDENTIAL_NAME.search(name))


def is_pushed(relative: PurePosixPath, component_folders: set[str]) -> bool:
    """Return whether a file that is not excluded belongs to the pipeline, the card, the samples or the reports."""
    if len(relative.parts) == 1:
        return relative.name == MODEL_CARD or relative.suffix in (".json", ".py", ".png")
    return relative.parts[0] in component_folders or relative.parts[0] == SAMPLES_FOLDER


def check_for_access_tokens(output_dir: Path, files: Iterable[str], token: str | None) -> None:
    """Raise ValueError if a file to upload contains `token` or, for text files, anything shaped like a token."""
    for relative in files:
        path = output_dir / relative
        found = token is not None and file_contains(path, token.encode())
        if not found and relative.endswith(TEXT_SUFFIXES):
            found = ACCESS_TOKEN_PATTERN.search(path.read_bytes()) is not None
        if found:
            raise ValueError(
                f"Cannot push {output_dir}: {relative} contains an access token. Remove the token from the file "
                "(or delete the file) and push again; if the file was ever shared, revoke the token."
            )


def file_contains(path: Path, needle: bytes, chunk_size: int = 1 << 20) -> bool:
    """Return whether a file contains `needle`, reading it in chunks so that large weight files fit in memory."""
    overlap = b""
    with open(path, "rb") as file:
        while chunk := file.read(chunk_size):
            if needle in overlap + chunk:
                return True
            overlap = chunk[-(len(needle) - 1) :] if len(needle) > 1 else b""
    return False


def escape_pattern(path: str) -> str:
    """Escape a path for `fnmatch`, which `upload_folder` applies to its allow patterns, so that it matches itself."""
    return re.sub(r"([*?\[])", r"[\1]", path)


# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_cfg.training.hub",
        description=(
            "Push a training output folder to the Hugging Face Hub: the saved pipeline and its module file, the model "
            "card, sample images and JSON reports. Checkpoints, optimizer state, logs and credentials stay local."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("output_dir", help="Training output folder that contains model_index.json.")
    parser.add_argument(
        "--hub_model_id",
        required=True,
        help="Repository to push to, as namespace/name, or name for the namespace of the token's user.",
    )
    parser.add_argument(
        "--private",
        action="store_true",
        help="Create the repository as private; an existing one keeps its visibility.",
    )
    parser.add_argument(
        "--token",
        default=None,
        help="Access token with write access. Without it, HF_TOKEN or the token saved by `hf auth login` is used; "
        "prefer those, because other users of the machine can see command-line arguments.",
    )
    parser.add_argument("--commit_message", default=DEFAULT_COMMIT_MESSAGE, help="Title of the commit.")
    parser.add_argument(
        "--revision", default=None, help="Branch to push to, created from main if missing; main when omitted."
    )
    parser.add_argument("--dry_run", action="store_true", help="List the files that would be pushed, then exit.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the push command: exit status 0 after a push or dry run, 1 with one logged error line when it fails."""
    args = parse_args(argv)
    configure_logging(logger, log_format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.dry_run:
            files = select_files_to_push(args.output_dir)
            logger.info("A push of %s would upload %d files:\n%s", args.output_dir, len(files), "\n".join(files))
            return
        commit = push_to_hub(
            args.output_dir,
            args.hub_model_id,
            private=args.private,
            token=args.token,
            commit_message=args.commit_message,
            revision=args.revision,
        )
    except ValueError as error:
        logger.error("%s", error)
        raise SystemExit(1) from error
    except HfHubHTTPError as error:
        # The server returned an error status. Its message names the failed request and the reason over several
        # lines, which are joined into one.
        logger.error("Push of %s to %s at %s failed: %s", args.output_dir, args.hub_model_id, constants.ENDPOINT,
                     " ".join(str(error).split()))  # fmt: skip
        raise SystemExit(1) from error
    except (HTTPError, ConnectionError) as error:
        # huggingface_hub 2.4 raises httpx2's errors (HTTPError here) for failed connections and for transfers
        # that break off, and OfflineModeIsEnabled, a ConnectionError, under HF_HUB_OFFLINE=1.
        logger.error("Push of %s to %s failed: the connection to the Hub at %s failed (%s: %s)", args.output_dir,
                     args.hub_model_id, constants.ENDPOINT, error.__class__.__name__, first_line(error))  # fmt: skip
        raise SystemExit(1) from error
    logger.info("Commit: %s", commit.commit_url)


if __name__ == "__main__":
    main()
