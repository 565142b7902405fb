"""Loading SFT records and turning them into token ids, labels and noise masks.

A record is ``{"prompt": str, "response": str}`` or ``{"messages": [{"role", "content"},
...]}`` (OpenAI chat format, at least one ``assistant`` message). The tokenizer's chat
template renders the conversation; every assistant turn is a response: its tokens get
labels, and its non-special tokens may receive noise.

Truncation policy: sequences longer than ``max_length`` tokens keep their first
``max_length`` tokens; a sample left with no response token is dropped and counted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from msn.errors import MsnError

IGNORE_INDEX = -100  # label of positions that carry no loss (prompt, template, padding)

# Used only when a tokenizer has no chat template of its own.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")


def _check_record(rec, where: str) -> list[dict]:
    if not isinstance(rec, dict):
        raise MsnError(f"{where}: a record must be a JSON object")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise MsnError(f"{where}: 'messages' must be a non-empty list")
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                raise MsnError(f"{where}: each message needs 'role' ({'/'.join(ROLES)}) and string 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise MsnError(f"{where}: no assistant message to learn from")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if "prompt" in rec and "response" in rec:
        for key in ("prompt", "response"):
            if not isinstance(rec[key], str):
                raise MsnError(f"{where}: {key!r} must be a string, got {type(rec[key]).__name__}")
        return [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]
    raise MsnError(f"{where}: expected {{\"prompt\", \"response\"}} strings or {{\"messages\": [...]}}, "
                   f"got keys {sorted(rec)}")


def jsonl_lines(path: Path):
    """(line number, parsed value) for each non-blank line of a JSONL file; a line that is not
    UTF-8 or not JSON is one clear error naming the file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MsnError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line); "
                               "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise MsnError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def load_conversations(path: str | os.PathLike) -> list[list[dict]]:
    """Reads records from a JSONL file (line-numbered errors) or anything ``datasets``
    loads (a .json/.csv/.parquet file or a saved dataset folder)."""
    out = list(iter_conversations(path))
    if not out:
        raise MsnError(f"{path}: the data set is empty")
    return out


def iter_conversations(path: str | os.PathLike):
    """The records of ``path`` one at a time, each checked (see ``load_conversations``)."""
    p = Path(path)
    if not p.exists():
        raise MsnError(f"data file {p} does not exist")
    if p.is_file() and p.suffix in (".jsonl", ".ndjson"):
        for lineno, rec in jsonl_lines(p):
            yield _check_record(rec, f"{p}:{lineno}")
        return
    import datasets

    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
        else:
            kind = {".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(p.suffix)
            if kind is None:
                raise MsnError(f"{p}: unsupported data format; use .jsonl, .json, .csv, .parquet or a saved dataset")
            ds = datasets.load_dataset(kind, data_files=str(p), split="train")
    except MsnError:
        raise
    except UnicodeDecodeError:
        raise MsnError(f"{p}: not UTF-8 text; save the file as UTF-8") from None
    except Exception as e:  # datasets raises many types for unreadable files
        raise MsnError(f"{p}: cannot read data ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    for i, rec in enumerate(ds):
        yield _check_record(rec, f"{p}[row {i}]")


def ensure_chat_template(tokenizer) -> bool:
    """Gives a tokenizer without a chat template the ChatML fallback; True if it did."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return True


def encode_prompt(tokenizer, messages: list[dict], device=None):
    """(1, T) ids of a conversation rendered with the chat template and the assistant's
    generation prompt, ready for decoding."""
    text = _render(tokenizer, messages, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids.to(device) if device is not None else ids


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    noise_mask: list[int]


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int) -> Tokenized | None:
    """Token ids with labels on assistant turns and the positions noise may touch.

    Returns None when truncation leaves no response token.
    """
    full = _render(tokenizer, messages)
    spans = []  # character spans of assistant turns: (turn start, content end, turn end)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1])
        if not full.startswith(before) or not full.startswith(upto):
            raise MsnError("the tokenizer's chat template does not render conversations prefix by prefix; "
                           "give a template where each turn only appends text")
        content = m["content"]
        start = len(before)
        at = upto.find(content, start) if content else -1
        # Noise goes only on the message's own text, never on template text around it.
        content_end = at + len(content) if at == start else start
        spans.append((start, content_end, len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    special = set(tokenizer.all_special_ids)
    labels, noise = [], []
    for tok, (a, b) in zip(ids, offsets):
        in_resp = b > a and any(s <= a < e for s, _, e in spans)
        in_content = b > a and any(s <= a and b <= c for s, c, _ in spans)
        labels.append(tok if in_resp else IGNORE_INDEX)
        noise.append(1 if in_content and tok not in special else 0)
    ids, labels, noise = ids[:max_length], labels[:max_length], noise[:max_length]
    if all(l == IGNORE_INDEX for l in labels):
        return None
    return Tokenized(ids, labels, noise)


def build_examples(tokenizer, conversations: list[list[dict]], max_length: int) -> tuple[list[dict], int]:
    """Tokenizes every conversation; returns (examples, number dropped by truncation)."""
    examples, dropped = [], 0
    for conv in conversations:
        t = tokenize_conversation(tokenizer, conv, max_length)
        if t is None:
            dropped += 1
            continue
        examples.append({"input_ids": t.input_ids, "labels": t.labels, "noise_mask": t.noise_mask,
                         "index": len(examples)})
    return examples, dropped


def appended_lines(path: Path, what: str) -> tuple[list, bool]:
    """The JSON values of a file that msn appends to line by line (progress, answers): a last line
    cut by a kill is left out (returned ``True`` as ``cut``); a bad line before it is one error."""
    raw = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    rows, cut = [], False
    for n, line in enumerate(raw):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if n != len(raw) - 1:
                raise MsnError(f"{path}:{n + 1}: not {what}; delete {Path(path).name} to start again") from None
            cut = True
    return rows, cut


def resumed_rows(path: Path, what: str, key: str) -> dict:
    """The rows an interrupted run appended to ``path`` (answers made so far), by their ``key``
    field; {} when there is no file. The file is rewritten with them, so a line cut by a kill
    is gone before new lines follow. A file of other rows is one error."""
    path = Path(path)
    if not path.exists():
        return {}
    rows, _ = appended_lines(path, what)
    try:
        done = {row[key]: row for row in rows}
    except (KeyError, TypeError):
        raise MsnError(f"{path}: not {what}; delete {path.name} to start again") from None
    write_jsonl(path, done.values())
    return done


def write_jsonl(path: Path, rows) -> None:
    """Writes ``rows`` to ``path`` one JSON value per line, through a staging file, so a kill
    leaves the old file or the new one, never a part."""
    path = Path(path)
    staging = path.with_name(path.name + ".partial")
    with open(staging, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    staging.replace(path)
