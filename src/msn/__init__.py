"""msn: Make Some Noise fine-tuning and TR-Jacobi decoding for Hugging Face causal LMs.

``msn.generate`` and friends are imported on first use, so light commands (``msn fetch``
of a cached model) start without loading torch.
"""

from msn.errors import MsnError
from msn.version import __version__
__all__ = ["METHODS", "DecodeConfig", "DecodeResult", "MsnError", "generate", "__version__"]


def __getattr__(name):
    if name in ("METHODS", "DecodeConfig", "DecodeResult", "generate"):
        from msn import decoding

        return getattr(decoding, name)
    raise AttributeError(f"module 'msn' has no attribute {name!r}")
