"""Sampling: logits processing and the draws that verification follows. Pure tensor code.

Processing is transformers' own warpers in transformers' order: temperature, then top-k,
then top-p (``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``).

Exactness. The token at output position j is drawn by inverse CDF with a uniform u_j,
one per position, taken in order from one seeded stream. In a tree step every input
draws its token for the position it predicts, with that position's u_j; verification
then follows the draws: from the root, descend into the child whose token equals the
parent's draw, and the draw at the last node reached is the step's bonus token. The token
emitted at position j is therefore F^-1(p(true prefix), u_j), where the true prefix
depends only on u_1..u_{j-1}: the output is distributed exactly as one-token sampling,
whatever the drafts. It is the per-node rule "accept child c with probability p'(c),
else zero it, renormalise and try the next child" in the form of its equivalent: draw y ~ p
and follow the child equal to y. Siblings holding the same token are one candidate: only
the first counts.

Because u_j belongs to the position, not to a node or a step, a seed usually gives the
same tokens for every method and every tree. Not always: floating-point differences
between a tree step's logits and a one-token step's shift the CDF slightly, and where u_j
falls among many tokens of tiny probability that moves the draw (on a 49k vocabulary at
temperature 1, about one output in three of 128 tokens differed somewhere). A Gumbel-max
draw with a per-position noise vector would make such flips as rare as greedy near-ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from msn.decoding.checks import is_int, is_number
from msn.errors import MsnError


# Below this temperature sampling is greedy (vLLM's threshold too): logits / T overflows
# float32 for T ~ 1e-38, and long before that the processed distribution is one-hot.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; a temperature below ``MIN_TEMPERATURE`` (1e-5) is greedy.

    Attributes:
        temperature: >= 1e-5 samples; 0 (or anything below 1e-5) decodes greedily.
        top_k: keep the k most likely tokens (None: no top-k filter; note that
            transformers' ``generate`` applies top_k=50 when none is given).
        top_p: keep the smallest set of tokens whose probability reaches top_p (None or 1: off).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def validate(self) -> "SamplingParams":
        if not is_number(self.temperature) or self.temperature < 0:
            raise MsnError(f"temperature must be a number >= 0 (0 decodes greedily), got {self.temperature!r}")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise MsnError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and (not is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise MsnError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.temperature > 1e6:
            raise MsnError(f"temperature must be at most 1e6, got {self.temperature!r}")
        return self


class Sampler:
    """Processes logits and draws tokens with one uniform per output position."""

    BLOCK = 256

    def __init__(self, params: SamplingParams, generator: torch.Generator):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.params = params
        self.generator = generator
        self.uniforms = torch.empty(0, dtype=torch.float64, device=generator.device)
        # Draft randomness (sample_drafts) has its own stream, so drafts never shift the draws.
        self.draft_generator = torch.Generator(device=generator.device).manual_seed(
            int(torch.randint(1 << 62, (1,), generator=generator, device=generator.device)))
        self.warpers = []
        if params.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(float(params.temperature)))
        if params.top_k is not None:
            self.warpers.append(TopKLogitsWarper(top_k=params.top_k))
        if params.top_p is not None and params.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=float(params.top_p)))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, V) logits -> (N, V) float32 probabilities after processing."""
        scores = logits.float()
        for warp in self.warpers:
            scores = warp(None, scores)
        return torch.softmax(scores, dim=-1)

    def _uniforms(self, upto: int) -> torch.Tensor:
        """u_0 .. u_{upto - 1}, drawn from the stream in order, block by block."""
        while self.uniforms.numel() < upto:
            block = torch.rand(self.BLOCK, dtype=torch.float64, generator=self.generator,
                               device=self.generator.device)
            self.uniforms = torch.cat([self.uniforms, block])
        return self.uniforms

    def draw(self, logits: torch.Tensor, positions: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """(N, V) logits and (N,) output positions -> (N,) long: row i's token by inverse CDF
        with the uniform of output position ``positions[i]``. ``upto`` (> every position)
        spares a device sync when the caller knows it."""
        upto = int(positions.max()) + 1 if upto is None else upto
        u = self._uniforms(upto)[positions.to(self.uniforms.device)].to(logits.device)
        cdf = self.probs(logits).double().cumsum(dim=-1)
        target = (u * cdf[:, -1]).unsqueeze(-1)
        return torch.searchsorted(cdf, target, right=True).view(-1).clamp_max(logits.shape[-1] - 1)

    def draw_distinct(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        """(N, V) logits -> (N, k) long: k distinct tokens per row drawn without replacement
        (Gumbel top-k over the processed distribution), for drafting."""
        p = self.probs(logits)
        u = torch.rand(p.shape, generator=self.draft_generator, device=p.device).clamp_min(1e-20)
        keys = torch.log(p) - torch.log(-torch.log(u))
        return torch.topk(keys, k, dim=-1).indices


def check_generator(generator, device: torch.device) -> None:
    """A generator must be a ``torch.Generator`` on the model's device type."""
    if not isinstance(generator, torch.Generator):
        raise MsnError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != torch.device(device).type:
        raise MsnError(f"generator is on {generator.device} but the model is on {device}; create it with "
                       f"torch.Generator(device={str(device)!r})")


def first_siblings(parents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(n + 1,) bool: False for a node that has an earlier sibling holding the same token.

    Args:
        parents: (n + 1,) long, input index of each input's parent (-1 for the root).
        tokens: (n + 1,) long, the input tokens.
    """
    n = parents.numel()
    same = (parents[:, None] == parents[None, :]) & (tokens[:, None] == tokens[None, :])
    earlier = torch.ones(n, n, dtype=torch.bool, device=parents.device).tril(-1)
    return ~(same & earlier).any(dim=1)
