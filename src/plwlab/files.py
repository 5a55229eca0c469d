"""File-system helpers: atomic writes (an interruption, a kill or a full disk never leaves a half-written file in
place) and safe, flat directory names."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path`` in one step (the old
    file stays intact until then), when it fails the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def safe_dirname(text: str, limit: int = 200) -> str:
    """``text`` as one flat, safe directory name: characters other than letters, digits and ``._=,+-`` become ``_``
    (so ``data.path=/x/y.json`` does not nest folders) and, when anything was replaced or cut to ``limit``, a short
    hash of the original keeps names distinct."""
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
    if safe == text and len(text) <= limit:
        return text
    return f"{safe[:limit]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
