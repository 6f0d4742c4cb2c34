"""Checks and logging set-up shared by the command-line tools.

The checks run before any model loads, so that a bad --device or output path fails in a second with one line that
names the flag, instead of with a traceback after minutes of sampling.
"""

import logging
import os


def configure_logging(command_logger: logging.Logger, log_format: str = "%(message)s") -> None:
    """Print INFO records of this project's loggers to stderr, and only warnings and errors of other libraries.

    The root logger stays at WARNING because HTTP clients such as httpx log every request at INFO. `command_logger`
    is the calling module's logger, which is named `__main__` under `python -m`, outside the `diffusers_cfg` tree.
    """
    logging.basicConfig(format=log_format)
    for name in ("diffusers_cfg", command_logger.name):
        logging.getLogger(name).setLevel(logging.INFO)


def resolve_device(flag: str, requested: str | None):
    """Return the torch device of `flag`, or cuda when available and else cpu when it is None.

    Raises:
        ValueError: the value is not a torch device, or this machine's torch build cannot allocate on it.
    """
    import torch

    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise ValueError(f"{flag} {requested!r} is not a torch device ({first_line(error)}). Use cpu, cuda or cuda:0, "
                         "for example") from error  # fmt: skip
    if device.type == "meta":
        raise ValueError(f"{flag} {requested!r} cannot sample: meta tensors have no data. Use cpu or cuda")
    try:
        # An empty allocation is the cheapest call that fails for a backend this torch build lacks (AssertionError
        # for cuda on a CPU-only build, NotImplementedError for mps on Linux) or for a missing GPU index.
        torch.empty(0, device=device)
    except (AssertionError, RuntimeError, NotImplementedError) as error:
        raise ValueError(
            f"{flag} {requested!r} is not available on this machine ({error.__class__.__name__}: "
            f"{first_line(error)}). Use cpu, or omit {flag} to use cuda when available"
        ) from error
    return device


def first_line(error: BaseException, max_length: int = 200) -> str:
    """Return the first line of an exception's message, cut to `max_length` characters."""
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= max_length else line[: max_length - 3] + "..."


def check_output_folder(flag: str, path: str) -> None:
    """Raise a ValueError unless `path` is a writable folder or a folder that can be created.

    Writability comes from os.access, so a user with override rights (root) passes for a read-only mode folder.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        kind = "a file" if os.path.isfile(path) else "not a folder"
        raise ValueError(f"{flag} {path!r} is {kind}; give a folder path (the folder is created when missing)")
    check_writable_parent(flag, path)


def check_writable_parent(flag: str, path: str) -> None:
    """Raise a ValueError unless the nearest existing folder on `path` (itself included) can be written.

    The folders that are missing below it are created later, so only that nearest one must accept new entries.
    """
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{flag} {path!r} cannot be created, because {existing!r} is a file, not a folder")
    if os.access(existing, os.W_OK | os.X_OK):
        return
    if existing == os.path.abspath(path):
        raise ValueError(f"{flag} {path!r} is not writable: {existing!r} does not allow creating files in it. Give a "
                         "folder you can write to")  # fmt: skip
    raise ValueError(f"{flag} {path!r} is not writable: {existing!r} does not allow creating files in it, and it would "
                     f"be created in {existing!r}. Give a path you can write to")  # fmt: skip
