"""Sampling: logits processing and the draws that verification follows. Pure tensor code.

Processing is transformers' own warpers in transformers' order: temperature, then top-k,
then top-p (``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``).

Exactness. At every input of a step, one token is drawn from that input's processed
distribution with one random stream. Verification then follows the draws: from the root,
descend into the child whose token equals the parent's draw; the draw at the last node
reached is the step's bonus token. Each emitted token is therefore a draw from the
model's processed distribution given the tokens before it, whatever the drafts were,
so the output is distributed exactly as one-token sampling. It is the per-node
accept/reject rule "accept child c with probability p'(c), else zero it, renormalise and
try the next child" in the form of its equivalent: draw y ~ p and follow the child equal
to y. Siblings holding the same token are one candidate: only the first counts, otherwise
choosing among them by their subtrees would bias the draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from msn.errors import MsnError


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; ``temperature == 0`` is greedy.

    Attributes:
        temperature: > 0 samples, 0 decodes greedily.
        top_k: keep the k most likely tokens (None: no top-k filter; note that
            transformers' ``generate`` applies top_k=50 when none is given).
        top_p: keep the smallest set of tokens whose probability reaches top_p (None or 1: off).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> "SamplingParams":
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise MsnError(f"temperature must be a number >= 0 (0 decodes greedily), got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise MsnError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                                       or not 0 < self.top_p <= 1):
            raise MsnError(f"top_p must be in (0, 1], got {self.top_p!r}")
        return self


class Sampler:
    """Processes logits and draws one token per row from one random stream."""

    def __init__(self, params: SamplingParams, generator: torch.Generator):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.params = params
        self.generator = generator
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

    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, V) logits -> (N,) long, one independent draw per row."""
        return torch.multinomial(self.probs(logits), 1, generator=self.generator).view(-1)

    def draw_distinct(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        """(N, V) logits -> (N, k) long: k distinct tokens per row drawn without replacement
        (Gumbel top-k over the processed distribution), for drafting."""
        p = self.probs(logits)
        u = torch.rand(p.shape, generator=self.generator, device=p.device).clamp_min(1e-20)
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
