"""The folder list is the architecture: the library core never reaches into the
experiments (the CLI, the application layer, may)."""

import ast
from pathlib import Path

import msn

PACKAGE = Path(msn.__file__).parent
APPLICATION = {"cli.py", "__main__.py"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_core_never_imports_experiments():
    core = [p for p in PACKAGE.rglob("*.py")
            if "experiments" not in p.relative_to(PACKAGE).parts and p.name not in APPLICATION]
    assert len(core) > 15
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in _imports(p) if n.startswith("msn.experiments"))
                 for p in core}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_noise_holds_only_the_corruption():
    names = _imports(PACKAGE / "noise.py")
    assert not any(n.startswith("msn.data") for n in names)
    assert not any(n.startswith("msn.") for n in _imports(PACKAGE / "data" / "records.py") - {"msn.errors", "msn.errors.MsnError"})


def test_no_test_fixtures_ship_in_the_package():
    assert not (PACKAGE / "testing.py").exists()
    assert not any("tiny_model" in p.read_text() for p in PACKAGE.rglob("*.py"))


def test_committed_results_carry_no_machine_paths():
    import re

    docs = Path(__file__).resolve().parents[1] / "docs"
    machine = re.compile(r"(?<![\w.~])/(root|home|work|tmp|Users)/")
    hits = [str(p.relative_to(docs)) for p in docs.rglob("*") if p.suffix in (".json", ".jsonl", ".md")
            and machine.search(p.read_text(encoding="utf-8"))]
    assert hits == []
