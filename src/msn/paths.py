"""Output folders, created up front with one clear error when that cannot be done, and
msn's cache of measurements (JSON files named by what they depend on)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from msn.errors import MsnError


def ensure_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Creates ``path`` (and its parents) and checks that files can be written in it.

    ``flag`` names the option in the error (e.g. ``--output-dir``).
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise MsnError(f"{flag} {p} is a file, not a folder; give a folder path")
    for parent in p.parents:
        if parent.exists() and not parent.is_dir():
            raise MsnError(f"{flag} {p} lies under {parent}, which is a file; give a folder path")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise MsnError(f"{flag} {p} cannot be created or written to ({e.strerror or e}); choose another folder") from None
    return p


def cache_root() -> Path:
    """msn's cache folder: $MSN_CACHE_DIR, else $XDG_CACHE_HOME/msn, else ~/.cache/msn."""
    root = os.environ.get("MSN_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "msn")
    return Path(root)


def _stored_path(kind: str, key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root() / kind / f"{digest}.json"


def read_stored(kind: str, key: dict):
    """What ``write_stored`` kept for (``kind``, ``key``), or None when nothing readable is there."""
    try:
        return json.loads(_stored_path(kind, key).read_text())
    except (OSError, ValueError):
        return None


def write_stored(kind: str, key: dict, data) -> None:
    """Keeps ``data`` (JSON) for (``kind``, ``key``); a read-only cache only costs a new measurement."""
    path = _stored_path(kind, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data) + "\n")
    except OSError:
        pass
