"""Decoding: tree specs and masks (tree), verification (verify), cache handling (cache),
drafting strategies (proposers) and the model loop (engine)."""

from msn.decoding.config import METHODS, DecodeConfig
from msn.decoding.engine import DecodeResult, generate

__all__ = ["METHODS", "DecodeConfig", "DecodeResult", "generate"]
