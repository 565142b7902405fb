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
