"""fusion from Python: a trained model folder of either family, used as diffusers pipelines are.

    from fusion import FusionPipeline
    pipe = FusionPipeline.from_pretrained("outputs/train/transfusion_tiny/model")
    images = pipe("a photo of a red circle", num_images=4, guidance_scale=5.0, seed=0)
    text = pipe.caption(images[0])
    pieces = pipe.generate("two photos of a red circle")  # text and images, interleaved

Every sampling setting is a keyword argument (a field of fusion.config.SamplingConfig:
``guidance_scale``, ``diffusion_steps``, ``guidance_interval``, ``temperature``, ``top_k``,
``top_p``, ``image_guidance_scale``, ``prompt_overflow``); one not given takes the value the
model folder recorded from its training recipe (fusion.families.folders.model_sampling, the
rule the scripts follow). Images in: PIL images, uint8 arrays (H, W, 3), tensors (3, H, W) or
(B, 3, H, W) in [-1, 1], or file paths; images out: PIL images (``output_type="np"``: a uint8
array (N, H, W, 3), ``"pt"``: a float tensor (N, 3, H, W) in [-1, 1]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from fusion.config import SamplingConfig
from fusion.data.images import fit, to_rgb, to_tensor, to_uint8
from fusion.errors import UserError
from fusion.families import family_sampler
from fusion.families.folders import load_model, model_sampling
from fusion.sampling.base import encode_prompts, image_settings
from fusion.sampling.interleaved import generate_documents
from fusion.sampling.text import TokenSampling

OUTPUT_TYPES = ("pil", "np", "pt")
SETTINGS = tuple(f.name for f in dataclasses.fields(SamplingConfig)
                 if f.name not in ("prompts", "grid_every_n_steps", "seed"))


class FusionPipeline:
    """A loaded model folder (model, tokenizers, recorded sampling recipe) and its sampler."""

    def __init__(self, model, loss, tokenizer, image_tokenizer, meta: dict):
        self.model, self.loss, self.meta = model.eval(), loss, meta
        self.tokenizer, self.image_tokenizer = tokenizer, image_tokenizer.eval()
        self.image_size = int(meta["image_size"])
        self.sampler = family_sampler(model, loss, tokenizer, image_tokenizer)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None,
                        image_tokenizer: str | None = None) -> FusionPipeline:
        """Load a model folder written by ``scripts/train.py`` (``<output_dir>/model``), its
        weights and tokenizers checked against their recorded fingerprints; the image
        tokenizer is the folder's own copy (``image_tokenizer/``), else (older folders) the
        recorded path. ``image_tokenizer``: a copy of the artifact it was trained with, to use
        instead. What the scripts load through (scripts/sample.py, edit.py, evaluate.py)."""
        model, loss, tok, image_tok, meta = load_model(path, image_tokenizer=image_tokenizer)
        return cls(model, loss, tok, image_tok, meta).to(device, dtype)

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> FusionPipeline:
        """Move the model (and cast it, with ``dtype``) and the image tokenizer; returns self."""
        self.model.to(device=device, dtype=dtype)
        self.image_tokenizer.to(device)
        self.sampler = family_sampler(self.model, self.loss, self.tokenizer,
                                      self.image_tokenizer)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def family(self) -> str:
        return self.meta["model"]["family"]

    def settings(self, seed: int = 0, **given) -> SamplingConfig:
        """The sampling settings a call uses: ``given`` (SamplingConfig fields), the rest as
        the model folder recorded."""
        unknown = sorted(set(given) - set(SETTINGS))
        if unknown:
            raise UserError(f"unknown sampling setting(s) {unknown}; the settings are "
                            f"{', '.join(SETTINGS)}")
        settings, _ = self.sampling_settings(SamplingConfig(seed=seed, **given), given)
        return settings

    def sampling_settings(self, settings, given: Iterable[str] = ()
                          ) -> tuple[SamplingConfig, dict]:
        """``settings`` (a whole SamplingConfig, or a script's ``sampling`` config node) with
        each recipe setting not named in ``given`` (those set on purpose, e.g. on a command
        line) taken from the model folder -> (the settings, {setting: value taken from the
        folder}); the rule of :meth:`settings` and of every script
        (fusion.families.folders.model_sampling)."""
        return model_sampling(settings, self.meta, given)

    # -- text -> image ----------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], num_images: int = 1, seed: int = 0,
                 output_type: str = "pil", batch_size: int = 16, progress: bool = True,
                 **settings):
        """Prompt(s) -> ``num_images`` images per prompt, prompt by prompt. Batch ``b`` draws
        with seed ``seed + b``, as ``scripts/sample.py`` does, so the same call gives the
        same images."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if num_images < 1:
            raise UserError(f"num_images must be at least 1, got {num_images}")
        _check_output_type(output_type)
        s = self.settings(seed, **settings)
        ids = encode_prompts(self.tokenizer, prompts,
                             self.sampler.prompt_budget("text_to_image"), s.prompt_overflow)
        jobs = [x for x in ids for _ in range(num_images)]
        out = []
        for b, start in enumerate(tqdm(range(0, len(jobs), batch_size), desc="text->image",
                                       disable=not progress, leave=False)):
            out.append(self.sampler.generate_images(jobs[start:start + batch_size],
                                                    **image_settings(s, seed=s.seed + b)))
        return _output(torch.cat(out).float().cpu(), output_type)

    # -- image -> text, text -> text ----------------------------------------------------
    @torch.no_grad()
    def caption(self, images, max_new_tokens: int = 24) -> str | list[str]:
        """Image(s) -> caption(s), decoded greedily (one image in: one string out)."""
        pixels, single = self._pixels(images)
        ids = self.sampler.caption(pixels.to(self.device), max_new_tokens, TokenSampling(0.0))
        texts = [self.tokenizer.decode(x) for x in ids]
        return texts[0] if single else texts

    @torch.no_grad()
    def generate_text(self, prompt: str | Sequence[str], max_new_tokens: int = 24,
                      seed: int = 0, **settings) -> str | list[str]:
        """Text continuation(s) of prompt(s), sampled with the token settings
        (``temperature``, ``top_k``, ``top_p``; greedy at temperature 0)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        s = self.settings(seed, **settings)
        ids = encode_prompts(self.tokenizer, prompts,
                             self.sampler.prompt_budget("text_to_text", max_new_tokens),
                             s.prompt_overflow)
        out = self.sampler.generate_text(ids, max_new_tokens, TokenSampling.from_config(s),
                                         seed=s.seed)
        texts = [self.tokenizer.decode(x) for x in out]
        return texts[0] if isinstance(prompt, str) else texts

    # -- editing ------------------------------------------------------------------------
    @torch.no_grad()
    def edit(self, image, instruction: str | Sequence[str], seed: int = 0,
             output_type: str = "pil", **settings):
        """Source image(s) + instruction(s) -> edited image(s), for a model fine-tuned on
        edits (``experiment=edit_<family>_tiny``; docs/editing.md)."""
        if self.meta.get("documents") != "edit":
            raise UserError(f"this {self.family} model was trained on "
                            f"{self.meta.get('documents', 'caption')!r} documents, not edits; "
                            f"fine-tune it first (scripts/train.py experiment=edit_"
                            f"{self.family}_tiny init_from=<this folder>) and load that")
        pixels, single = self._pixels(image)
        texts = [instruction] if isinstance(instruction, str) else list(instruction)
        if len(texts) != len(pixels):
            raise UserError(f"{len(pixels)} image(s) but {len(texts)} instruction(s); give one "
                            "instruction per image")
        s = self.settings(seed, **settings)
        ids = encode_prompts(self.tokenizer, texts, self.sampler.prompt_budget("edit"),
                             s.prompt_overflow, what="instruction")
        edited = self.sampler.edit(pixels.to(self.device), ids, **image_settings(s, edit=True))
        out = _output(edited.float().cpu(), output_type)
        return out[0] if single else out

    # -- interleaved --------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: str | Sequence[str], max_new_tokens: int = 96,
                 max_images: int = 4, seed: int = 0, output_type: str = "pil",
                 text_temperature: float = 0.0, progress: bool = True, **settings):
        """Interleaved (mixed-modal) generation: the prompt is continued with text, and the
        model opens images itself (docs/interleaved.md). Returns the document as a list of
        pieces in order, the prompt first: ``str`` text and images (``output_type``); a list
        of such lists for a list of prompts. ``text_temperature`` draws the text (0: greedy);
        the images follow the sampling settings as ``__call__``'s do. Prompt ``i`` draws from
        seed ``seed + i``. Stops at ``<eos>``, ``max_new_tokens`` text tokens or the model's
        length; at most ``max_images`` images."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        _check_output_type(output_type)  # before generating, not after
        s = self.settings(seed, **settings)
        docs, _ = generate_documents(self.sampler, self.tokenizer, prompts, s, max_new_tokens,
                                     max_images, TokenSampling(text_temperature), progress)
        out = [[x if isinstance(x, str) else _output(x[None], output_type)[0] for x in doc]
               for doc in docs]
        return out[0] if isinstance(prompt, str) else out

    # -- inputs -------------------------------------------------------------------------
    def _pixels(self, images) -> tuple[torch.Tensor, bool]:
        """Any accepted image input -> (float (N, 3, S, S) in [-1, 1] at the model's size,
        whether one image was given)."""
        if isinstance(images, torch.Tensor):
            if images.ndim == 3:
                return self._pixels([images])[0], True
            if images.ndim != 4 or images.shape[1] != 3:
                raise UserError(f"an image tensor must be (3, H, W) or (B, 3, H, W) in [-1, 1],"
                                f" got {tuple(images.shape)}")
            return torch.stack([self._one(x) for x in images]), False
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return torch.stack([self._one(x) for x in images]), False
        if isinstance(images, (str, Path, Image.Image, np.ndarray)):
            return self._one(images)[None], True
        try:
            items = list(images)
        except TypeError:
            items = [images]  # not a collection: _one names what it is
        if not items:
            raise UserError("no images given")
        return torch.stack([self._one(x) for x in items]), False

    def _one(self, image) -> torch.Tensor:
        size = self.image_size
        if isinstance(image, torch.Tensor):
            if image.shape != (3, size, size):
                raise UserError(f"an image tensor must be (3, {size}, {size}) in [-1, 1] for this "
                                f"model, got {tuple(image.shape)}; pass a PIL image or a path "
                                "to have it resized")
            return image.float()
        if isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_file():
                raise FileNotFoundError(f"image file not found: {path}")
            try:
                with Image.open(path) as img:
                    img.load()
                    image = fit(to_rgb(img), size)
            except OSError as err:
                raise UserError(f"{path} is not a readable image ({err})") from err
        elif isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise UserError(f"an image array must be uint8 (H, W, 3), got {image.dtype} "
                                f"{image.shape}")
            image = fit(Image.fromarray(image), size)
        elif isinstance(image, Image.Image):
            image = fit(to_rgb(image), size)
        else:
            raise UserError(f"cannot read an image from {type(image).__name__!r}; pass a PIL "
                            "image, a uint8 (H, W, 3) array, a (3, H, W) tensor or a path")
        return to_tensor(image)


def _check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise UserError(f"output_type={output_type!r}; expected one of {OUTPUT_TYPES}")


def _output(pixels: torch.Tensor, output_type: str):
    _check_output_type(output_type)
    if output_type == "pt":
        return pixels
    arrays = to_uint8(pixels)
    return arrays if output_type == "np" else [Image.fromarray(a) for a in arrays]
