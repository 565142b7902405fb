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


def _runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """The ``modules`` that ``path`` imports anywhere, inside functions too, leaving out the
    imports under ``if TYPE_CHECKING:`` (annotations only, never run). ``from pkg import mod``
    counts as importing ``pkg.mod``, not the package."""
    tree = ast.parse(path.read_text(), str(path))
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module:
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            found.update(subs or ({node.module} & modules))
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that comes back to its start), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    """No module of msn imports, directly or through others, a module that imports it back,
    counting the imports inside functions (a package counts as its ``__init__``)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    assert {"msn", "msn.decoding.engine", "msn.decoding.step", "msn.adapter", "msn.fetch", "msn.loading"} <= set(modules)
    graph = {name: _runtime_imports(path, set(modules)) - {name} for name, path in modules.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]     # the check finds one


TRANSFORMERS_NAMES = {"sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention",
                      "paged_attention", "sdpa_paged", "eager_paged"}


def test_src_writes_no_environment_and_registers_over_no_transformers_name():
    """No file in src/msn assigns to ``os.environ`` (or calls its writers, or ``os.putenv``), and no
    ``register`` call (transformers' AttentionInterface, AttentionMaskInterface) names an
    implementation transformers itself defines: msn registers under its own names only."""
    bad = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
                targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
                bad += [f"{path.name}:{node.lineno}" for t in targets
                        if isinstance(t, ast.Subscript) and "environ" in ast.unparse(t.value)]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner, name = ast.unparse(node.func.value), node.func.attr
                if ("environ" in owner and name in ("pop", "update", "setdefault", "clear", "__setitem__")) \
                        or (owner == "os" and name in ("putenv", "unsetenv")):
                    bad.append(f"{path.name}:{node.lineno}")
                if name == "register" and node.args and isinstance(node.args[0], ast.Constant) \
                        and node.args[0].value in TRANSFORMERS_NAMES:
                    bad.append(f"{path.name}:{node.lineno} registers over {node.args[0].value!r}")
    assert not bad, bad


# Modules that run a model for a loss or a probe, not a decoding step (training and its evaluation).
NOT_DECODING = {"evaluate.py", "data/packing.py"}


def _calls_a_model(node: ast.AST) -> bool:
    """``model(...)``, ``self.model(...)``, ``x.model(...)`` or ``<any of those>.forward(...)``."""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    if isinstance(f, ast.Attribute) and f.attr == "forward":
        f = f.value
    return (isinstance(f, ast.Name) and f.id == "model") or (isinstance(f, ast.Attribute) and f.attr == "model")


def test_only_the_step_module_calls_the_model():
    """Every decoding forward goes through ``msn.decoding.step``: no other module of src/msn
    calls a model (training's loss and probe modules apart)."""
    callers = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in NOT_DECODING or rel == "decoding/step.py":
            continue
        callers += [f"{rel}:{n.lineno}" for n in ast.walk(ast.parse(path.read_text())) if _calls_a_model(n)]
    assert not callers, callers
    step = ast.parse((PACKAGE / "decoding" / "step.py").read_text())
    assert sum(map(_calls_a_model, ast.walk(step))) >= 1        # the detector sees the step module's calls


def test_no_file_assigns_or_deletes_a_forward():
    """No file in src/msn assigns to (or deletes, or ``setattr``s) any object's ``forward``:
    kernels and hooks go through the libraries' own mechanisms."""
    bad = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, (ast.Assign, ast.Delete)):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            bad += [f"{path.name}:{node.lineno}" for t in targets if isinstance(t, ast.Attribute) and t.attr == "forward"]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr") \
                    and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and node.args[1].value == "forward":
                bad.append(f"{path.name}:{node.lineno}")
    assert not bad, bad


def test_nothing_waits_for_the_interpreters_exit():
    """State is written as it is made (renamed in whole), never by an exit handler, which a
    crash or a kill would skip."""
    users = [p.name for p in PACKAGE.rglob("*.py") if "atexit" in p.read_text()]
    assert not users, users
