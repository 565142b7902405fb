"""``msn data stdlib-code``: an offline code SFT set from the running interpreter's
standard library (PSF-2.0 licensed source).

Each example pairs a function's signature and docstring (the prompt) with the
function's full source (the response). Modules are split deterministically by a hash
of the module name, so a held-out module never contributes to training.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import sysconfig
from pathlib import Path

from tqdm import tqdm

from msn.errors import MsnError
from msn.paths import check_apart, ensure_output_dir

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}
PROMPT = "Write the Python function `{name}{signature}` for the module `{module}`.\n\nDocstring:\n{doc}"


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def held_out(module: str, percent: int) -> bool:
    """Deterministic module-level split: the same module always lands on the same side."""
    top = module.split(".")[0]
    h = int(hashlib.sha1(top.encode()).hexdigest(), 16) % 100
    return h < percent


def _examples_from_source(source: str, module: str, max_lines: int) -> list[dict]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    src_lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc) < 20:
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        lines = node.end_lineno - first + 1
        if lines < 3 or lines > max_lines:
            continue
        indent = node.col_offset
        segment = src_lines[first - 1 : node.end_lineno]
        body = "\n".join(line[indent:] if line[:indent].strip() == "" else line for line in segment)
        args = ast.unparse(node.args)
        out.append({
            "prompt": PROMPT.format(name=node.name, signature=f"({args})", module=module, doc=doc.strip()),
            "response": f"```python\n{body}\n```",
            "module": module,
        })
    return out


def build(out_dir: str | Path, held_out_percent: int = 10, max_lines: int = 40,
          stdlib: str | Path | None = None, progress: bool = True) -> dict:
    """Writes ``train.jsonl``, ``heldout.jsonl`` and ``info.json`` to ``out_dir``."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise MsnError(f"standard library folder {root} not found")
    if not 0 < held_out_percent < 100:
        raise MsnError(f"held-out percent must be between 1 and 99, got {held_out_percent}")
    check_apart(out_dir, "--out", {})
    ensure_output_dir(out_dir, "--out")
    files = sorted(p for p in root.rglob("*.py") if not (SKIP_DIRS & set(p.relative_to(root).parts)))
    train, heldout = [], []
    for path in tqdm(files, desc="stdlib modules", disable=not progress):
        module = _module_name(path, root)
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        examples = _examples_from_source(source, module, max_lines)
        (heldout if held_out(module, held_out_percent) else train).extend(examples)
    out = ensure_output_dir(out_dir, "--out")
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        with open(out / name, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    info = {
        "source": str(root),
        "license": "PSF-2.0 (Python Software Foundation License), the license of the CPython standard library",
        "train_examples": len(train),
        "heldout_examples": len(heldout),
        "train_modules": len({r["module"] for r in train}),
        "heldout_modules": sorted({r["module"].split(".")[0] for r in heldout}),
        "held_out_percent": held_out_percent,
        "max_lines": max_lines,
    }
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


# The same functions asked for as a user might ask (``requests``): the first sentence of the
# docstring, its imperative verb put in the third person, in one of these phrasings.
REQUEST_TEMPLATES = (
    "Write a Python function that {what}.",
    "Can you write a Python function called `{name}` that {what}?",
    "I need a Python function that {what}. Please write it.",
    "How do I write a function in Python that {what}?",
    "Give me a Python function `{signature}` that {what}.",
    "Implement a function in Python that {what}.",
    "Please write Python code for a function that {what}.",
)
REQUEST_SEED = 7
_VERBS = frozenset(
    "return set create get read handle add initialize remove convert parse test write process send find format "
    "make construct close delete open check update clear generate replace load log compute build run start stop "
    "copy split join encode decode compare count print save search sort apply call calculate extract wrap "
    "validate escape normalize register append insert determine".split())
_PROMPT_PARTS = re.compile(r"Write the Python function `(.+?)` for the module `(.+?)`\.\n\nDocstring:\n(.*)", re.S)


def _third_person(verb: str) -> str:
    """``Return`` -> ``returns``; a verb already in the third person is kept."""
    verb = verb.lower()
    if verb.endswith("s") and not verb.endswith("ss"):
        return verb
    if re.search(r"(ss|sh|ch|x|z|o)$", verb):
        return verb + "es"
    if re.search(r"[^aeiou]y$", verb):
        return verb[:-1] + "ies"
    return verb + "s"


def as_request(record: dict, rng: random.Random) -> dict | None:
    """A stdlib record's prompt in a user's words ("Write a Python function that returns
    ..."), or None where it does not read as one: a method, a private function, a
    docstring whose first sentence is not an imperative of a few words."""
    m = _PROMPT_PARTS.match(record.get("prompt", ""))
    if not m:
        return None
    signature, module, doc = m.groups()
    name = signature.split("(")[0]
    if "self" in signature or name.startswith("_"):
        return None
    first = doc.split("\n\n")[0].replace("\n", " ").strip()
    first = re.split(r"(?<=[a-z0-9)])\. ", first)[0].rstrip(".").strip()
    words = first.split()
    verb = words[0].lower() if words else ""
    if len(words) < 3 or len(first) > 160 or (verb not in _VERBS and verb.rstrip("s") not in _VERBS):
        return None
    what = " ".join([_third_person(words[0]), *words[1:]])
    prompt = rng.choice(REQUEST_TEMPLATES).format(what=what, name=name, signature=signature)
    return {"prompt": prompt, "response": record.get("response", ""), "module": module}


def write_requests(records: list[dict], out_dir: str | Path, skip: set[int] = frozenset()) -> int:
    """Writes ``out_dir/train.jsonl``: the records (but those at the indices ``skip``) that
    read as a request (``as_request``), in a user's words. Returns how many."""
    rng = random.Random(REQUEST_SEED)
    rows = [q for i, r in enumerate(records) if i not in skip and (q := as_request(r, rng)) is not None]
    from msn.data.records import write_jsonl

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", rows)
    return len(rows)
