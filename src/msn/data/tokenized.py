"""Training records tokenized once, through ``datasets``, and kept memory-mapped.

``tokenized_dataset`` turns a records file (see ``msn.data.records``) into a ``datasets.Dataset``
of ``input_ids``, ``labels``, ``noise_mask`` and ``index`` (the sample's position, which seeds
its noise) stored as Arrow files in msn's cache (``<cache>/tokenized/<key>``). The key is
the data's content hash, the tokenizer (its vocabulary, merges and chat template), the
``max_length`` and ``TOKENIZATION`` (bumped whenever the tokenization changes), so a second run
on the same file reads the cache instead of tokenizing again, and any change tokenizes anew.

Nothing is held as Python lists: records are validated line by line while ``datasets``
writes them to Arrow, tokenized in batches (``num_proc`` processes for large files) with a
progress bar, and read back memory-mapped, so a million-record file trains in about the
memory of a small one. A bad line is still one error naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from msn.errors import MsnError

log = logging.getLogger("msn.data")
TOKENIZATION = 1            # version of the token/label/noise-mask layout the cache holds
PARALLEL_FROM = 20_000      # records from which tokenization uses several processes


def content_hash(path: str | os.PathLike) -> str:
    """sha256 of a data file, or of the names and hashes of a folder's files."""
    from msn.paths import sha256_file

    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(f"{f.relative_to(p)} {sha256_file(f)}\n".encode())
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """A hash of what decides a tokenizer's output: its vocabulary and rules, special tokens and
    chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    return h.hexdigest()


def _records(path: str):
    """Validated records ({"messages": [...]}) of a data file, one at a time."""
    from msn.data.records import iter_conversations

    for conv in iter_conversations(path):
        yield {"messages": conv}


def _tokenize(batch: dict, tokenizer, max_length: int) -> dict:
    from msn.data.records import tokenize_conversation

    out = {"input_ids": [], "labels": [], "noise_mask": [], "keep": [], "empty": []}
    for conv in batch["messages"]:
        t = tokenize_conversation(tokenizer, conv, max_length)
        out["keep"].append(t is not None)
        out["empty"].append(any(m["role"] == "assistant" and not m["content"].strip() for m in conv))
        out["input_ids"].append(t.input_ids if t else [])
        out["labels"].append(t.labels if t else [])
        out["noise_mask"].append(t.noise_mask if t else [])
    return out


def tokenized_dataset(tokenizer, path: str, max_length: int, what: str = "training",
                      num_proc: int | None = None):
    """The tokenized examples of ``path`` as a memory-mapped ``datasets.Dataset`` (cached).

    Args:
        num_proc: tokenizing processes; default: up to 8 (the CPU count) for files of
            ``PARALLEL_FROM`` records or more, one process below.
    Raises ``MsnError`` for a bad record (file and line) or when no example keeps a response
    token within ``max_length``.
    """
    import datasets

    from msn.paths import stored_path

    key = {"data": content_hash(path), "tokenizer": tokenizer_hash(tokenizer), "max_length": max_length,
           "layout": TOKENIZATION}
    folder = stored_path("tokenized", key, suffix="")
    if (folder / "info.json").exists():
        log.info("%s: tokenized %s data read from the cache (%s)", path, what, folder)
    else:
        _build(folder, tokenizer, path, max_length, what, num_proc, key)
    info = json.loads((folder / "info.json").read_text())
    if info["empty_responses"]:
        log.warning("%s: %d record(s) have an empty assistant response; they train on the end-of-turn "
                    "tokens only and receive no noise", path, info["empty_responses"])
    if info["dropped"]:
        log.warning("%s: %d sample(s) dropped: no response token within max_length=%d", path, info["dropped"],
                    max_length)
    return datasets.load_from_disk(str(folder / "data"))


def _build(folder: Path, tokenizer, path: str, max_length: int, what: str, num_proc: int | None, key: dict):
    """Tokenizes ``path`` into ``folder`` (written beside it, then renamed in: a kill leaves no
    half-written cache)."""
    import datasets

    from msn.data.records import iter_conversations

    if next(iter_conversations(path), None) is None:        # datasets cannot hold an empty generator
        raise MsnError(f"{path}: the data set is empty")
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        features = datasets.Features({"messages": [{"role": datasets.Value("string"),
                                                    "content": datasets.Value("string")}]})
        try:
            records = datasets.Dataset.from_generator(_records, gen_kwargs={"path": str(path)}, features=features,
                                                      cache_dir=str(staging / "records"))
        except datasets.exceptions.DatasetGenerationError as e:
            if isinstance(e.__cause__, MsnError):
                raise e.__cause__ from None
            raise
        if num_proc is None:
            num_proc = min(8, os.cpu_count() or 1) if len(records) >= PARALLEL_FROM else None
        out_features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                          "labels": datasets.Sequence(datasets.Value("int32")),
                                          "noise_mask": datasets.Sequence(datasets.Value("int8")),
                                          "keep": datasets.Value("bool"), "empty": datasets.Value("bool")})
        tokens = records.map(_tokenize, batched=True, batch_size=256, num_proc=num_proc,
                             fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
                             remove_columns=["messages"], features=out_features,
                             desc=f"Tokenizing {what} data")
        keep = tokens.data.column("keep").to_numpy(zero_copy_only=False)
        empty = int(tokens.data.column("empty").to_numpy(zero_copy_only=False).sum())
        kept = tokens.select(keep.nonzero()[0]) if not keep.all() else tokens
        if len(kept) == 0:
            raise MsnError(f"{path}: no {what} example keeps a response token within max_length={max_length}")
        kept = kept.remove_columns(["keep", "empty"]).add_column("index", range(len(kept)))
        kept.save_to_disk(str(staging / "data"))
        info = {"records": len(keep), "examples": len(kept), "dropped": len(keep) - len(kept),
                "empty_responses": empty, **key, "source": str(Path(path).resolve())}
        (staging / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        del records, tokens, kept
        shutil.rmtree(staging / "records", ignore_errors=True)
        try:
            staging.rename(folder)
        except OSError:         # another process cached the same data first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
