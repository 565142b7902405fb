"""Decoding options: the one source of their defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from msn.errors import MsnError

DEFAULT_MAX_NEW_TOKENS = 128  # msn.generate, msn generate and msn bench
METHODS = ("ar", "jacobi", "tr-jacobi", "pld", "lookahead")
# Names of tree.TREE_PRESETS (kept here so the CLI parser needs no torch import).
TREE_CHOICES = ("auto", "reference", "medium", "small", "chain")


@dataclass
class DecodeConfig:
    """Options of ``msn.generate``; each method reads only its own.

    Attributes:
        method: ``ar`` (greedy, one token per step: the oracle), ``jacobi``,
            ``tr-jacobi``, ``pld`` (prompt lookup) or ``lookahead``.
        window: Jacobi window (drafts per step) for ``jacobi``.
        tree: TR-Jacobi top-K tree preset: ``reference`` (the paper's 63 top-10 nodes,
            69 inputs per step with the retrieval chain; for GPUs), ``medium``,
            ``small`` or ``chain``; ``auto`` picks ``reference`` on CUDA and ``small``
            elsewhere, because a tree step's cost grows with its size on a CPU. A list
            of paths over top-K ranks (e.g. ``[(0,), (1,), (0, 0)]``) gives a custom tree.
        retrieve_len: length of TR-Jacobi's retrieval chain.
        retrieve_ngram: n-gram size matched for retrieval (falls back to shorter ones).
        pld_tokens: tokens proposed by prompt lookup (``prompt_lookup_num_tokens``).
        pld_ngram: largest n-gram matched by prompt lookup (``max_matching_ngram_size``).
        lookahead_window / lookahead_ngram / lookahead_guesses: Lookahead's W, N, G.
        seed: seed of the noise drawn for empty draft slots (outputs never depend on it).
    """

    method: str = "tr-jacobi"
    window: int = 5
    tree: str | list = "auto"
    retrieve_len: int = 5
    retrieve_ngram: int = 3
    pld_tokens: int = 10
    pld_ngram: int = 2
    lookahead_window: int = 5
    lookahead_ngram: int = 3
    lookahead_guesses: int = 5
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise MsnError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name in ("window", "retrieve_len", "retrieve_ngram", "pld_tokens", "pld_ngram",
                     "lookahead_window", "lookahead_ngram", "lookahead_guesses", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise MsnError(f"{name} must be an integer, got {value!r}")
        for name in ("window", "retrieve_len", "retrieve_ngram", "pld_tokens", "pld_ngram",
                     "lookahead_window", "lookahead_guesses"):
            if getattr(self, name) <= 0:
                raise MsnError(f"{name} must be positive, got {getattr(self, name)}")
        if isinstance(self.tree, str):
            if self.tree not in TREE_CHOICES:
                raise MsnError(f"unknown tree preset {self.tree!r}; choose one of {', '.join(TREE_CHOICES)}")
        else:
            from msn.decoding.tree import validate_paths

            if not self.tree:
                raise MsnError("malformed tree: it has no node; give at least one path, e.g. [(0,)]")
            self.tree = [tuple(p) for p in validate_paths(self.tree)]
        if self.lookahead_ngram < 2:
            raise MsnError(f"lookahead_ngram must be at least 2, got {self.lookahead_ngram}")

    @classmethod
    def from_options(cls, method: str, options: dict) -> "DecodeConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise MsnError(f"unknown decoding option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(method=method, **options)

    def to_dict(self) -> dict:
        return asdict(self)
