"""Decoding: tree specs and masks (tree), verification (verify), cache handling (cache),
token history and retrieval (history), drafting strategies (proposers) and the model
loop (engine). Options and their defaults live in config."""

from msn.decoding.config import METHODS, DecodeConfig

__all__ = ["METHODS", "DecodeConfig", "DecodeResult", "generate"]


def __getattr__(name):
    if name in ("DecodeResult", "generate"):
        from msn.decoding import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'msn.decoding' has no attribute {name!r}")
