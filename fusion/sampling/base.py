"""Decoding machinery shared by both families' samplers.

B streams (prompts; with classifier-free guidance, conditional and unconditional ones) are
left-padded to a common length and decoded together with one KV cache. Padding has document
id -1, so it never influences real positions, and RoPE positions count real tokens only, so a
padded stream computes exactly what it would alone. ``use_cache=False`` recomputes the whole
sequence at every step: the reference for tests and the cached-vs-uncached benchmark.

A family's model needs ``embed`` (ids (B, n) -> (B, n, D)), ``transformer`` and ``lm_head``.

Shape legend: B = streams, n = new positions, D = d_model, V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fusion.models.attention import AttentionLayout
from fusion.sampling.text import TokenSampling, sample_token


@dataclass
class Streams:
    """Decoding state of B aligned streams: cache, padding and lengths."""

    cache: object
    pad: torch.Tensor  # (B,) left padding per stream
    length: int  # committed positions (same for every stream, padding included)
    images_so_far: int = 0
    history: list = field(default_factory=list)  # uncached mode: (embeddings, layout) chunks


class StreamSampler:
    """Start streams from prompts, append positions, decode text. Subclassed per family."""

    def __init__(self, model, special, use_cache: bool = True):
        self.model = model.eval()
        self.special = special
        self.use_cache = use_cache
        self.device = model.embed.weight.device

    def _start(self, prompts: list[list[int]]) -> tuple[Streams, torch.Tensor]:
        """Left-pad prompts, run them, return the state and last-position logits (B, V)."""
        longest = max(len(p) for p in prompts)
        pad = torch.tensor([longest - len(p) for p in prompts], device=self.device)
        ids = torch.full((len(prompts), longest), self.special.pad, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(p, device=self.device)
        cache = self.model.transformer.new_cache() if self.use_cache else None
        state = Streams(cache, pad, 0)
        h = self._run(state, self.model.embed(ids), image=False, commit=True)
        return state, self.model.lm_head(h[:, -1])

    def _layout(self, state: Streams, n: int, image: bool) -> AttentionLayout:
        """Layout of n new positions appended to every stream (``image``: one image block,
        bidirectional inside)."""
        B = len(state.pad)
        idx = torch.arange(state.length, state.length + n, device=self.device)
        real = idx.unsqueeze(0) >= state.pad.unsqueeze(1)  # (B, n): False on left padding
        doc = torch.where(real, 0, -1)
        img = torch.full((B, n), state.images_so_far if image else -1, device=self.device)
        img = torch.where(real, img, -1)
        pos = (idx.unsqueeze(0) - state.pad.unsqueeze(1)).clamp(min=0)
        return AttentionLayout(doc, img, positions=pos)

    def _run(self, state: Streams, x: torch.Tensor, image: bool, commit: bool) -> torch.Tensor:
        """New positions' embeddings (B, n, D) -> hidden (B, n, D); commit appends them."""
        layout = self._layout(state, x.shape[1], image)
        tf = self.model.transformer
        if self.use_cache:
            h = tf(x, layout, cache=state.cache, commit=commit)
        else:
            xs = torch.cat([c[0] for c in state.history] + [x], 1)
            lay = [c[1] for c in state.history] + [layout]
            full = AttentionLayout(torch.cat([lt.doc_ids for lt in lay], 1),
                                   torch.cat([lt.image_ids for lt in lay], 1),
                                   positions=torch.cat([lt.positions for lt in lay], 1))
            h = tf(xs, full)[:, -x.shape[1]:]
            if commit:
                state.history.append((x, layout))
        if commit:
            state.length += x.shape[1]
        return h

    def _append_tokens(self, state: Streams, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, n) -> logits at the last new position (B, V)."""
        h = self._run(state, self.model.embed(tokens), image=False, commit=True)
        return self.model.lm_head(h[:, -1])

    def _text_allowed(self, vocab: int) -> torch.Tensor:
        """Tokens a text continuation may contain: not <pad>, <boi>, <eoi> (subclasses also
        remove image codes)."""
        allowed = torch.ones(vocab, dtype=torch.bool, device=self.device)
        allowed[[self.special.boi, self.special.eoi, self.special.pad]] = False
        return allowed

    def _decode(self, state: Streams, logits: torch.Tensor, max_new_tokens: int,
                sampling: TokenSampling | None, seed: int) -> list[list[int]]:
        """Decode text until <eos> (not included) or ``max_new_tokens``."""
        sampling = sampling or TokenSampling(temperature=0.0)
        g = torch.Generator(device=self.device).manual_seed(seed)
        B = logits.shape[0]
        out: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        allowed = self._text_allowed(logits.shape[-1])
        for _ in range(max_new_tokens):
            tok = sample_token(logits, sampling, allowed, g)
            for i in range(B):
                if not done[i] and tok[i].item() != self.special.eos:
                    out[i].append(int(tok[i]))
            done |= tok == self.special.eos
            if bool(done.all()):
                break
            logits = self._append_tokens(state, tok.unsqueeze(1))
        return out

    @torch.no_grad()
    def generate_text(self, prompts: list[list[int]], max_new_tokens: int = 24,
                      sampling: TokenSampling | None = None, seed: int = 0) -> list[list[int]]:
        """Text continuation of each prompt (text -> text)."""
        state, logits = self._start([[self.special.bos, *p] for p in prompts])
        return self._decode(state, logits, max_new_tokens, sampling, seed)
