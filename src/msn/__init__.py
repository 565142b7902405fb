"""msn: Make Some Noise fine-tuning and TR-Jacobi decoding for Hugging Face causal LMs."""

from msn.decoding import METHODS, DecodeConfig, DecodeResult, generate
from msn.errors import MsnError

__version__ = "0.1.0"
__all__ = ["METHODS", "DecodeConfig", "DecodeResult", "MsnError", "generate", "__version__"]
