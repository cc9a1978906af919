"""Sampling from a Chameleon model: everything is next-token decoding with the KV cache.

Text -> image: after ``<bos> prompt <boi>``, exactly h·w tokens are drawn with the logits
restricted to the image-code range (a text token can never appear inside an image), then
``<eoi>`` is forced. Classifier-free guidance runs the conditional and the unconditional
(``<bos> <boi>``, what caption dropout trained) streams in one batch and mixes their
log-probabilities: log p_u + s · (log p_c - log p_u) (Gafni et al. 2022, Make-A-Scene; used by
Chameleon). Image -> text decodes after ``<bos> <boi> codes <eoi>`` with image codes excluded.

Editing (docs/editing.md) prompts with the source's codes, ``<bos> <boi> source codes <eoi>
instruction <boi>``, and draws the target's codes with InstructPix2Pix's two-scale guidance
(arXiv:2211.09800, eq. 3) on log-probabilities: streams [source + instruction; source;
neither]. A model with ``source_alignment`` also receives, at each target position, the
source code of the cell it predicts (the streams that hold the source).

Shape legend: B = prompts, h/w = code grid, V = vocabulary.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from fusion.errors import UserError
from fusion.models.chameleon import Chameleon, image_cells, source_alignment
from fusion.models.packing import SpecialIds
from fusion.sampling.base import StreamSampler, combine_guidance, fit_prompts
from fusion.sampling.text import TokenSampling, sample_token


def no_guidance_interval(interval) -> None:
    if interval is not None:
        raise UserError(f"guidance_interval={list(interval)} is a diffusion setting: Transfusion "
                        "models only; leave it unset (null) for a Chameleon model")


class ChameleonSampler(StreamSampler):
    def __init__(self, model: Chameleon, special: SpecialIds, code_grid: tuple[int, int],
                 decode_images=None, encode_images=None, use_cache: bool = True,
                 image_sampling: TokenSampling | None = None):
        super().__init__(model, special, use_cache, decode_images, encode_images)
        self.code_grid = code_grid
        self.image_sampling = image_sampling or TokenSampling(temperature=1.0)
        # (streams,) aligned source code of the position whose logits come next (-1: none),
        # for a source_copy model's output; set by _image only while it draws an edit
        self._copy_source: torch.Tensor | None = None

    @property
    def image_length(self) -> int:
        h, w = self.code_grid
        return h * w

    def _reserved(self, task: str, max_new_tokens: int) -> tuple[int, str]:
        h, w = self.code_grid
        n = h * w
        if task == "text_to_image":  # <bos> prompt <boi> codes <eoi>
            return n + 3, f"<bos>, <boi>, the {n} image codes and <eoi>"
        if task == "image_to_text":  # <bos> <boi> codes <eoi> answer
            return n + 3 + max_new_tokens, (f"<bos>, <boi>, the {n} image codes, <eoi> and "
                                            f"max_new_tokens={max_new_tokens}")
        if task == "edit":  # <bos> <boi> source <eoi> instruction <boi> target <eoi>
            return 2 * n + 5, f"the source and target images ({n} codes each) and their markers"
        return super()._reserved(task, max_new_tokens)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.head(hidden, self._copy_source)

    def _embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Prompt ids hold whole images, so each code's cell (and, for one prompt's ids (S,),
        the aligned source code of an editing prompt's target ``<boi>``) follows from them."""
        m, s = self.model, self.special
        source = None
        if m.source_proj is not None and ids.dim() == 1:
            source = torch.tensor(source_alignment(ids.tolist(), s.boi, s.eoi, m.text_vocab),
                                  device=ids.device)
        return m.embed_tokens(ids, image_cells(ids, s.boi, m.text_vocab), source)

    def _text_allowed(self, vocab: int) -> torch.Tensor:
        m = self.model
        return (super()._text_allowed(vocab) & ~m.image_token_mask(self.device)
                & ~m.unused_text_mask(self.device))

    def _generate_images(self, streams, batch, scales, steps, seed, progress, sampling,
                         guidance_interval):
        # ``steps`` is not used: one step per code; ``sampling`` draws the codes
        no_guidance_interval(guidance_interval)
        return self._image(streams, batch, scales, seed, progress, sampling)

    def _edit(self, sources, instructions, scales, steps, seed, progress, sampling,
              guidance_interval):
        """Draw the target's codes after the source's codes and the instruction."""
        no_guidance_interval(guidance_interval)
        s, m = self.special, self.model
        codes = (self.encode_images(sources.to(self.device)).flatten(1) + m.text_vocab).tolist()
        streams = [[s.bos, s.boi, *c, s.eoi, *p, s.boi]
                   for c, p in zip(codes, instructions, strict=True)]
        if scales:
            streams += [[s.bos, s.boi, *c, s.eoi, s.boi] for c in codes]
        if len(scales) == 2:
            streams += [[s.bos, s.boi]] * len(codes)
        source = None
        if m.source_proj is not None:  # (streams, h·w): the source's codes where it is in
            source = torch.full((len(streams), len(codes[0])), -1, device=self.device)
            with_source = len(codes) * min(len(scales) + 1, 2)
            source[:with_source] = torch.tensor(codes, device=self.device).repeat(
                with_source // len(codes), 1)
        return self._image(streams, len(codes), scales, seed, progress, sampling, source)

    def _image(self, streams: list[list[int]], batch: int, scales: tuple[float, ...],
               seed: int, progress: bool, sampling: TokenSampling | None,
               source: torch.Tensor | None = None) -> torch.Tensor:
        """Draw h·w image codes after each stream (all ending in <boi>), guided over the
        len(scales) + 1 stream groups; force <eoi>. ``source`` (streams, h·w): each stream's
        source codes (-1: none) for a ``source_alignment`` model. Returns decoded images
        (batch, 3, H, W) or codes (batch, h, w)."""
        sampling = sampling or self.image_sampling
        # the prompt's last position (the target's <boi>) predicts cell 0
        self._copy_source = source[:, 0] if source is not None else None
        try:
            grid = self._draw_codes(streams, batch, scales, seed, progress, sampling, source)
        finally:
            self._copy_source = None
        return self.decode_images(grid) if self.decode_images else grid

    def _interleaved_image(self, context, scales, steps, seed, sampling, guidance_interval):
        """Draw the codes after the document so far (its ids: Chameleon's context is one id
        list); the context piece is the codes as ids."""
        no_guidance_interval(guidance_interval)
        s, (ids,) = self.special, context
        grid = self._draw_codes([ids] + [[s.bos, s.boi]] * len(scales), 1, scales, seed,
                                False, sampling or self.image_sampling, None)
        pixels = self.decode_images(grid) if self.decode_images else grid
        return (grid.flatten() + self.model.text_vocab).tolist(), pixels[0]

    def _draw_codes(self, streams: list[list[int]], batch: int, scales: tuple[float, ...],
                    seed: int, progress: bool, sampling: TokenSampling,
                    source: torch.Tensor | None) -> torch.Tensor:
        """:meth:`_image`'s loop, with ``_copy_source`` kept in step with each position ->
        codes (batch, h, w)."""
        m = self.model
        state, logits = self._start(streams)
        allowed = m.image_token_mask(self.device)
        g = torch.Generator(device=self.device).manual_seed(seed)
        h, w = self.code_grid
        codes = []
        for cell in tqdm(range(h * w), desc="image codes", disable=not progress, leave=False):
            logp = logits.float().masked_fill(~allowed, float("-inf")).log_softmax(-1)
            # -inf - -inf is nan outside the image range; keep those at -inf
            logp = torch.where(allowed, combine_guidance(logp, scales), float("-inf"))
            tok = sample_token(logp, sampling, allowed, g)  # (batch,)
            codes.append(tok)
            step = tok.repeat(len(streams) // batch).unsqueeze(1)  # (streams, 1)
            # one code at a time: its cell is the loop's, not derivable from the new id alone
            # ... and it predicts cell + 1, whose source code is aligned with it
            aligned = (source[:, cell + 1:cell + 2] if source is not None and cell + 1 < h * w
                       else None)
            self._copy_source = None if aligned is None else aligned[:, 0]
            logits = self._append_embeddings(
                state, m.embed_tokens(step, torch.full_like(step, cell), aligned))
        self._append_tokens(state, torch.full((len(streams), 1), self.special.eoi,
                                              device=self.device))
        return (torch.stack(codes, 1) - m.text_vocab).view(batch, h, w)

    @torch.no_grad()
    def caption(self, images: torch.Tensor, max_new_tokens: int = 24,
                sampling: TokenSampling | None = None, seed: int = 0) -> list[list[int]]:
        """Images (B, 3, H, W) -> caption ids, decoded after <bos> <boi> codes <eoi>."""
        fit_prompts([], self.prompt_budget("image_to_text", max_new_tokens))
        s, m = self.special, self.model
        codes = self.encode_images(images.to(self.device)).flatten(1) + m.text_vocab
        streams = [[s.bos, s.boi, *row.tolist(), s.eoi] for row in codes]
        state, logits = self._start(streams)
        return self._decode(state, logits, max_new_tokens, sampling, seed)
