"""Sampling from a Transfusion model: text with a KV cache, images by diffusion against it.

Text is decoded token by token with the KV cache. On <boi> the whole image block is denoised
(DDIM for ε-prediction, Euler for flow matching): every step runs only the N image positions
against the cached prefix without committing them, so the prefix is computed once, not once
per step (Transfusion, arXiv:2408.11039, sec. 3). Classifier-free guidance batches the
conditional and unconditional streams together, optionally only inside a noise-level
interval (``DiffusionConfig.guidance_interval``, arXiv:2404.07724). The final clean block
(t = 0) is committed once, then <eoi> and decoding continue. Captioning feeds the clean
image (t = 0).

Editing (docs/editing.md) puts the clean source image (t = 0) in the prompt,
``<bos> <boi> [source] <eoi> instruction <boi>``, and denoises the target against it with
InstructPix2Pix's two-scale guidance (arXiv:2211.09800, eq. 3): streams [source +
instruction; source; neither], the last being text->image's unconditional ``<bos> <boi>``.

Streams, padding and text decoding: fusion.sampling.base.

Shape legend: B = streams (G·B with G guidance groups), P = prefix length, N = image tokens,
C/h/w = latent channels/grid, V = vocabulary.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from fusion.models.diffusion import Diffusion, check_guidance_interval
from fusion.models.packing import SpecialIds
from fusion.models.transfusion import Transfusion
from fusion.sampling.base import (
    Streams,
    StreamSampler,
    combine_guidance,
    fit_prompts,
)
from fusion.sampling.text import TokenSampling


class TransfusionSampler(StreamSampler):
    """Text->image, image->text and text->text generation for a :class:`Transfusion` model.

    Args:
        model: the model (eval mode is set here).
        decode_images / encode_images: the frozen VAE's decode and encode.
        special: special token ids; diffusion: the objective the model was trained with.
        use_cache: False recomputes the whole sequence at every step (a reference for tests
            and the cached-vs-uncached benchmark).
    """

    def __init__(self, model: Transfusion, special: SpecialIds, diffusion: Diffusion,
                 decode_images=None, encode_images=None, use_cache: bool = True):
        super().__init__(model, special, use_cache, decode_images, encode_images)
        self.diffusion = diffusion

    @property
    def image_length(self) -> int:
        return self.model.tokens_per_image

    def _reserved(self, task: str, max_new_tokens: int) -> tuple[int, str]:
        n = self.model.tokens_per_image
        if task == "text_to_image":  # <bos> prompt <boi> [image]
            return n + 2, f"<bos>, <boi> and the {n}-position image"
        if task == "image_to_text":  # <bos> <boi> [image] <eoi> answer
            return n + 3 + max_new_tokens, (f"<bos>, <boi>, the {n}-position image, <eoi> and "
                                            f"max_new_tokens={max_new_tokens}")
        if task == "edit":  # <bos> <boi> [source] <eoi> instruction <boi> [target]
            return 2 * n + 4, f"the source and target images ({n} each) and their markers"
        return super()._reserved(task, max_new_tokens)

    def _denoise(self, state: Streams, batch: int, scales: tuple[float, ...], steps: int,
                 generator: torch.Generator | None, progress: bool,
                 interval: list[float] | None) -> torch.Tensor:
        """Diffuse one image block for each of ``batch`` prompts; streams are the
        len(scales) + 1 guidance groups (:func:`combine_guidance`), guided only inside
        ``interval`` (None: the objective's configured one). Commits the clean block.
        Returns clean latents (batch, C, h, w)."""
        if interval is not None:
            check_guidance_interval(interval)
        m, cfg = self.model, self.model.cfg
        streams = len(state.pad)
        shape = (batch, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        x = torch.randn(shape, generator=generator, device=self.device)
        sampler = self.diffusion.sampler(steps)
        for t in tqdm(sampler.timesteps, desc="denoising", disable=not progress, leave=False):
            tt = self.diffusion.model_timestep(t, streams, self.device)
            xin = x.repeat(streams // batch, 1, 1, 1)
            tokens, skips = m.patchifier.patchify(xin, tt)
            h = self._run(state, tokens, image=True, commit=False)
            out = m.patchifier.unpatchify(h, tt, skips)
            # Outside the guidance interval: the most conditioned group alone (the first).
            guided = self.diffusion.guided(t, interval)
            out = combine_guidance(out, scales) if guided else out[:batch]
            x = sampler.step(out, t, x).prev_sample
        # Commit the clean image (t = 0) once, as the context for whatever follows.
        t0 = torch.zeros(streams, device=self.device)
        tokens, _ = m.patchifier.patchify(x.repeat(streams // batch, 1, 1, 1), t0)
        self._run(state, tokens, image=True, commit=True)
        state.images_so_far += 1
        return x

    # -- public ---------------------------------------------------------------------------
    def _generate_images(self, streams, batch, scales, steps, seed, progress, sampling,
                         guidance_interval):
        # ``sampling`` is not used: no image tokens
        state, _ = self._start(streams)
        g = torch.Generator(device=self.device).manual_seed(seed)
        latents = self._denoise(state, batch, scales, steps or self.diffusion.cfg.sample_steps,
                                g, progress, guidance_interval)
        return self.decode_images(latents) if self.decode_images else latents

    def _edit(self, sources, instructions, scales, steps, seed, progress, sampling,
              guidance_interval):
        """Denoise the target's latents after the clean source patches and the instruction."""
        s, m = self.special, self.model
        B = len(instructions)
        latents = self.encode_images(sources.to(self.device))  # (B, C, h, w)
        src = m.patchifier.patchify(latents, torch.zeros(B, device=self.device))[0]  # (B, N, D)
        streams = [[[s.bos, s.boi], src[i], [s.eoi, *p, s.boi]]
                   for i, p in enumerate(instructions)]
        if scales:
            streams += [[[s.bos, s.boi], src[i], [s.eoi, s.boi]] for i in range(B)]
        if len(scales) == 2:
            streams += [[[s.bos, s.boi]]] * B
        state, _ = self._start_blocks(streams)
        g = torch.Generator(device=self.device).manual_seed(seed)
        out = self._denoise(state, B, scales, steps or self.diffusion.cfg.sample_steps, g,
                            progress, guidance_interval)
        return self.decode_images(out) if self.decode_images else out

    def _interleaved_image(self, context, scales, steps, seed, sampling, guidance_interval):
        """Denoise the whole block after the document so far; its context piece is the clean
        block's patch embeddings (N, D) at t = 0, as :meth:`_denoise` commits it."""
        s, m = self.special, self.model
        streams = [context] + ([[[s.bos, s.boi]]] * len(scales))
        state, _ = self._start_blocks(streams)
        g = torch.Generator(device=self.device).manual_seed(seed)
        latents = self._denoise(state, 1, scales, steps or self.diffusion.cfg.sample_steps, g,
                                False, guidance_interval)
        block = m.patchifier.patchify(latents, torch.zeros(1, device=self.device))[0][0]
        pixels = self.decode_images(latents) if self.decode_images else latents
        return block, pixels[0]

    @torch.no_grad()
    def caption(self, images: torch.Tensor, max_new_tokens: int = 24,
                sampling: TokenSampling | None = None, seed: int = 0) -> list[list[int]]:
        """Images (B, 3, H, W) -> caption token ids: <bos> <boi> [clean image] <eoi> ...

        The image is fed clean (t = 0). Decoding stops at <eos>."""
        fit_prompts([], self.prompt_budget("image_to_text", max_new_tokens))
        s, m = self.special, self.model
        latents = self.encode_images(images.to(self.device))
        B = latents.shape[0]
        state, _ = self._start([[s.bos, s.boi]] * B)
        tokens, _ = m.patchifier.patchify(latents, torch.zeros(B, device=self.device))
        self._run(state, tokens, image=True, commit=True)
        state.images_so_far += 1
        logits = self._append_tokens(state, torch.full((B, 1), s.eoi, device=self.device))
        return self._decode(state, logits, max_new_tokens, sampling, seed)
