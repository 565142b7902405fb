"""msn: Make Some Noise fine-tuning and TR-Jacobi decoding for Hugging Face causal LMs.

``msn.generate`` and friends are imported on first use, so light commands (``msn fetch``
of a cached model) start without loading torch.
"""

from importlib.metadata import PackageNotFoundError, version

from msn.errors import MsnError

try:
    __version__ = version("msn-llm")   # pyproject.toml is the one place that sets it
except PackageNotFoundError:  # a source tree on sys.path without an installed distribution
    __version__ = "0+unknown"
__all__ = ["METHODS", "DecodeConfig", "DecodeResult", "MsnError", "generate", "__version__"]


def __getattr__(name):
    if name in ("METHODS", "DecodeConfig", "DecodeResult", "generate"):
        from msn import decoding

        return getattr(decoding, name)
    raise AttributeError(f"module 'msn' has no attribute {name!r}")
