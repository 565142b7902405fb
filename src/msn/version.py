"""msn's version, read from the installed distribution (pyproject.toml is the one place that sets it)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("msn-llm")
except PackageNotFoundError:  # a source tree on sys.path without an installed distribution
    __version__ = "0+unknown"
