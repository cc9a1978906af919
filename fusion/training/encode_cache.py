"""Memoise the frozen image tokenizer's ``encode`` per distinct image (stage 2 training).

Stage 1 is frozen in stage 2 (docs/design.md, Training stages); its ``encode`` is a pure function of
the pixels: the VAE returns its posterior *mean* (fusion.image.vae.VAETokenizer.encode), the
VQ-GAN the nearest code in eval mode. A training run sees the same images again on every
epoch -- ShapesWorld's fixed scenes, a folder's images, each editing source once per epoch --
so encoding them again is wasted work. On the 2-core CPU the tiny VAE's encoder is ~20 % of a
Transfusion step and the VQ-GAN's ~9 % of a Chameleon step (docs/performance.md).

Keys are BLAKE2b digests of each image's bytes (plus shape and dtype), so the cache needs no
cooperation from the data pipeline and can never return another image's encoding unless two
different images collide in a 128-bit digest. Values live in host memory (accelerator memory
is left to training), least recently used first out beyond ``max_bytes``. Each process (DDP
rank) has its own cache.

Shape legend: B = images in a call, C/H/W = pixels, ... = the tokenizer's output per image.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch


class EncodeCache:
    """``cache(pixels (B, C, H, W)) -> encode(pixels) (B, ...)``, encoding only images it has
    not seen (each distinct image once per call, however often it repeats in the batch).

    ``max_bytes`` <= 0 turns the cache off: every call goes straight to ``encode``.
    ``hits`` / ``misses`` count images since construction; ``last_hit_share`` is the share of
    the latest call's images that were found."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], max_bytes: int):
        self._encode = encode
        self.max_bytes = int(max_bytes)
        self._store: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self.last_hit_share = 0.0

    def __len__(self) -> int:
        return len(self._store)

    @staticmethod
    def _key(image: torch.Tensor) -> tuple:
        raw = image.contiguous().view(torch.uint8).numpy()  # any dtype, as bytes
        return (tuple(image.shape), str(image.dtype),
                hashlib.blake2b(raw.data, digest_size=16).digest())

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.max_bytes <= 0:
            return self._encode(pixels)
        if pixels.ndim < 2 or len(pixels) == 0:
            raise ValueError(f"expected a batch of images (B, C, H, W), got {tuple(pixels.shape)}")
        keys = [self._key(image) for image in pixels.detach().cpu()]
        missing: dict[tuple, int] = {}  # key -> the first batch index holding that image
        for i, key in enumerate(keys):
            if key not in self._store and key not in missing:
                missing[key] = i
        if missing:
            fresh = self._encode(pixels[list(missing.values())]).detach().cpu()
            for key, value in zip(missing, fresh, strict=True):
                self._put(key, value.clone())  # clone: do not keep the whole batch alive
        found = len(keys) - sum(1 for k in keys if k in missing)
        self.hits += found
        self.misses += len(keys) - found
        self.last_hit_share = found / len(keys)
        values = []
        for key in keys:
            self._store.move_to_end(key)  # most recently used
            values.append(self._store[key])
        out = torch.stack(values).to(pixels.device)
        self._evict()  # after the lookup: this call's own values are always returned
        return out

    def _put(self, key: tuple, value: torch.Tensor) -> None:
        self._store[key] = value
        self.bytes += value.numel() * value.element_size()

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self._store:
            _, value = self._store.popitem(last=False)
            self.bytes -= value.numel() * value.element_size()
