"""Output folders, created up front with one clear error when that cannot be done, and
msn's store: what outlives a call, in one folder (``cache_root()``), one subfolder per kind
(``STORE_KINDS``), each entry a file named by a hash of what it depends on.

Decoding state (``DECODING_STATE``) is of two sorts. *Calibration* (``CALIBRATION``: step
latencies, the CPU kernel decision) is measured once per model shape and machine and then only
read. *Learned state* (``LEARNED``: scored tree steps, recycled candidate tables) grows with every
generation and makes a second run of the same command faster than the first. ``msn cache info``
shows both, ``msn cache clear`` deletes them, and ``msn bench --cold`` / ``msn demo --cold`` run
without learned state (``empty_decoding_state(LEARNED)``, leaving it as it was) on the store's
calibration, so two cold runs decide alike.
"""

from __future__ import annotations

import contextlib
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


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    """msn's cache folder: $MSN_CACHE_DIR, else $XDG_CACHE_HOME/msn, else ~/.cache/msn."""
    root = os.environ.get("MSN_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "msn")
    return Path(root)


STORE_KINDS = {
    "latency": "measured step latency t(n) per model shape, device, dtype and threads (--tree auto)",
    "one-row": "the CPU kernel decision per model shape and machine (one row computed as two)",
    "few-rows": "the CPU kernel decision per model shape and machine (steps up to how many inputs keep F.linear)",
    "acceptance": "scored tree steps per model (--tree auto starts from them)",
    "recycle": "recycled candidate tables per model weights (recycle; tr-jacobi's merged drafts)",
    "tokenized": "training data tokenized by msn train, per data file, tokenizer and settings",
    "models": "models fetched by msn fetch",
}
CALIBRATION = ("latency", "one-row", "few-rows")       # measured once per model shape and machine, then read
LEARNED = ("acceptance", "recycle")          # grows with every generation
DECODING_STATE = CALIBRATION + LEARNED
_ROOTS: dict[str, Path] = {}                 # kind -> the folder standing in for the store (empty_decoding_state)
_ENDED: set[Path] = set()                    # stand-in folders whose block has ended (deleted)


def stored_path(kind: str, key: dict, suffix: str = ".json") -> Path:
    """Where msn's store keeps (``kind``, ``key``): a file named by a hash of the key."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return _ROOTS.get(kind, cache_root()) / kind / f"{digest}{suffix}"


@contextlib.contextmanager
def empty_decoding_state(kinds=DECODING_STATE):
    """Within the block, the decoding state of ``kinds`` is read from and written to an empty
    throw-away folder: a run starts cold and leaves the store as it was. Yields the folder."""
    with tempfile.TemporaryDirectory(prefix="msn-cold-") as tmp:
        try:
            with decoding_store(tmp, kinds) as root:
                yield root
        finally:
            _ENDED.add(Path(tmp))


@contextlib.contextmanager
def decoding_store(root: str | os.PathLike, kinds=DECODING_STATE):
    """Within the block, the decoding state of ``kinds`` is read from and kept in ``root`` (a
    folder of the caller's, kept afterwards) instead of msn's store: a library user's own store."""
    unknown = [k for k in kinds if k not in DECODING_STATE]
    if unknown:
        raise MsnError(f"unknown kind of decoding state {unknown[0]!r}; choose from {', '.join(DECODING_STATE)}")
    before = {k: set_state_root(k, Path(root)) for k in kinds}
    try:
        yield Path(root)
    finally:
        for k, b in before.items():
            set_state_root(k, b)


def set_state_root(kind: str, root: Path | None) -> Path | None:
    """Points ``kind`` of decoding state at ``root`` (None: the store); returns what it was
    (None: the store). ``empty_decoding_state`` is the block form."""
    before = _ROOTS.pop(kind, None)
    if root is not None:
        _ROOTS[kind] = Path(root)
    return before


def state_root(kind: str) -> Path:
    """The folder that holds ``kind`` now (the store, or a stand-in of ``empty_decoding_state``)."""
    return _ROOTS.get(kind, cache_root())


def discarded(path: Path) -> bool:
    """Whether ``path`` lay in an empty store whose block has ended: nothing is to be written there."""
    return any(root == path or root in path.parents for root in _ENDED)


def store_info(kinds=None) -> list[dict]:
    """Per kind of the store: what it holds, its folder, entries, bytes and newest entry (UTC)."""
    import datetime

    rows = []
    for kind in kinds or STORE_KINDS:
        folder = cache_root() / kind
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []
        files = [f for e in entries for f in ([e] if e.is_file() else e.rglob("*")) if f.is_file()]
        newest = max((f.stat().st_mtime for f in files), default=None)
        rows.append({"kind": kind, "what": STORE_KINDS[kind], "folder": str(folder), "entries": len(entries),
                     "bytes": sum(f.stat().st_size for f in files),
                     "newest": datetime.datetime.fromtimestamp(newest, datetime.timezone.utc).strftime(
                         "%Y-%m-%d %H:%M") if newest else None})
    return rows


def clear_store(kinds) -> list[dict]:
    """Deletes every entry of ``kinds``; returns what each held (``store_info``'s rows)."""
    import shutil

    unknown = [k for k in kinds if k not in STORE_KINDS]
    if unknown:
        raise MsnError(f"unknown cache kind {unknown[0]!r}; choose from {', '.join(STORE_KINDS)}")
    rows = store_info(kinds)
    for kind in kinds:
        folder = cache_root() / kind
        if folder.is_dir():
            shutil.rmtree(folder)
    return rows


def read_stored(kind: str, key: dict):
    """What ``write_stored`` kept for (``kind``, ``key``), or None when nothing readable is there."""
    try:
        return json.loads(stored_path(kind, key).read_text())
    except (OSError, ValueError):
        return None


def write_stored(kind: str, key: dict, data) -> None:
    """Keeps ``data`` (JSON) for (``kind``, ``key``), written beside and renamed in (a crash
    leaves the old entry or the new one, never half of one); a read-only cache only costs a new
    measurement."""
    path = stored_path(kind, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass


class FolderLock:
    """One writer per folder: a lock file naming the process that holds it.

    ``acquire`` creates ``path/name`` exclusively, holding this host and pid; a lock whose
    process no longer runs on this host is stale and taken over. ``what`` names the command
    in the error (e.g. ``msn train``).
    """

    def __init__(self, folder: Path, what: str, name: str = ".msn.lock"):
        self.path, self.what = Path(folder) / name, what
        self.held = False

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:         # it exists, under another user
            return True
        return True

    def acquire(self) -> "FolderLock":
        import socket

        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text() or "{}")
                except (OSError, ValueError):
                    other = {}
                pid, host = other.get("pid"), other.get("host")
                if isinstance(pid, int) and (host != me["host"] or self._alive(pid)):
                    where = f"pid {pid}" + ("" if host == me["host"] else f" on {host}")
                    raise MsnError(f"another {self.what} ({where}) is writing into {self.path.parent}; wait for "
                                   f"it or choose another folder (if it is gone, delete {self.path})") from None
                self.path.unlink(missing_ok=True)       # stale: its process has ended
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise MsnError(f"cannot take the lock {self.path}; delete it if no {self.what} is running")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def replace_folder_files(staged: Path, target: Path, last: str | None = None) -> None:
    """Moves every file of ``staged`` into ``target`` by atomic renames (same file system),
    ``last`` (a file name) after all the others, then removes ``staged``. A kill at any moment
    leaves each file either old or new, never half written."""
    files = sorted((p for p in staged.rglob("*") if p.is_file()), key=lambda p: p.name == last)
    for f in files:
        dest = target / f.relative_to(staged)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, dest)
    import shutil

    shutil.rmtree(staged, ignore_errors=True)


MODEL_FILES = ("config.json", "adapter_config.json")     # a folder holding one of these is a model


def check_apart(out: str | os.PathLike, flag: str, inputs: dict[str, str | os.PathLike | None],
                models_allowed: bool = False) -> None:
    """The one rule of every command that writes a folder: ``out`` is not one of the command's
    input folders, does not lie inside one and does not hold one; and, unless ``models_allowed``
    (the command writes a model there itself), it is not a model checkpoint folder.

    ``inputs`` maps each input's flag to its path (None or a path that does not exist: skipped;
    a file stands for itself only, its folder stays writable).
    """
    o = Path(out).expanduser().resolve()
    for name, value in inputs.items():
        if value is None or not Path(value).expanduser().exists():
            continue
        p = Path(value).expanduser().resolve()
        if p.is_file():
            if o == p:
                raise MsnError(f"{flag} {out} is the {name} file; write to a folder of its own")
            continue
        if o == p or p in o.parents:
            raise MsnError(f"{flag} {out} is (or lies inside) the {name} folder {value}; writing there would change "
                           "an input; choose a folder of its own")
        if o in p.parents:
            raise MsnError(f"{flag} {out} holds the {name} folder {value}; choose a folder that holds no input")
    if not models_allowed and o.is_dir():
        held = [f for f in MODEL_FILES if (o / f).exists()]
        if held:
            raise MsnError(f"{flag} {out} holds a model ({held[0]}); msn writes results there only into a folder "
                           "of their own")


def clean_staging(folder: Path) -> Path:
    """An empty staging folder at ``folder``: what a killed run left there is removed, never moved in."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder
