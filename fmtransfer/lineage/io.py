"""Atomic writes and content hashes: every artifact is written whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fmtransfer.errors import ArtifactError

_CHUNK = 1 << 20
_UMASK = os.umask(0)
os.umask(_UMASK)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# the key under which an artifact's JSON header stores the digest of the rest of itself
HEADER_DIGEST = "header_sha256"


def canonical_json(obj: Any) -> bytes:
    """The one byte form a JSON header is hashed in: keys sorted, no whitespace, ASCII escapes.

    Independent of how the header was laid out on disk (indentation, key order), so a digest taken when an
    artifact is written still holds after any faithful re-serialisation, and fails after any edit of a value.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      default=_json_default).encode("ascii")


def header_sha256(header: dict[str, Any], key: str = HEADER_DIGEST) -> str:
    """sha256 of ``header``'s canonical JSON without ``key`` (the field that holds this digest).

    A header that records its content's hash (``weights_sha256``, ``onnx_sha256``) is thereby covered together
    with that content: one digest over the header and, through that field, the tensors.
    """
    return sha256_bytes(canonical_json({k: v for k, v in header.items() if k != key}))


def seal_header(header: dict[str, Any], key: str = HEADER_DIGEST) -> dict[str, Any]:
    """``header`` as it will read back from JSON (tuples become lists, paths strings), with its digest at ``key``.

    Any earlier digest is replaced: a header derived from another artifact's (a merged model's) is sealed anew.
    """
    plain = json.loads(canonical_json({k: v for k, v in header.items() if k != key}))
    return {**plain, key: header_sha256(plain, key)}


def verify_header(header: dict[str, Any], what: str, covers: str, remake: str) -> None:
    """Refuse a header that is not the one its artifact was written with, or that was never sealed.

    Args:
        header: the artifact's JSON header, as read.
        what: the artifact as messages name it (``"model <path>"``, ``"adapter <path>"``, an ONNX path).
        covers: what the digest protects, for the message (``"classes, preprocessing, ..."``).
        remake: how to re-create an artifact written before headers were hashed (a command to run).

    Raises:
        ArtifactError: the digest is missing or does not match.
    """
    recorded = header.get(HEADER_DIGEST)
    if recorded is None:
        raise ArtifactError(f"{what} has no {HEADER_DIGEST} (format_version {header.get('format_version')}, "
                            f"written before headers were hashed), so its {covers} cannot be verified; {remake}")
    if recorded != header_sha256(header):
        raise ArtifactError(f"{what}: its header ({covers}) does not match the {HEADER_DIGEST} it was written "
                            f"with; it was edited after it was written, refusing it")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    If the block raises, the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts get the usual mode
        publish(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's) content and metadata to the disk.

    A folder that the platform or file system cannot sync (Windows, some network file systems) is left as it is.
    """
    is_dir = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
    finally:
        os.close(fd)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the finished file ``tmp`` to ``path`` so that a crash or power cut leaves the old file or the new one,
    whole: ``tmp``'s bytes reach the disk before the rename, and the rename (the folder's entry) after it."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(Path(path).parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


_NUMBER_LIST = re.compile(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Indented JSON, with lists of numbers kept on one line (confusion matrices stay readable)."""
    text = json.dumps(obj, indent=2, default=_json_default)
    text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)
    return write_text_atomic(path, text + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
