"""Decoding machinery shared by both families' samplers.

B streams (prompts; with classifier-free guidance, conditional and unconditional ones) are
left-padded to a common length and decoded together with one KV cache. Padding has document
id -1, so it never influences real positions, and RoPE positions count real tokens only, so a
padded stream computes exactly what it would alone. ``use_cache=False`` recomputes the whole
sequence at every step: the reference for tests and the cached-vs-uncached benchmark.

A family's model needs ``embed`` (ids (B, n) -> (B, n, D)), ``transformer`` and ``lm_head``.

Classifier-free guidance stacks G groups of B streams, from the most conditioned to the
unconditional, and mixes their outputs with :func:`combine_guidance`: one scale for
text -> image (Ho & Salimans 2022), two for editing (InstructPix2Pix, Brooks et al. 2023).

Shape legend: B = streams (prompts), G = guidance groups, n = new positions, D = d_model,
V = vocabulary, L = longest prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm

from fusion.errors import UserError
from fusion.models.attention import AttentionLayout
from fusion.sampling.text import TokenSampling, sample_token

log = logging.getLogger(__name__)

# sampling.prompt_overflow: what a prompt longer than the model can take does
PROMPT_OVERFLOW = ("error", "truncate")
TASKS = ("text_to_image", "image_to_text", "text_to_text", "edit", "interleaved")
# Why an interleaved document ended (InterleavedDocument.stopped)
STOPS = ("eos", "max_new_tokens", "max_len")


@dataclass(frozen=True)
class PromptBudget:
    """Room for a prompt in one stream: the model's ``max_len`` positions minus the
    ``reserved`` ones the task adds around it (``<bos>``, images, answer tokens)."""

    task: str
    max_len: int
    reserved: int
    what: str  # what the reserved positions hold, for messages
    max_new_tokens: int = 0  # answer tokens among them (text_to_text, image_to_text)

    @property
    def limit(self) -> int:
        return self.max_len - self.reserved


def check_overflow_setting(overflow: str) -> str:
    if overflow not in PROMPT_OVERFLOW:
        raise UserError(f"sampling.prompt_overflow={overflow!r} is not a setting; pass "
                        f"sampling.prompt_overflow=error or sampling.prompt_overflow=truncate")
    return overflow


def fit_prompts(prompts: list[list[int]], budget: PromptBudget, overflow: str = "error",
                what: str = "prompt") -> list[list[int]]:
    """Prompt ids that fit ``budget``: a longer one is refused (``overflow="error"``, a
    :class:`UserError` naming the first, 1-based) or cut to its first ``budget.limit`` tokens
    with one warning (``"truncate"``). Runs before any model call, so a long prompt fails at
    once rather than as a KV-cache overflow after other batches were sampled."""
    check_overflow_setting(overflow)
    limit = budget.limit
    fewer = (f" or lower max_new_tokens (now {budget.max_new_tokens})"
             if budget.max_new_tokens else "")
    if limit < 0:  # not even an empty prompt fits
        most = budget.max_new_tokens + limit
        fix = (f"lower max_new_tokens to at most {most}" if most > 0 else
               "use a model trained with a larger max_seq_len")
        raise UserError(f"{budget.task} needs {budget.reserved} positions for {budget.what}, "
                        f"more than this model's max_len {budget.max_len}; {fix}")
    long = [i for i, p in enumerate(prompts) if len(p) > limit]
    if not long:
        return prompts
    if overflow == "truncate":
        log.warning("%d of %d %ss are longer than the %d tokens this model takes (max_len %d "
                    "minus %d positions for %s); kept the first %d tokens of each "
                    "(sampling.prompt_overflow=truncate)", len(long), len(prompts), what, limit,
                    budget.max_len, budget.reserved, budget.what, limit)
        return [p[:limit] for p in prompts]
    i = long[0]
    more = f" (and {len(long) - 1} more are too long)" if len(long) > 1 else ""
    raise UserError(f"{what} {i + 1} is {len(prompts[i])} tokens{more}; this model takes at "
                    f"most {limit} {what} tokens (max_len {budget.max_len} minus "
                    f"{budget.reserved} positions for {budget.what}); shorten it{fewer} or set "
                    "sampling.prompt_overflow=truncate")


def encode_prompts(tokenizer, texts: Sequence[str], budget: PromptBudget | None = None,
                   overflow: str = "error", what: str = "prompt") -> list[list[int]]:
    """Prompt texts -> token ids fitted to ``budget`` (:func:`fit_prompts`; None: unchecked).

    An empty or whitespace-only prompt is encoded as no tokens, which samples unconditionally
    (the caption-dropped document that classifier-free guidance trained), with a warning:
    it is allowed, but rarely what was meant."""
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        numbers = ", ".join(str(i + 1) for i in empty[:10]) + (" ..." if len(empty) > 10 else "")
        label = f"{what} {numbers} is" if len(empty) == 1 else f"{what}s {numbers} are"
        log.warning("%s empty: sampled unconditionally, as if no description were given", label)
    ids = [tokenizer.encode(t) if t.strip() else [] for t in texts]
    return ids if budget is None else fit_prompts(ids, budget, overflow, what)


@dataclass
class Streams:
    """Decoding state of B aligned streams: cache, padding and lengths."""

    cache: object
    pad: torch.Tensor  # (B,) left padding per stream
    length: int  # committed positions (same for every stream, padding included)
    images_so_far: int = 0
    history: list = field(default_factory=list)  # uncached mode: (embeddings, layout) chunks


@dataclass
class InterleavedDocument:
    """One generated interleaved document: ``segments`` in order, text as token ids
    (list[int]; the prompt is the first, the model's own text follows as its own segment) and
    images as float (3, H, W) in [-1, 1] (without a
    decoder: the family's latents or codes); ``stopped``: why it ended (:data:`STOPS`)."""

    segments: list
    stopped: str

    @property
    def images(self) -> list[torch.Tensor]:
        return [x for x in self.segments if isinstance(x, torch.Tensor)]


def combine_guidance(out: torch.Tensor, scales: Sequence[float]) -> torch.Tensor:
    """Classifier-free guidance over nested conditions.

    ``out`` (G·B, ...) stacks G = len(scales) + 1 groups of B stream outputs, from the most
    conditioned (all conditions) to the unconditional; returns (B, ...)

        o_{G-1} + Σ_j s_j · (o_j - o_{j+1}).

    One scale is ordinary CFG, ``o_u + s (o_c - o_u)``. Two are InstructPix2Pix's eq. 3
    (arXiv:2211.09800) with groups [image + instruction; image; neither] and scales
    (s_T, s_I): ``o_∅ + s_I (o_I - o_∅) + s_T (o_IT - o_I)``.
    """
    groups = len(scales) + 1
    if out.shape[0] % groups:
        raise ValueError(f"{out.shape[0]} streams do not split into {groups} guidance groups")
    o = out.view(groups, out.shape[0] // groups, *out.shape[1:])
    result = o[-1]
    for j, s in enumerate(scales):
        result = result + s * (o[j] - o[j + 1])
    return result


def guidance_scales(guidance_scale: float | None,
                    image_guidance_scale: float | None = None) -> tuple[float, ...]:
    """The scales of :func:`combine_guidance` for an instruction scale and an optional
    source-image scale: () unguided, (s_T,) instruction only, (s_T, s_I) both (s_T = 1 when
    only the image scale is given)."""
    if image_guidance_scale is not None:
        return (1.0 if guidance_scale is None else guidance_scale, image_guidance_scale)
    return () if guidance_scale is None else (guidance_scale,)


def image_settings(settings, seed: int | None = None, edit: bool = False) -> dict:
    """The keyword arguments of a family sampler's ``generate_images`` (``edit=True``: its
    ``edit``) for a sampling-settings object (fusion.config.SamplingConfig): the one place
    where the settings meet the samplers. ``seed``: this batch's seed (default the settings')."""
    kwargs = dict(guidance_scale=settings.guidance_scale, steps=settings.diffusion_steps,
                  seed=settings.seed if seed is None else seed,
                  sampling=TokenSampling.from_config(settings),
                  guidance_interval=settings.guidance_interval)
    if edit:
        kwargs["image_guidance_scale"] = settings.image_guidance_scale
    return kwargs


def _extend(context: list, piece) -> None:
    """Append ``piece`` to :meth:`StreamSampler._start_blocks` pieces, joining token ids to
    the ids before them (Chameleon reads an image's cells from its <boi> in the same ids)."""
    if isinstance(piece, list) and context and isinstance(context[-1], list):
        context[-1] = context[-1] + piece
    else:
        context.append(piece)


@runtime_checkable
class FamilySampler(Protocol):
    """What every family's sampler provides (fusion.families.registry.Family.sampler); the
    scripts, the evaluation and the main job use nothing else. Prompts and instructions are
    token ids; images are float (B, 3, H, W) in [-1, 1]."""

    def prompt_budget(self, task: str, max_new_tokens: int = 0) -> PromptBudget: ...

    def generate_images(self, prompts: list[list[int]], **settings) -> torch.Tensor: ...

    def caption(self, images: torch.Tensor, max_new_tokens: int = 24,
                **settings) -> list[list[int]]: ...

    def generate_text(self, prompts: list[list[int]], max_new_tokens: int = 24,
                      **settings) -> list[list[int]]: ...

    def edit(self, sources: torch.Tensor, instructions: list[list[int]],
             **settings) -> torch.Tensor: ...

    def generate_interleaved(self, prompts: list[list[int]], max_new_tokens: int = 96,
                             max_images: int = 4, **settings) -> list[InterleavedDocument]: ...


class StreamSampler:
    """Start streams from prompts, append positions, decode text. Subclassed per family."""

    def __init__(self, model, special, use_cache: bool = True, decode_images=None,
                 encode_images=None):
        """``decode_images`` / ``encode_images``: the frozen image tokenizer's (None: images
        come back as the family's latents or codes, and none can be read in)."""
        self.model = model.eval()
        self.special = special
        self.use_cache = use_cache
        self.decode_images, self.encode_images = decode_images, encode_images
        self.device = model.embed.weight.device

    @property
    def max_len(self) -> int:
        """Positions one stream can hold: the backbone's ``max_seq_len``."""
        return self.model.transformer.cfg.max_seq_len

    @property
    def image_length(self) -> int:
        """Positions one image takes in a stream between its <boi> and <eoi>."""
        raise NotImplementedError

    def _reserved(self, task: str, max_new_tokens: int) -> tuple[int, str]:
        """(positions ``task`` adds to a prompt, what they hold). Families with images
        override this for their image tasks."""
        if task == "text_to_text":
            return 1 + max_new_tokens, f"<bos> and max_new_tokens={max_new_tokens}"
        if task == "interleaved":  # <bos> prompt, and room for one image: <boi> [image] <eoi>
            n = self.image_length
            return n + 3, f"<bos> and one image (<boi>, {n} positions, <eoi>)"
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")

    def prompt_budget(self, task: str, max_new_tokens: int = 0) -> PromptBudget:
        """How many prompt (or instruction) tokens ``task`` leaves room for."""
        reserved, what = self._reserved(task, max_new_tokens)
        answer = max_new_tokens if task in ("text_to_text", "image_to_text") else 0
        return PromptBudget(task, self.max_len, reserved, what, answer)

    # -- the image tasks, the same for every family (FamilySampler) -----------------------
    @torch.no_grad()
    def generate_images(self, prompts: list[list[int]], guidance_scale: float | None = 3.0,
                        steps: int | None = None, seed: int = 0, progress: bool = False,
                        sampling: TokenSampling | None = None,
                        guidance_interval: list[float] | None = None) -> torch.Tensor:
        """Prompt token ids -> images (B, 3, H, W) in [-1, 1] (without a decoder: the
        family's latents or codes). ``guidance_scale=None`` is unguided; otherwise the
        unconditional stream is the caption-dropped document ``<bos> <boi>`` (what caption
        dropout trained). ``steps`` and ``guidance_interval`` are diffusion settings,
        ``sampling`` draws image tokens: each family uses the ones it has (its
        ``_generate_images``). Prompts are checked against the model's room first."""
        fit_prompts(prompts, self.prompt_budget("text_to_image"))
        s, scales = self.special, guidance_scales(guidance_scale)
        streams = [[s.bos, *p, s.boi] for p in prompts]
        if scales:
            streams += [[s.bos, s.boi]] * len(prompts)
        return self._generate_images(streams, len(prompts), scales, steps, seed, progress,
                                     sampling, guidance_interval)

    @torch.no_grad()
    def edit(self, sources: torch.Tensor, instructions: list[list[int]],
             guidance_scale: float | None = 3.0, image_guidance_scale: float | None = None,
             steps: int | None = None, seed: int = 0, progress: bool = False,
             sampling: TokenSampling | None = None,
             guidance_interval: list[float] | None = None) -> torch.Tensor:
        """Source images (B, 3, H, W) + instruction ids -> edited images (B, 3, H, W): the
        target is generated after the clean source and the instruction (the family's
        ``_edit``), guided over the instruction (``guidance_scale``) and over the source
        image (``image_guidance_scale``; None leaves that stream out) as InstructPix2Pix does.
        Instructions are checked against the model's room first."""
        fit_prompts(instructions, self.prompt_budget("edit"), what="instruction")
        scales = guidance_scales(guidance_scale, image_guidance_scale)
        return self._edit(sources, instructions, scales, steps, seed, progress, sampling,
                          guidance_interval)

    @torch.no_grad()
    def generate_interleaved(self, prompts: list[list[int]], max_new_tokens: int = 96,
                             max_images: int = 4, guidance_scale: float | None = 3.0,
                             steps: int | None = None, seed: int = 0, progress: bool = False,
                             sampling: TokenSampling | None = None,
                             guidance_interval: list[float] | None = None,
                             text_sampling: TokenSampling | None = None,
                             ) -> list[InterleavedDocument]:
        """Interleaved (mixed-modal) generation: each prompt is continued with text, and when
        the model itself emits <boi> a whole image is generated (the family's
        ``_interleaved_image``: Chameleon draws its codes, Transfusion denoises the block, as
        the Transfusion paper's inference does, arXiv:2408.11039 sec. 3), then <eoi> is fed
        and text goes on, until <eos>, ``max_new_tokens`` text tokens, or the model's length.
        After ``max_images`` images, or when an image no longer fits, <boi> is masked out.

        Text tokens are drawn with ``text_sampling`` (default greedy), image tokens (where a
        family has them) with ``sampling``, as in :meth:`generate_images`; each image is guided over
        everything before it against the unconditional ``<bos> <boi>`` stream (one scale, as
        text->image). Document ``i`` draws everything from seed ``seed + i``, so the same
        call gives the same documents; one document is decoded at a time, since documents
        open images at different steps."""
        fit_prompts(prompts, self.prompt_budget("interleaved"))
        if max_images < 0:
            raise UserError(f"max_images must be >= 0, got {max_images}")
        return [self._interleaved_one(p, max_new_tokens, max_images,
                                      guidance_scales(guidance_scale), steps, seed + i,
                                      sampling, text_sampling or TokenSampling(0.0),
                                      guidance_interval)
                for i, p in enumerate(tqdm(prompts, desc="interleaved", disable=not progress,
                                           leave=False))]

    def _interleaved_one(self, prompt: list[int], max_new_tokens: int, max_images: int,
                         scales: tuple[float, ...], steps: int | None, seed: int,
                         sampling: TokenSampling | None, text_sampling: TokenSampling,
                         guidance_interval: list[float] | None) -> InterleavedDocument:
        """:meth:`generate_interleaved` of one prompt. ``context`` holds the document so far
        as :meth:`_start_blocks` pieces (ids, and each image in the family's context form);
        every image restarts the streams from it, which recomputes the prefix once per image
        rather than keeping an unconditional stream alive for the whole document."""
        s = self.special
        g = torch.Generator(device=self.device).manual_seed(seed)
        context: list = [[s.bos, *prompt]]
        segments: list = [list(prompt), []]  # the prompt, then what the model writes
        state, logits = self._start_blocks([context])
        text_only = self._text_allowed(logits.shape[-1])
        with_image = text_only.clone()
        with_image[s.boi] = True
        length, new_tokens, images = 1 + len(prompt), 0, 0
        while True:
            room = length + self.image_length + 2 <= self.max_len  # <boi> image <eoi>
            allowed = with_image if images < max_images and room else text_only
            tok = int(sample_token(logits, text_sampling, allowed, g)[0])
            if tok == s.eos:
                stopped = "eos"
                break
            if tok == s.boi:
                _extend(context, [s.boi])
                image_seed = int(torch.randint(2**31 - 1, (1,), generator=g,
                                               device=self.device))
                piece, pixels = self._interleaved_image(context, scales, steps, image_seed,
                                                        sampling, guidance_interval)
                _extend(context, piece)
                _extend(context, [s.eoi])
                segments += [pixels, []]
                images += 1
                length += self.image_length + 2
                state, logits = self._start_blocks([context])
                continue
            if new_tokens >= max_new_tokens or length >= self.max_len:
                stopped = "max_new_tokens" if new_tokens >= max_new_tokens else "max_len"
                break
            _extend(context, [tok])
            segments[-1].append(tok)
            new_tokens, length = new_tokens + 1, length + 1
            logits = self._append_tokens(state, torch.tensor([[tok]], device=self.device))
        # the prompt stays first, even empty; the model's empty text pieces go
        return InterleavedDocument(segments[:1] + [x for x in segments[1:]
                                                   if not isinstance(x, list) or x], stopped)

    def _interleaved_image(self, context: list, scales: tuple[float, ...], steps: int | None,
                           seed: int, sampling: TokenSampling | None,
                           guidance_interval: list[float] | None) -> tuple:
        """One image after ``context`` (:meth:`_start_blocks` pieces ending in <boi>), guided
        against ``<bos> <boi>`` -> (the image as a context piece, the image (3, H, W) as
        :meth:`generate_images` returns it)."""
        raise NotImplementedError

    def _generate_images(self, streams: list[list[int]], batch: int,
                         scales: tuple[float, ...], steps: int | None, seed: int,
                         progress: bool, sampling: TokenSampling | None,
                         guidance_interval: list[float] | None) -> torch.Tensor:
        """Generate one image after each of ``batch`` prompts; ``streams`` holds the
        len(scales) + 1 guidance groups (:func:`combine_guidance`), each ending in <boi>."""
        raise NotImplementedError

    def _edit(self, sources: torch.Tensor, instructions: list[list[int]],
              scales: tuple[float, ...], steps: int | None, seed: int, progress: bool,
              sampling: TokenSampling | None,
              guidance_interval: list[float] | None) -> torch.Tensor:
        raise NotImplementedError

    def _start(self, prompts: list[list[int]]) -> tuple[Streams, torch.Tensor]:
        """Left-pad prompts, run them, return the state and last-position logits (B, V)."""
        return self._start_blocks([[p] for p in prompts])

    def _start_blocks(self, prompts: list[list]) -> tuple[Streams, torch.Tensor]:
        """:meth:`_start` for prompts that mix text and image blocks (editing: a clean source
        image inside the prompt). Each prompt is a list of pieces: token ids (list[int]) or
        one image's position embeddings (N, D), bidirectional inside. Image blocks are numbered
        from 0 in each stream; ``images_so_far`` becomes the most any stream has."""
        rows, image_rows = [], []
        for prompt in prompts:
            xs, img, k = [], [], 0
            for piece in prompt:
                if isinstance(piece, torch.Tensor):
                    xs.append(piece)
                    img += [k] * piece.shape[0]
                    k += 1
                else:
                    xs.append(self._embed_ids(torch.tensor(piece, device=self.device)))
                    img += [-1] * len(piece)
            rows.append(torch.cat(xs))
            image_rows.append(img)
        longest = max(r.shape[0] for r in rows)
        pad = torch.tensor([longest - r.shape[0] for r in rows], device=self.device)
        # Left padding holds <pad>'s embedding (document id -1: never seen by real positions).
        x = self._embed_ids(torch.full((len(rows), longest), self.special.pad,
                                       device=self.device))
        image_ids = torch.full((len(rows), longest), -1, device=self.device)
        for i, (r, img) in enumerate(zip(rows, image_rows, strict=True)):
            x[i, longest - r.shape[0]:] = r
            image_ids[i, longest - r.shape[0]:] = torch.tensor(img, device=self.device)
        cache = self.model.transformer.new_cache() if self.use_cache else None
        state = Streams(cache, pad, 0)
        h = self._run(state, x, image=False, commit=True, image_ids=image_ids)
        state.images_so_far = int(image_ids.max()) + 1
        return state, self._logits(h[:, -1])

    def _layout(self, state: Streams, n: int, image: bool,
                image_ids: torch.Tensor | None = None) -> AttentionLayout:
        """Layout of n new positions appended to every stream (``image``: one image block,
        bidirectional inside; ``image_ids`` (B, n): per-position image ids instead)."""
        B = len(state.pad)
        idx = torch.arange(state.length, state.length + n, device=self.device)
        real = idx.unsqueeze(0) >= state.pad.unsqueeze(1)  # (B, n): False on left padding
        doc = torch.where(real, 0, -1)
        img = image_ids if image_ids is not None else torch.full(
            (B, n), state.images_so_far if image else -1, device=self.device)
        img = torch.where(real, img, -1)
        pos = (idx.unsqueeze(0) - state.pad.unsqueeze(1)).clamp(min=0)
        return AttentionLayout(doc, img, positions=pos)

    def _run(self, state: Streams, x: torch.Tensor, image: bool, commit: bool,
             image_ids: torch.Tensor | None = None) -> torch.Tensor:
        """New positions' embeddings (B, n, D) -> hidden (B, n, D); commit appends them."""
        layout = self._layout(state, x.shape[1], image, image_ids)
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

    def _embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (..., n) -> (..., n, D). A family whose embedding needs more than the ids
        (Chameleon's image-cell positions) overrides this."""
        return self.model.embed(ids)

    def _append_tokens(self, state: Streams, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, n) -> logits at the last new position (B, V)."""
        return self._append_embeddings(state, self._embed_ids(tokens))

    def _append_embeddings(self, state: Streams, x: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, n, D) of new text-attending positions -> logits at the last (B, V)."""
        h = self._run(state, x, image=False, commit=True)
        return self._logits(h[:, -1])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, D) of the streams' last positions -> next-token logits (B, V).
        A family with more than an LM head (Chameleon's source copy) overrides this."""
        return self.model.lm_head(hidden)

    def _text_allowed(self, vocab: int) -> torch.Tensor:
        """Tokens a text continuation may contain: no <pad>, <bos>, <boi>, <eoi>, CM3
        sentinel or <eoss> (subclasses also remove image codes). <eos> ends it."""
        s = self.special
        allowed = torch.ones(vocab, dtype=torch.bool, device=self.device)
        allowed[[s.boi, s.eoi, s.pad, s.bos, *s.cm3]] = False
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
        fit_prompts(prompts, self.prompt_budget("text_to_text", max_new_tokens))
        state, logits = self._start([[self.special.bos, *p] for p in prompts])
        return self._decode(state, logits, max_new_tokens, sampling, seed)
