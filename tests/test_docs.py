"""The documentation: the site builds with ``mkdocs build --strict``, its CLI reference lists every
command and flag ``--help`` prints, the README stays short with every figure linked to the
results page that measured it, and the README's quick start runs as written."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
README = (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "-d", str(out)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _help(*command) -> str:
    done = subprocess.run([str(BIN / "msn"), *command, "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _subcommands(help_text: str) -> list[str]:
    """The subcommands an argparse help lists under its positional COMMAND (or DATASET) entry:
    the names indented by four spaces."""
    section = help_text.split("positional arguments:", 1)[1].split("\noptions:", 1)[0] \
        if "positional arguments:" in help_text else ""
    return re.findall(r"^    ([a-z][a-z0-9-]*)(?:\s|$)", section, re.M)


def test_the_site_builds_strict_and_the_cli_reference_matches_help(site):
    page = (site / "reference" / "cli" / "index.html").read_text()
    text = re.sub(r"<[^>]+>", "", page).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    pending, seen = [()], 0
    while pending:
        command = pending.pop()
        help_text = _help(*command)
        assert f"msn {' '.join(command)}".strip() in text, command
        flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text)) - {"--help"}
        missing = sorted(f for f in flags if f not in text)
        assert not missing, (command, missing)
        seen += len(flags)
        pending += [(*command, sub) for sub in _subcommands(help_text)]
    assert seen > 100
    api = (site / "reference" / "api" / "index.html").read_text()
    assert "TrainConfig" in api and "MsnCollator" in api and "DecodeConfig" in api


def test_readme_is_short_and_every_figure_links_its_results_page():
    lines = README.splitlines()
    assert len(lines) <= 250
    fence = False
    for line in lines:
        if line.startswith("```"):
            fence = not fence
            continue
        if fence:
            continue
        if re.search(r"\d(\.\d+)?x\b|\d %", line):
            links = re.findall(r"\]\((docs/results/[^)#]+)", line)
            assert links, f"a figure without its results page: {line}"
    for target in re.findall(r"\]\(([^)#]+)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


def _quick_start() -> tuple[str, str]:
    """The README's quick start: its bash blocks joined, and its Python block."""
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(bash|python)\n(.*?)```", section, re.S)
    return "\n".join(b for kind, b in blocks if kind == "bash"), "\n".join(b for kind, b in blocks if kind == "python")


def _quick_start_commands(bash: str) -> list[list[str]]:
    """Every msn command of the quick start's bash, as argument lists (comments, a trailing
    ``&`` and pipes cut off; ``$(msn ...)`` taken from inside)."""
    import shlex

    commands = []
    for line in bash.splitlines():
        inner = re.search(r"\$\((msn [^)]*)\)", line)
        text = inner.group(1) if inner else line
        words = shlex.split(text, comments=True)
        for stop in ("|", "&"):
            words = words[: words.index(stop)] if stop in words else words
        if words and words[0] == "msn":
            commands.append(words[1:])
    return commands


def test_the_quick_start_commands_parse_and_its_python_compiles():
    """Default-suite guard on the quick start (the run itself is -m slow, a minute on 2 cores):
    every msn command in it is accepted by the CLI's parser as written, and its Python block
    compiles and calls what msn exports."""
    import msn
    from msn.cli import build_parser

    bash, python = _quick_start()
    commands = _quick_start_commands(bash)
    assert {c[0] for c in commands} >= {"fetch", "generate", "data", "train", "serve", "bench"}
    parser = build_parser()
    for args in commands:
        try:
            parser.parse_args(args)
        except SystemExit as e:
            raise AssertionError(f"README quick start: msn {' '.join(args)} is refused by the CLI") from e
    compile(python, "README.md quick start", "exec")
    assert all(hasattr(msn, name) for name in re.findall(r"\bmsn\.(\w+)\(", python))


@pytest.mark.slow
def test_the_quick_start_runs_as_written(tmp_path):
    """Every command of the quick start, in order, on a tiny model instead of SmolLM2 (the one
    substitution: the line that fetches SmolLM2 sets MODEL to a tiny checkpoint, with SmolLM2's
    8,192 positions so Spec-Bench's longest prompts fit) and on a free port instead of 8000."""
    from test_train import free_port
    from tiny import tiny_checkpoint

    bash, python = _quick_start()
    model = tiny_checkpoint(tmp_path / "tiny")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    fetch = "export MODEL=$(msn fetch smollm2-135m-instruct | tail -n 1)"
    assert fetch in bash and "msn train" in bash and "msn serve" in bash and "msn bench" in bash
    port = str(free_port())
    script = bash.replace(fetch, f"export MODEL={model}").replace("8000", port)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    # The server started in the background is stopped when the script ends, however it ends.
    script = "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n" + script
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert (work / "runs" / "msn" / "msn_config.json").exists()
    assert (work / "runs" / "bench" / "summary.json").exists()
    assert '"choices"' in out                          # the server answered the curl request
    done = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, cwd=work,
                          env={**env, "MODEL": str(model)})
    assert done.returncode == 0, done.stderr[-3000:]
