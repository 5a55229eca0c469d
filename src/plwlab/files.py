"""File-system helpers: atomic writes (an interruption, a kill or a full disk never leaves a half-written file in
place), safe, flat directory names, and CSV cells a spreadsheet does not run as formulas."""

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


def is_folder_name(text: str) -> bool:
    """``text`` names one folder inside its parent: not empty, ``.`` or ``..``, no separator, only the characters
    :func:`safe_dirname` keeps (so a path built from it stays inside its root)."""
    return text not in ("", ".", "..") and safe_dirname(text) == text


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet reads a cell starting so as a formula (OWASP)


def spreadsheet_safe(value: object) -> object:
    """A CSV cell that a spreadsheet shows as text: a string starting like a formula (:data:`FORMULA_STARTS`, not a
    number such as ``-0.5``) gets a leading ``'``, as OWASP recommends, and so does one that starts with ``'``
    already, so that :func:`from_spreadsheet_safe` restores every value exactly."""
    if not isinstance(value, str) or not value:
        return value
    if value.startswith("'") or (value.startswith(FORMULA_STARTS) and not _is_number(value)):
        return "'" + value
    return value


def from_spreadsheet_safe(value: object) -> object:
    """The value :func:`spreadsheet_safe` was given."""
    return value[1:] if isinstance(value, str) and value.startswith("'") else value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
