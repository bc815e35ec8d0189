"""The checkpoint id every response carries: the SHA-256 of model.safetensors, computed once per file version.

Hashing a 7 GB pi05 file costs seconds of disk reading at every replica start.
The id stays a hash of the whole content (a partial hash or the header alone
would give a fine-tune that changed only the normalisation statistics the id
of its parent: the one mix-up the id exists to expose). What changes is when
it is computed: once per version of the file, then cached under the file's
identity:

    (real path, device, inode, size, mtime in ns, ctime in ns)

Writing the file in place changes its mtime and ctime; replacing it (a copy,
`mv`, a new download) changes its inode. Setting mtime back by hand still
changes ctime, which no user call can set. So a cached id is only reused for
the very bytes it was computed from. The cache is one small JSON file per
weights path, under $ROBOT_POLICY_SERVE_CACHE or ~/.cache/robot-policy-serve,
written atomically; if it cannot be written the id is still right, just
computed again next time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

ID_HEX_DIGITS = 16
BLOCK = 1 << 22


def cache_dir() -> Path:
    root = os.environ.get("ROBOT_POLICY_SERVE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "robot-policy-serve"


def file_identity(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "device": st.st_dev, "inode": st.st_ino, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def content_id(path: Path) -> str:
    """First 16 hex digits of the SHA-256 of the file: reads every byte."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()[:ID_HEX_DIGITS]


def checkpoint_id(weights_path: Path) -> str:
    """content_id(weights_path), from the cache when this exact file version was hashed before."""
    identity = file_identity(weights_path)
    entry = cache_dir() / "checkpoint-ids" / (hashlib.sha256(identity["path"].encode()).hexdigest()[:32] + ".json")
    try:
        cached = json.loads(entry.read_text())
        if cached.get("identity") == identity:
            return cached["id"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    found = content_id(weights_path)
    if file_identity(weights_path) == identity:  # unchanged while we read it: safe to remember
        _write_atomically(entry, json.dumps({"identity": identity, "id": found}))
    return found


def _write_atomically(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the id is still right, only computed again next start
