"""Transfusion family: next-token prediction on text + diffusion on image patches, one model.

Zhou et al. 2024, "Transfusion: Predict the Next Token and Diffuse Images with One
Multi-Modal Model" (arXiv:2408.11039). A document becomes

    <bos> text ... <boi> [N latent-patch positions] <eoi> text ... <eos>

Text ids are embedded; each image is VAE latents -> patchifier tokens (with its own diffusion
timestep embedded, sec. 3.2). The modality map makes attention causal over the sequence and
bidirectional inside each image (sec. 3.3). The loss (eq. 4) is

    L = L_LM + λ · L_diffusion,   λ = 5 (sec. 4.1)

with L_LM the next-token cross-entropy on text targets only and L_diffusion the MSE of the
noise (or velocity) prediction on image patches only.

Editing documents ``<bos> <boi> [source] <eoi> instruction <boi> [target] <eoi> <eos>``
(the paper's image-editing fine-tune; docs/editing.md): the source image enters clean
(t = 0) and is left out of L_diffusion, the instruction is context unless
``instruction_loss`` is on, and conditions are dropped InstructPix2Pix-style for two-scale
guidance.

Shape legend: B = packed rows, S = positions per row, D = d_model, V = vocabulary,
I = images in the batch, C/h/w = latent channels/grid, N = patch tokens per image.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from fusion.data.documents import (
    Document,
    Image,
    ImageBatch,
    Text,
    caption_dropped,
    drop_edit_conditions,
)
from fusion.models.attention import AttentionLayout
from fusion.models.diffusion import Diffusion
from fusion.models.packing import (
    BatchPreparer,
    Context,
    ImageSlot,
    Packed,
    PreparedBatch,
    RowSpec,
    SpecialIds,
    gather_images,
    next_token_loss,
    pack,
    row_length,
    scatter_images,
    target_mask,
)
from fusion.models.patchify import build_patchifier
from fusion.models.schemas import TransfusionConfig, TransfusionLossConfig
from fusion.models.transformer import KVCache, Transformer, transformer_config


class Transfusion(nn.Module):
    """Embeddings + shared transformer + LM head + patchifier. No losses, no optimiser."""

    def __init__(self, cfg: TransfusionConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        bb = transformer_config(cfg.backbone, **cfg.backbone_overrides)
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, bb.d_model)
        self.transformer = Transformer(bb)
        self.patchifier = build_patchifier(
            cfg.patchifier,
            latent_channels=cfg.latent_channels,
            latent_size=cfg.latent_size,
            d_model=bb.d_model,
            patch_size=cfg.patch_size,
            **cfg.patchifier_args,
        )
        self.lm_head = nn.Linear(bb.d_model, vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @property
    def tokens_per_image(self) -> int:
        return self.patchifier.tokens_per_image()

    @property
    def max_seq_len(self) -> int:
        return self.transformer.cfg.max_seq_len

    def forward(
        self,
        ids: torch.Tensor,
        layout: AttentionLayout,
        packed: Packed | None = None,
        latents: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        cache: KVCache | None = None,
        commit: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One pass over a packed batch (or over new positions against a cache).

        ids (B, S); latents (I, C, h, w) noisy image latents for the batch's image slots with
        their timesteps t (I,). Returns (hidden (B, S, D), logits (B, S, V), image model output
        (I, C, h, w) or None).
        """
        x = self.embed(ids)
        skips = None
        if latents is not None:
            tokens, skips = self.patchifier.patchify(latents, t)  # (I, N, D)
            x = scatter_images(x, packed, tokens)
        h = self.transformer(x, layout, cache=cache, commit=commit)
        logits = self.lm_head(h)
        image_out = None
        if latents is not None:
            image_out = self.patchifier.unpatchify(gather_images(h, packed), t, skips)
        return h, logits, image_out

    def text_logits(self, ids: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        """Logits (B, S, V) of a packed batch with no image positions (text-only documents)."""
        return self.forward(ids, layout)[1]


class TransfusionLoss:
    """Documents -> packed batch -> L_LM + λ·L_diffusion (plus parts, for logging)."""

    def __init__(self, cfg: TransfusionLossConfig, special: SpecialIds):
        self.cfg = cfg
        self.special = special
        self.diffusion = Diffusion(cfg.diffusion)

    def text_budget(self, model: Transfusion, n_images: int) -> int:
        """The most text tokens a document with ``n_images`` images can hold in one packed
        row: the row minus ``<bos>``, ``<eos>`` and ``<boi> patches <eoi>`` per image (the
        layout of :meth:`pieces`). The data checks every record against it when it opens."""
        row = row_length(self.cfg.pack_len, model.max_seq_len)
        return row - 2 - n_images * (model.tokens_per_image + 2)

    def pieces(self, doc: Document, tokens_per_image: int, drop_caption: bool,
               text_targets: bool = True) -> list:
        """A Document as packing pieces: <bos> ... <boi> [slot] <eoi> ... <eos>.

        ``text_targets=False`` makes the text segments context only (never predicted): an
        editing document's instruction when ``instruction_loss`` is off."""
        s = self.special
        out: list = [[s.bos]]
        for seg in doc.segments:
            if isinstance(seg, Text):
                if not drop_caption:
                    out.append(list(seg.ids) if text_targets else Context(seg.ids))
            else:
                out += [[s.boi], ImageSlot(tokens_per_image), [s.eoi]]
        out.append([s.eos])
        return out

    def rows(self, model: Transfusion) -> RowSpec:
        return RowSpec(row_length(self.cfg.pack_len, model.max_seq_len), model.tokens_per_image)

    def preparer(self, model: Transfusion) -> BatchPreparer:
        """:meth:`prepare` bound to ``model``'s sizes, for loader workers."""
        return BatchPreparer(self.prepare, self.rows(model))

    def prepare(self, docs: list[Document], rng: random.Random, rows: RowSpec) -> PreparedBatch:
        """The host half of the loss: caption and condition dropout, the clean-image choice
        (``rng``), packing, and the images stacked in slot order. ``extras``: per image,
        ``is_condition`` and ``clean`` (its timestep is drawn from ``clean_image_max_t``)."""
        cfg = self.cfg
        pieces, images, clean, is_condition = [], [], [], []
        for doc in docs:
            edit = doc.is_edit
            if edit:  # editing documents get InstructPix2Pix dropout instead of caption dropout
                doc = drop_edit_conditions(doc, rng, cfg.edit_condition_dropout)
            drop = caption_dropped(doc, rng, cfg.caption_dropout, edit)
            pieces.append(self.pieces(doc, rows.image_positions, drop,
                                      text_targets=not edit or cfg.instruction_loss))
            for seg in doc.segments:
                if isinstance(seg, Image):
                    images.append(seg)
                    is_condition.append(seg.is_condition)
                    clean.append(
                        doc.order == "image_first" and rng.random() < cfg.clean_image_share
                    )
        packed = pack(pieces, rows.row_length, self.special.pad)
        return PreparedBatch(packed, ImageBatch.of(images), len(docs),
                             target_mask(pieces, packed),
                             {"is_condition": is_condition, "clean": clean})

    def compute(self, model: Transfusion, batch: PreparedBatch, encode,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The device half: encode the images, noise them, run the model, L_LM + λ·L_diff.
        ``encode``: pixels (I, 3, H, W) -> scaled latents (I, C, h, w), frozen (the VAE)."""
        cfg, device, packed = self.cfg, model.embed.weight.device, batch.packed
        ids, layout = packed.ids.to(device, non_blocking=True), packed.layout(device)
        is_condition = batch.extras["is_condition"]
        latents = t = target = None
        if batch.images.count:
            with torch.no_grad():
                # float32: noise and targets must not inherit bf16 from an autocast encoder.
                x0 = batch.images.encode(encode, device).float()
            n = x0.shape[0]
            max_t = torch.tensor(
                [cfg.clean_image_max_t if c else self.diffusion.T for c in batch.extras["clean"]],
                device=device,
            )
            t = self.diffusion.sample_timesteps(n, max_t, generator=generator, device=device)
            cond = torch.tensor(is_condition, device=device)
            t = torch.where(cond, torch.zeros_like(t), t)  # condition images are never noised
            noise = torch.randn(x0.shape, generator=generator, device=device)
            latents = torch.where(
                cond.view(-1, 1, 1, 1), x0, self.diffusion.add_noise(x0, noise, t)
            )
            target = self.diffusion.target(x0, noise)
        _, logits, image_out = model(ids, layout, packed, latents, t)
        out = next_token_loss(logits, packed, cfg.z_loss_weight, batch.predict)
        if image_out is not None:
            per_image = (image_out.float() - target).pow(2).flatten(1).mean(1)
            keep = ~torch.tensor(is_condition, device=device)
            diff = per_image[keep].mean() if keep.any() else per_image.sum() * 0
            out["diffusion_loss"] = diff
            out["loss"] = out["loss"] + cfg.diffusion_weight * diff
        return out

    def __call__(
        self,
        model: Transfusion,
        docs: list[Document],
        encode,
        rng: random.Random,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """:meth:`prepare` then :meth:`compute`, in this process."""
        return self.compute(model, self.prepare(docs, rng, self.rows(model)), encode, generator)
