"""Atomic file and folder writes (one implementation for the whole package).

A reader (another process, a resumed run, the Hub upload) never sees a half-written file: content goes to a
temporary name in the destination folder and is moved in with ``os.replace`` (atomic on POSIX). On any error the
temporary file is removed. Everything written gets the usual modes (``0666 & ~umask``, i.e. 0644 with the common
umask), also when the writer used 0600 (``tempfile.mkstemp``, safetensors' ``save_file``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator

__all__ = [
    "atomic_path",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_directory",
    "normalize_modes",
    "replace_entries",
]


def _temporary_name(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    # keep the extension last so libraries that infer the format from it (PIL, matplotlib) still work
    return os.path.join(folder, f".tmp-{uuid.uuid4().hex[:8]}-{stem}{ext}")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normalize_modes(path: str) -> None:
    """Give ``path`` (and everything under it) the modes a plain ``open``/``mkdir`` would: ``0666 & ~umask`` for
    files, ``0777 & ~umask`` for folders. Needed because some writers (safetensors' ``save_file``,
    ``tempfile``) create 0600 files, which other users, web servers and containers cannot read."""
    mask = _umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    if not os.path.isdir(path):
        os.chmod(path, file_mode)
        return
    os.chmod(path, dir_mode)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), file_mode)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; write it inside the block; it replaces ``path`` on success.

    Example: ``with atomic_path("grid.png") as tmp: image.save(tmp)``.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _temporary_name(path)
    try:
        yield tmp
        normalize_modes(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    return os.fspath(path)


def atomic_write_json(path: str | os.PathLike, data, **json_kwargs) -> str:
    """Write ``data`` as JSON (``indent=2, sort_keys=True`` unless given) atomically; returns the path."""
    json_kwargs = {"indent": 2, "sort_keys": True, **json_kwargs}
    return atomic_write_text(path, json.dumps(data, **json_kwargs) + "\n")


def replace_entries(source_dir: str, target_dir: str) -> None:
    """Move every top-level entry of ``source_dir`` into ``target_dir``, replacing entries of the same name.

    Files move with one ``os.replace``. An existing folder is renamed aside, the new one renamed in, then the old
    one deleted, so a reader never sees a half-written folder. Other entries of ``target_dir`` are left alone.
    """
    for name in sorted(os.listdir(source_dir)):
        source, target = os.path.join(source_dir, name), os.path.join(target_dir, name)
        if os.path.isdir(source) and os.path.isdir(target):
            old = os.path.join(target_dir, f".old-{uuid.uuid4().hex[:8]}-{name}")
            os.replace(target, old)
            os.replace(source, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(source, target)


@contextlib.contextmanager
def atomic_directory(output_dir: str | os.PathLike, merge: bool = True) -> Iterator[str]:
    """Yield an empty staging folder inside ``output_dir``; on success its entries move into ``output_dir``.

    ``merge=True`` (export): entries replace same-named ones, other entries of ``output_dir`` stay.
    ``merge=False``: the staging folder itself becomes ``output_dir`` (which must not exist, e.g. a checkpoint).
    On any error the staging folder is deleted and ``output_dir`` is untouched.
    """
    output_dir = os.fspath(output_dir)
    parent = output_dir if merge else os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = _temporary_name(os.path.join(parent, "staging" if merge else os.path.basename(output_dir)))
    os.mkdir(staging)  # mode 0777 & ~umask, unlike tempfile.mkdtemp's 0700
    try:
        yield staging
        normalize_modes(staging)
        if merge:
            replace_entries(staging, output_dir)
        else:
            os.replace(staging, output_dir)
    finally:
        _remove(staging)
