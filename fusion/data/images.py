"""Image helpers shared by every source: mode conversion, resize policies, tensors, grids.

Pixel tensors in fusion are float (3, H, W) in [-1, 1]; arrays on disk/in ShapesWorld are
uint8 (H, W, 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fusion.errors import UserError

RESIZE_POLICIES = ("center_crop", "resize", "pad")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited onto ``background``; 16/32-bit
    greyscale is rescaled to its full 8-bit range rather than clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(((arr - lo) * scale).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def fit(img: Image.Image, size: int, policy: str = "center_crop",
        fill: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Bring an RGB image to ``size x size`` by a policy:

    * ``center_crop``: scale the short side to ``size``, crop the centre (keeps aspect, loses
      borders) -- the usual choice for text-to-image training;
    * ``resize``: squash to the square (keeps everything, distorts aspect);
    * ``pad``: scale the long side to ``size`` and letterbox with ``fill`` (keeps both).
    """
    if policy not in RESIZE_POLICIES:
        raise UserError(f"unknown resize policy {policy!r}; expected one of {RESIZE_POLICIES}")
    w, h = img.size
    if (w, h) == (size, size):
        return img
    if policy == "resize":
        return img.resize((size, size), Image.BICUBIC)
    if policy == "center_crop":
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        return img.crop((left, top, left + size, top + size))
    s = size / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(img.resize((nw, nh), Image.BICUBIC), ((size - nw) // 2, (size - nh) // 2))
    return canvas


def to_tensor(image: np.ndarray | Image.Image) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [-1, 1]."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """float (3, H, W) or (B, 3, H, W) in [-1, 1] -> uint8 (H, W, 3) or (B, H, W, 3)."""
    x = pixels.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def save_grid(images: Sequence[np.ndarray], path: str | Path, captions: Sequence[str] = (),
              columns: int = 8, scale: int = 2) -> Path:
    """Save uint8 images as a grid PNG, each with its caption (wrapped) underneath."""
    if not images:
        raise ValueError("save_grid needs at least one image")
    h, w = images[0].shape[:2]
    h, w = h * scale, w * scale
    font = ImageFont.load_default()
    text_h = 0
    wrapped = []
    if captions:
        chars = max(8, w // 6)
        for cap in captions:
            words, lines, line = cap.split(), [], ""
            for word in words:
                if line and len(line) + 1 + len(word) > chars:
                    lines.append(line)
                    line = word
                else:
                    line = f"{line} {word}".strip()
            lines.append(line)
            wrapped.append(lines)
        text_h = 12 * max(len(lines) for lines in wrapped) + 4
    rows = (len(images) + columns - 1) // columns
    cols = min(columns, len(images))
    grid = Image.new("RGB", (cols * (w + 4), rows * (h + text_h + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        x, y = c * (w + 4) + 2, r * (h + text_h + 4) + 2
        grid.paste(Image.fromarray(img).resize((w, h), Image.NEAREST), (x, y))
        for j, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((x, y + h + 2 + 12 * j), line, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def source_batches(source, n: int | None = None, batch_size: int = 64,
                   what: str = "this evaluation"):
    """The images of ``source[:n]`` (``source[i].image``: uint8 (H, W, 3); None: all of it)
    in batches: uint8 arrays (B, H, W, 3), in order. An empty selection is refused."""
    n = len(source) if n is None else min(n, len(source))
    if n == 0:
        raise ValueError(f"{what} needs at least one image")
    for start in range(0, n, batch_size):
        yield np.stack([source[i].image for i in range(start, min(start + batch_size, n))])
