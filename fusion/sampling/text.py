"""Token sampling shared by both families: temperature, top-k, top-p, allowed-token masks.

Shape legend: B = streams, V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenSampling:
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @classmethod
    def from_config(cls, cfg) -> TokenSampling:
        """From any config with ``temperature``, ``top_k`` and ``top_p`` fields
        (fusion.config.SamplingConfig, fusion.eval.model.ModelEvalConfig). Every family's
        ``generate_images`` and ``edit`` take the result as ``sampling``; only Chameleon, whose
        images are tokens, uses it there."""
        return cls(cfg.temperature, cfg.top_k, cfg.top_p)


def sample_token(logits: torch.Tensor, sampling: TokenSampling,
                 allowed: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,).

    ``allowed`` (V,) or (B, V) bool restricts the choice (e.g. only image codes inside a
    Chameleon image): disallowed logits are set to -inf before any other filtering, so they can
    never be drawn, whatever the temperature.
    """
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        # Nucleus sampling (Holtzman et al. 2020): keep the smallest set of tokens whose
        # probability mass reaches top_p; the most likely token is always kept.
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
