"""Decoding options: the one source of their defaults."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields

from msn.decoding.checks import check_seed, is_int
from msn.errors import MsnError

DEFAULT_MAX_NEW_TOKENS = 128  # msn.generate, msn generate and msn bench
# Upper bounds of the draft sizes: a step feeds at most a few hundred inputs (the reference tree
# has 69), so larger values are mistakes that would only exhaust memory.
SIZE_LIMITS = {"window": 256, "retrieve_len": 256, "retrieve_ngram": 64, "pld_tokens": 256, "pld_ngram": 64,
               "lookahead_window": 64, "lookahead_ngram": 16, "lookahead_guesses": 64}


def exactness_contract(dtype: str, sampling: bool) -> str:
    """What a user may rely on, in one line, for a dtype ("float32", "bfloat16", ...)."""
    if sampling:
        return "distributed exactly as one-token sampling with the same processing"
    if dtype == "float32":
        return "identical to greedy autoregressive decoding (ar), token for token"
    return (f"may differ from ar in {dtype} at floating-point near-ties (a tree step computes the same "
            "logits in another order); measured on SmolLM2-135M on CPU in bfloat16: 0-17 % of Spec-Bench "
            "outputs identical to ar's; use float32 for identical outputs")
METHODS = ("ar", "jacobi", "tr-jacobi", "pld", "lookahead", "recycle")
DRAFT_CHOICES = ("merged", "paper")
# Names of tree.TREE_PRESETS (kept here so the CLI parser needs no torch import).
TREE_CHOICES = ("auto", "reference", "medium", "small", "chain")
GRAPH_CHOICES = ("auto", "on", "off")
COMPILE_CHOICES = ("auto", "on", "off")
KERNEL_CHOICES = ("auto", "off")
# The CLI convenience for the CPU kernel switches: read here and nowhere else, as the
# defaults of DecodeConfig.cpu_kernels / cpu_prepack, so the resolved config shows them.
KERNEL_ENV = {"cpu_kernels": "MSN_CPU_GEMM", "cpu_prepack": "MSN_CPU_PACK"}


def _kernel_default(name: str):
    return lambda: "off" if os.environ.get(KERNEL_ENV[name], "1") == "0" else "auto"


@dataclass
class DecodeConfig:
    """Options of ``msn.generate``; each method reads only its own.

    Attributes:
        method: ``ar`` (greedy, one token per step: the oracle), ``jacobi``,
            ``tr-jacobi``, ``pld`` (prompt lookup), ``lookahead`` or ``recycle`` (Token
            Recycling: the anchor's static 80-node tree over the model's recycled candidate
            table, ``msn.decoding.recycle``).
        window: Jacobi window (drafts per step) for ``jacobi``.
        tree: TR-Jacobi tree. ``auto`` (default) chooses by measurement: the step latency
            t(n) measured once per model, device and dtype (cached on disk), and how often
            each node of the reference tree would have been accepted, scored against the
            output as it is produced; it re-chooses every 16 steps, from the root alone (a
            plain one-token step) up to the whole reference tree plus the retrieval chain.
            ``reference`` is the paper's tree (the 63 top-10 nodes of the authors' code plus
            the retrieval chain, 69 inputs); ``medium``, ``small`` and ``chain`` are fixed
            smaller trees. A list of paths over top-K ranks (e.g. ``[(0,), (1,), (0, 0)]``)
            gives a custom tree.
        drafts: where TR-Jacobi's nodes take their tokens. ``merged`` (default): the Jacobi
            trajectory, the retrieval chain and the model's recycled candidate table (a
            subtree of its own), nodes of both trees ranked together by measured acceptance;
            a preset tree name then fixes the size (its input count) and the measurement
            picks the nodes. ``paper``: the paper's sources exactly (trajectory top-K and the
            retrieval chain; presets are the paper's fixed trees). A list of paths and
            ``retrieve=False`` always use the paper's sources.
        retrieve_len: length of TR-Jacobi's retrieval chain. Every draft size has an upper
            bound (``SIZE_LIMITS``, 256 drafts at most).
        retrieve_ngram: n-gram size matched for retrieval (falls back to shorter ones).
        retrieve: False fills TR-Jacobi's retrieval chain with noise instead of a retrieved
            continuation (an ablation: what the tree alone accepts); fixed trees only.
        pld_tokens: tokens proposed by prompt lookup (``prompt_lookup_num_tokens``).
        pld_ngram: largest n-gram matched by prompt lookup (``max_matching_ngram_size``).
        lookahead_window / lookahead_ngram / lookahead_guesses: Lookahead's W, N, G.
        seed: seed of the noise drawn for empty draft slots (greedy outputs never depend
            on it) and, when sampling without an explicit generator, of the sampling draws.
        do_sample: sample instead of decoding greedily. Every method then returns tokens
            distributed exactly as one-token sampling with the same processing.
        temperature / top_k / top_p: transformers' logits processing, in transformers'
            order (temperature, top-k, top-p); only with ``do_sample``. A temperature
            below ``MIN_TEMPERATURE`` (1e-5, as vLLM) is greedy: there the scaled logits
            overflow float32, and the distribution is the argmax's anyway. No top-k filter unless given (transformers' ``generate`` uses 50).
        sample_drafts: with ``do_sample``, build drafts from the processed distribution
            (Jacobi drafts are the step's draws, top-K rows are drawn without replacement)
            instead of the raw logits' argmax and top-K. Outputs are exact either way.
        graphs: fixed-shape steps on preallocated KV buffers, each tree's step captured
            once as a CUDA graph and replayed (``msn.decoding.static_steps``). ``auto`` (default):
            on CUDA for greedy decoding, eager elsewhere; ``on``: the same, and an error
            where it cannot apply; ``off``: always eager. Outputs are identical either way.
        compile: the fixed-shape step (forward, verification, compaction) compiled by
            ``torch.compile`` with static shapes, one compilation per tree and buffer size,
            then captured as a CUDA graph where ``graphs`` applies. ``auto`` (default):
            compiled on CUDA, not elsewhere; ``on``: compiled on every device (on CPU, the
            step then runs on fixed buffers too, inductor's C++ kernels); ``off``: eager.
            Greedy decoding only. A request's first step of each shape pays the compilation
            (``DecodeResult.info["step"]["compile_s"]``); a step that fails to compile runs
            eagerly from then on.
        cpu_kernels: float32 CPU steps compute their linear layers with the kernels of
            ``msn.decoding.cpu`` (a few rows as (W @ x^T)^T or with prepacked weights, one row
            as two where timing says so): ``auto`` (default) or ``off`` (``F.linear``
            throughout). The logits differ by float rounding only; greedy outputs are
            identical either way. Default ``off`` when the environment has ``MSN_CPU_GEMM=0``.
        cpu_prepack: several-row products read weights reordered once into oneDNN's layout
            where this torch has the ops and a second copy fits: ``auto`` (default) or ``off``.
            Default ``off`` when the environment has ``MSN_CPU_PACK=0``.
    """

    method: str = "tr-jacobi"
    window: int = 5
    tree: str | list = "auto"
    drafts: str = "merged"
    retrieve_len: int = 5
    retrieve_ngram: int = 3
    retrieve: bool = True
    pld_tokens: int = 10
    pld_ngram: int = 2
    lookahead_window: int = 5
    lookahead_ngram: int = 3
    lookahead_guesses: int = 5
    seed: int = 0
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    sample_drafts: bool = False
    graphs: str = "auto"
    compile: str = "auto"
    cpu_kernels: str = field(default_factory=_kernel_default("cpu_kernels"))
    cpu_prepack: str = field(default_factory=_kernel_default("cpu_prepack"))

    def __post_init__(self):
        if self.method not in METHODS:
            raise MsnError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name in (*SIZE_LIMITS, "seed"):
            value = getattr(self, name)
            if not is_int(value):
                raise MsnError(f"{name} must be an integer, got {value!r}")
        for name in ("window", "retrieve_len", "retrieve_ngram", "pld_tokens", "pld_ngram",
                     "lookahead_window", "lookahead_guesses"):
            if getattr(self, name) <= 0:
                raise MsnError(f"{name} must be positive, got {getattr(self, name)}")
        for name, most in SIZE_LIMITS.items():
            if getattr(self, name) > most:
                raise MsnError(f"{name} must be at most {most}, got {getattr(self, name)}")
        check_seed(self.seed)
        if isinstance(self.tree, str):
            if self.tree not in TREE_CHOICES:
                raise MsnError(f"unknown tree preset {self.tree!r}; choose one of {', '.join(TREE_CHOICES)}")
        else:
            from msn.decoding.tree import validate_paths

            if not self.tree:
                raise MsnError("malformed tree: it has no node; give at least one path, e.g. [(0,)]")
            self.tree = [tuple(p) for p in validate_paths(self.tree)]
        if self.drafts not in DRAFT_CHOICES:
            raise MsnError(f"unknown drafts {self.drafts!r}; choose one of {', '.join(DRAFT_CHOICES)}")
        if not isinstance(self.retrieve, bool):
            raise MsnError(f"retrieve must be True or False, got {self.retrieve!r}")
        if not self.retrieve and self.method == "tr-jacobi" and self.tree == "auto":
            raise MsnError("retrieve=False needs a fixed tree (e.g. tree='reference'); tree='auto' chooses "
                           "whether to use the retrieval chain by itself")
        if self.lookahead_ngram < 2:
            raise MsnError(f"lookahead_ngram must be at least 2, got {self.lookahead_ngram}")
        if not isinstance(self.do_sample, bool):
            raise MsnError(f"do_sample must be True or False, got {self.do_sample!r}")
        given = [n for n in ("temperature", "top_k", "top_p") if getattr(self, n) is not None]
        if self.sample_drafts:
            given.append("sample_drafts")
        if given and not self.do_sample:
            raise MsnError(f"{', '.join(given)} need do_sample=True (--temperature/--top-k/--top-p turn it on "
                           "in the CLI)")
        if self.do_sample:
            self.sampling_params()
        for name, choices in (("graphs", GRAPH_CHOICES), ("compile", COMPILE_CHOICES)):
            value = getattr(self, name)
            if value not in choices:
                raise MsnError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
            if value == "on" and self.do_sample and self.sampling_params() is not None:
                raise MsnError(f"{name}='on' applies to greedy decoding; sampling runs eagerly (use {name}='auto')")
        for name in KERNEL_ENV:
            if getattr(self, name) not in KERNEL_CHOICES:
                raise MsnError(f"{name} must be one of {', '.join(KERNEL_CHOICES)}, got {getattr(self, name)!r}")

    def sampling_params(self):
        """The validated ``SamplingParams``, or None when decoding is greedy (no sampling,
        or temperature 0)."""
        from msn.decoding.sampling import SamplingParams

        if not self.do_sample:
            return None
        params = SamplingParams(temperature=1.0 if self.temperature is None else self.temperature,
                                top_k=self.top_k, top_p=self.top_p).validate()
        return None if params.greedy else params

    @classmethod
    def from_options(cls, method: str, options: dict) -> "DecodeConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise MsnError(f"unknown decoding option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(method=method, **options)

    def to_dict(self) -> dict:
        return asdict(self)
