"""Checks of the paths a job reads and writes, made before any work, and outputs written all or nothing.

The checks take the name of what they check (`argument`: a flag such as "--output" for the `pdm` command and the
training scripts, a parameter name for library code) and raise `ArgumentError` with it, so the caller decides how
to name it; the `pdm` command reports an `ArgumentError` that names a flag as a usage error (exit status 2).

An output is first written under a temporary name in its own folder (so the final rename stays on one file system)
and renamed into place with `os.replace` only once every output of the job was written: an error or an interrupt
leaves no partial file and no half-written folder, and the previous output, if any, untouched.

Only the standard library is imported here: the `pdm` command checks its arguments without torch.
"""

import contextlib
import os
import re
import shutil
import uuid

from .errors import ArgumentError

# What a Hub repository id looks like ("name" or "owner/name"); anything else that does not exist is a missing path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def looks_like_hub_id(name: str) -> bool:
    return bool(HUB_ID.fullmatch(name)) and not name.endswith((".", "-")) and ".." not in name


def check_input_file(argument, path):
    if not os.path.exists(path):
        raise ArgumentError(argument, f"no such file: {path}")
    if not os.path.isfile(path):
        raise ArgumentError(argument, f"{path} is not a file")


def check_input_folder(argument, path, required=(), what="folder"):
    """ArgumentError unless `path` is a folder holding each of `required` (names relative to it)."""
    if not os.path.exists(path):
        raise ArgumentError(argument, f"no such folder: {path}")
    if not os.path.isdir(path):
        raise ArgumentError(argument, f"{path} is a file, not a {what}")
    missing = [name for name in required if not os.path.exists(os.path.join(path, name))]
    if missing:
        raise ArgumentError(argument, f"{path} is not a {what}: it has no {', '.join(missing)}")


def check_local_or_hub(argument, name, required=(), what="folder"):
    """`name` is an existing folder (checked as in `check_input_folder`) or could be a Hub id; returns True if local.

    "owner/name" whose "owner" is a local folder is taken for a mistyped path, not sent to the Hub.
    """
    owner = name.split("/")[0]
    if os.path.exists(name) or not looks_like_hub_id(name) or ("/" in name and os.path.isdir(owner)):
        check_input_folder(argument, name, required, what)
        return True
    return False


def _check_parent(argument, path):
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ArgumentError(argument, f"the folder {os.path.dirname(path) or '.'} of {path} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArgumentError(argument, f"the folder {os.path.dirname(path) or '.'} of {path} is not writable")


def check_output_file(argument, path, overwrite=False, extensions=None):
    """ArgumentError unless `path` can be written as a new file (or replaced, with `overwrite`)."""
    if os.path.isdir(path):
        raise ArgumentError(argument, f"{path} is a folder; give a file name")
    if extensions is not None and os.path.splitext(path)[1].lower() not in extensions:
        examples = ", ".join(sorted(extensions, key=lambda e: (e not in (".png", ".jpg", ".webp"), e))[:3])
        raise ArgumentError(argument, f"{path} does not end in a file extension to write ({examples}, ...)")
    if os.path.exists(path) and not overwrite:
        raise ArgumentError(argument, f"{path} exists; pass --overwrite to replace it")
    _check_parent(argument, path)


def check_output_folder(argument, path, overwrite=False, make_parents=False):
    """ArgumentError unless `path` can be written as a new folder (or an empty one, or replaced with `overwrite`);
    with `make_parents` its missing parent folders may be made too."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ArgumentError(argument, f"{path} is a file, not a folder")
        if os.listdir(path) and not overwrite:
            raise ArgumentError(argument, f"{path} exists and is not empty; pass --overwrite to replace it")
    if make_parents:
        check_creatable_folder(argument, path)
    else:
        _check_parent(argument, path)


def check_creatable_folder(argument, path):
    """ArgumentError unless `path` is a folder, or one that can be made (its nearest existing parent is writable)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ArgumentError(argument, f"{path} is a file, not a folder")
    ancestor = os.path.abspath(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ArgumentError(argument, f"cannot write {path}: {ancestor} is not a writable folder")


def check_distinct(**paths):
    """ArgumentError if two outputs ({flag: path}) are the same file."""
    seen = {}
    for argument, path in paths.items():
        if path is None:
            continue
        key = os.path.realpath(path)
        if key in seen:
            raise ArgumentError(argument, f"{path} is also the output of {seen[key]}")
        seen[key] = argument


def _temporary_name(path):
    """A name beside `path`, hidden, with the same extension (image writers choose the format by it)."""
    folder, name = os.path.split(os.path.abspath(path))
    stem, extension = os.path.splitext(name)
    return os.path.join(folder, f".{stem}.pdm-tmp-{uuid.uuid4().hex[:12]}{extension}")


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _replace(temporary, path):
    """Move `temporary` to `path`; an existing folder at `path` is moved aside first (a rename cannot replace a
    non-empty folder) and deleted once the new one is in place."""
    if os.path.isdir(path) and not os.path.islink(path):
        old = _temporary_name(path) + "-old"
        os.replace(path, old)
        os.replace(temporary, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temporary, path)


@contextlib.contextmanager
def atomic_outputs(*paths, folders=False):
    """Yields one temporary path per output (a created empty folder when `folders`); when the block succeeds
    every output is renamed into place, when it fails every temporary is removed and no output changes."""
    temporaries = [_temporary_name(path) for path in paths]
    if folders:
        for temporary in temporaries:
            os.makedirs(temporary)
    try:
        yield temporaries
        missing = [path for path, temporary in zip(paths, temporaries) if not os.path.exists(temporary)]
        if missing:
            raise RuntimeError(f"nothing was written for {', '.join(missing)}")
    except BaseException:
        for temporary in temporaries:
            _remove(temporary)
        raise
    for temporary, path in zip(temporaries, paths):
        _replace(temporary, path)


def atomic_output(path, folder=False):
    """`atomic_outputs` for one output: yields its temporary path."""

    @contextlib.contextmanager
    def one():
        with atomic_outputs(path, folders=folder) as (temporary,):
            yield temporary

    return one()
