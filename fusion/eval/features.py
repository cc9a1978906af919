"""ShapesWorld feature network: the offline feature extractor for FID/KID on ShapesWorld.

Inception-v3 features (the standard FID) need weights that cannot be downloaded here and were
learnt on photographs, not 64x64 shapes. This small CNN is trained on ShapesWorld itself to say
what a scene holds -- which (class, colour) pairs, classes and colours are present (multi-label),
how many objects (1-4), which cells of a 4x4 grid hold an object centre, and (a dense training
aid) what object is centred in each 8x8-pixel cell -- so its penultimate layer
(``num_features`` = 128 dims) responds to exactly what a ShapesWorld generator has to get right:
classes, colours, their binding, counts and layout. ``scripts/train_shapes_features.py`` trains
it in under three minutes on a 2-core CPU; the result ships in ``tokenizers/shapes-features/``
(config.json + model.safetensors + card.md).

Dimensions: B batch, S image side (``image_size``), W ``width``, D ``num_features``.

Input follows the contract torchmetrics' FID gives its default Inception network (and any
``feature=`` module when ``normalize=False``): uint8 (B, 3, H, W) in [0, 255]. Float input is
read as fusion's pixel convention, [-1, 1]. Other sizes are resized (bilinear, antialiased) to
``image_size``, as Inception resizes to 299.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from fusion.data.shapes import COLORS, SHAPES, Scene, ShapesWorld, render

# Multi-label attribute index: shape-major, colour-minor (circle/red = 0, circle/orange = 1, ...).
ATTRIBUTES: tuple[tuple[str, str], ...] = tuple((s, c) for s in SHAPES for c in COLORS)
_ATTR_INDEX = {a: i for i, a in enumerate(ATTRIBUTES)}
SHAPES_FEATURES_DIR = "tokenizers/shapes-features"
HEADS = ("attributes", "shapes", "colors", "count", "occupancy")


@dataclass
class ShapesFeatureConfig:
    """Architecture of :class:`ShapesFeatureNet` (written to config.json)."""

    image_size: int = 64
    width: int = 24
    num_features: int = 128
    grid: int = 4  # occupancy head: grid x grid cells
    max_objects: int = 4  # count head: 1 .. max_objects
    training: dict = field(default_factory=dict)  # how it was trained (informative)
    metrics: dict = field(default_factory=dict)  # held-out accuracy (informative)


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class ShapesFeatureNet(nn.Module):
    """A 4-layer CNN with pooled and coarse-spatial read-outs: (B, 3, S, S) -> (B, D).

    The last feature map (B, 4W, S/8, S/8) is read three ways and concatenated: global mean and
    global max (what is present, wherever it is: max pooling makes presence easy to learn) and
    a 1x1-compressed map averaged to 4x4 (where things are). A linear layer + SiLU makes the D
    features; linear heads on them predict the training targets.
    """

    def __init__(self, image_size: int = 64, width: int = 24, num_features: int = 128,
                 grid: int = 4, max_objects: int = 4):
        super().__init__()
        if image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {image_size}")
        self.config = ShapesFeatureConfig(image_size, width, num_features, grid, max_objects)
        self.image_size = image_size
        self.num_features = num_features  # torchmetrics reads this instead of a dummy pass
        # Scales the features to unit RMS on real scenes (set after training, saved with the
        # weights): FID then reads on a familiar scale and KID's cubic kernel (x.y/d + 1)^3
        # stays O(1) instead of ~1e5.
        self.register_buffer("feature_scale", torch.tensor(1.0))
        w = width
        # 23 MFLOP per 64x64 image at W = 24: cheap enough to train in minutes on a CPU.
        self.body = nn.Sequential(  # (B, 3, S, S) -> (B, 4W, S/8, S/8)
            _block(3, w, 2), _block(w, 2 * w, 2), _block(2 * w, 2 * w, 1),
            _block(2 * w, 4 * w, 2))
        self.where = nn.Sequential(nn.Conv2d(4 * w, 8, 1), nn.AdaptiveAvgPool2d(4),
                                   nn.Flatten())  # (B, 8 * 16)
        self.proj = nn.Sequential(nn.Linear(2 * 4 * w + 8 * 16, num_features), nn.SiLU())
        self.attributes = nn.Linear(num_features, len(ATTRIBUTES))  # (colour, class) present
        self.shapes = nn.Linear(num_features, len(SHAPES))  # class present
        self.colors = nn.Linear(num_features, len(COLORS))  # colour present
        self.count = nn.Linear(num_features, max_objects)  # logits over 1..max_objects
        self.occupancy = nn.Linear(num_features, grid * grid)  # cell holds an object centre
        # Training aid on the feature map: objectness and (class, colour) per S/8 cell.
        self.dense = nn.Conv2d(4 * w, 1 + len(ATTRIBUTES), 1)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] or float [-1, 1] (B, 3, H, W) -> float (B, 3, S, S) in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"ShapesFeatureNet expects (B, 3, H, W) images, got "
                             f"{tuple(images.shape)}")
        x = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return x

    def _read_out(self, h: torch.Tensor) -> torch.Tensor:
        """Feature map (B, 4W, S/8, S/8) -> features (B, D)."""
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3)), self.where(h)], dim=1)
        return self.proj(pooled)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D): the penultimate layer times ``feature_scale``, what FID/KID
        compare."""
        return self._read_out(self.body(self.prepare(images))) * self.feature_scale

    forward = features  # torchmetrics calls the module: features are its output

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, chunk: int = 500) -> float:
        """Set ``feature_scale`` so that the features of ``images`` have unit RMS."""
        self.feature_scale.fill_(1.0)
        feats = torch.cat([self.features(images[i:i + chunk])
                           for i in range(0, len(images), chunk)])
        self.feature_scale.fill_(1.0 / feats.pow(2).mean().sqrt().item())
        return float(self.feature_scale)

    def heads(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training-head logits: the global heads (B, k) and ``dense`` (B, 51, S/8, S/8)."""
        h = self.body(self.prepare(images))
        f = self._read_out(h)
        return {**{name: getattr(self, name)(f) for name in HEADS}, "dense": self.dense(h)}

    # -- artifacts -------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, training: dict | None = None,
                        metrics: dict | None = None) -> Path:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        config = asdict(self.config)
        config.update(training=training or {}, metrics=metrics or {})
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(out / "model.safetensors"))
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path = SHAPES_FEATURES_DIR) -> ShapesFeatureNet:
        """Load config.json + model.safetensors (safetensors: no pickle, nothing executed).

        A relative path is looked up from the working directory, then from the repository.
        """
        from fusion.config import resolve_path

        root = resolve_path(path)
        config_file, weights = root / "config.json", root / "model.safetensors"
        for f in (config_file, weights):
            if not f.is_file():
                raise FileNotFoundError(
                    f"shapes feature network: {str(f)!r} not found (train it with "
                    "`python scripts/train_shapes_features.py --out "
                    f"{SHAPES_FEATURES_DIR}`)")
        config = json.loads(config_file.read_text())
        arch = {k: config[k] for k in ("image_size", "width", "num_features", "grid",
                                       "max_objects")}
        net = cls(**arch)
        net.config.training, net.config.metrics = config.get("training", {}), config.get(
            "metrics", {})
        net.load_state_dict(load_file(str(weights)))
        return net.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def scene_targets(scene: Scene, grid: int = 4, max_objects: int = 4) -> dict[str, np.ndarray]:
    """Training targets of one scene.

    Global: ``attributes`` multi-hot (50,) of (class, colour); ``count`` class (objects - 1);
    ``occupancy`` multi-hot (grid * grid,) of object centres. Dense, on the S/8 x S/8 feature
    map: ``dense_attribute`` holds the (class, colour) index of the object whose centre falls
    in a cell and -100 (ignored) elsewhere; ``objectness`` is 1 there. The dense targets are a
    training aid (CenterNet-style): they teach the body what each object is -- class and colour
    bound together -- much faster than scene-level labels alone.
    """
    cells = scene.size // 8
    attrs = np.zeros(len(ATTRIBUTES), dtype=np.float32)
    occ = np.zeros(grid * grid, dtype=np.float32)
    dense = np.full((cells, cells), -100, dtype=np.int64)
    for obj in scene.objects:
        attrs[_ATTR_INDEX[(obj.shape, obj.color)]] = 1
        cx, cy = obj.center
        col = min(int(cx / scene.size * grid), grid - 1)
        row = min(int(cy / scene.size * grid), grid - 1)
        occ[row * grid + col] = 1
        r, c = min(int(cy / 8), cells - 1), min(int(cx / 8), cells - 1)
        dense[r, c] = _ATTR_INDEX[(obj.shape, obj.color)]
    return {"attributes": attrs, "count": np.int64(min(len(scene.objects), max_objects) - 1),
            "occupancy": occ, "dense_attribute": dense,
            "objectness": (dense >= 0).astype(np.float32)}


def shapes_batch(world: ShapesWorld, indices: range | list[int], grid: int = 4,
                 max_objects: int = 4) -> dict[str, torch.Tensor]:
    """Rendered scenes, uint8 (B, 3, S, S) under ``images``, and their stacked targets
    (:func:`scene_targets`)."""
    images, targets = [], []
    for i in indices:
        scene = world.scene(i)
        images.append(render(scene))
        targets.append(scene_targets(scene, grid, max_objects))
    batch = {k: torch.from_numpy(np.stack([t[k] for t in targets])) for k in targets[0]}
    batch["images"] = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return batch


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild corruption (x in [-1, 1]) so features stay meaningful on imperfect samples:
    per image, Gaussian noise of random strength and, for a quarter, a 3x3 blur."""
    b = x.shape[0]
    sigma = torch.rand(b, 1, 1, 1, generator=generator) * 0.15
    x = x + sigma * torch.randn(x.shape, generator=generator)
    blur = torch.rand(b, generator=generator) < 0.25
    if blur.any():
        x[blur] = F.avg_pool2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), 3, 1)
    return x.clamp(-1, 1)


def _presence(attributes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 50) (class, colour) multi-hot -> class (B, 5) and colour (B, 10) multi-hots."""
    grid = attributes.view(-1, len(SHAPES), len(COLORS))
    return grid.amax(dim=2), grid.amax(dim=1)


def _loss(net: ShapesFeatureNet, x: torch.Tensor, batch: dict) -> torch.Tensor:
    out = net.heads(x)
    shapes, colors = _presence(batch["attributes"])
    bce = F.binary_cross_entropy_with_logits
    dense = out["dense"]  # (B, 1 + 50, S/8, S/8)
    return (bce(out["attributes"], batch["attributes"]) * len(ATTRIBUTES) / 4
            + bce(out["shapes"], shapes) + bce(out["colors"], colors)
            + F.cross_entropy(out["count"], batch["count"])
            + bce(out["occupancy"], batch["occupancy"])
            + bce(dense[:, 0], batch["objectness"])
            + F.cross_entropy(dense[:, 1:], batch["dense_attribute"], ignore_index=-100))


@torch.no_grad()
def evaluate_heads(net: ShapesFeatureNet, batch: dict, chunk: int = 500) -> dict[str, float]:
    """Held-out accuracy, per image: all 50 (class, colour) labels right (``scene_exact``),
    the set of classes right, the set of colours right, the count right, every 4x4 cell
    right."""
    net.eval()
    images = batch["images"]
    outs = [net.heads(images[i:i + chunk]) for i in range(0, len(images), chunk)]
    pred = {k: torch.cat([o[k] for o in outs]) for k in HEADS}
    shapes, colors = _presence(batch["attributes"])

    def exact(logits: torch.Tensor, truth: torch.Tensor) -> float:
        return ((logits > 0) == truth.bool()).all(-1).float().mean().item()

    return {"scene_exact": exact(pred["attributes"], batch["attributes"]),
            "class_set_exact": exact(pred["shapes"], shapes),
            "color_set_exact": exact(pred["colors"], colors),
            "count": (pred["count"].argmax(-1) == batch["count"]).float().mean().item(),
            "occupancy_exact": exact(pred["occupancy"], batch["occupancy"])}


def train_shapes_features(out: str | Path = SHAPES_FEATURES_DIR, steps: int = 1500,
                          batch_size: int = 64, lr: float = 3e-3, seed: int = 1,
                          num_val: int = 1000, max_seconds: float | None = 170.0,
                          threads: int | None = 1, progress: bool = True, **arch) -> tuple[ShapesFeatureNet, dict]:
    """Train :class:`ShapesFeatureNet` on fresh ShapesWorld scenes and save it to ``out``.

    Scenes come from ``ShapesWorld(seed)`` (seed 1 by default, so never the seed-0 scenes that
    fusion trains and evaluates generators on): step t uses scenes ``t*B .. (t+1)*B - 1``, and
    the ``num_val`` scenes from 10,000,000 on are held out. AdamW, linear warm-up, cosine
    decay over ``steps`` or ``max_seconds``, whichever ends first.

    ``threads``: torch intra-op threads for the run (restored after). One by default: this
    network's convolutions are too small to gain from a second thread, and on a shared CPU
    two threads ran 10x slower per step than one (measured on the 2-core dev machine).
    """
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(out, steps, batch_size, lr, seed, num_val, max_seconds, progress, arch)
    finally:
        torch.set_num_threads(previous_threads)


def _train(out: str | Path, steps: int, batch_size: int, lr: float, seed: int, num_val: int,
           max_seconds: float | None, progress: bool, arch: dict
           ) -> tuple[ShapesFeatureNet, dict]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    world = ShapesWorld(seed=seed, size=arch.get("image_size", 64))
    net = ShapesFeatureNet(**arch)
    grid, max_objects = net.config.grid, net.config.max_objects
    val = shapes_batch(world, range(10_000_000, 10_000_000 + num_val), grid, max_objects)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    start, done = time.perf_counter(), 0
    bar = tqdm(range(steps), desc="shapes features", disable=not progress)
    for step in bar:
        # Warm-up over the first 5 % and cosine decay over whichever runs out first, the steps
        # or the time budget, so a run cut short by max_seconds still ends at a low rate.
        elapsed = time.perf_counter() - start
        frac = max(step / steps, elapsed / max_seconds if max_seconds else 0.0)
        if frac >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (frac + 1e-3) / 0.05) * 0.5 * (1 + math.cos(math.pi * frac))
        net.train()
        batch = shapes_batch(world, range(step * batch_size, (step + 1) * batch_size), grid,
                             max_objects)
        x = _augment(net.prepare(batch["images"]), gen)
        loss = _loss(net, x, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
    seconds = time.perf_counter() - start
    metrics = {k: round(v, 4) for k, v in evaluate_heads(net, val).items()}
    scale = net.calibrate(val["images"])
    training = {"world_seed": seed, "steps": done, "batch_size": batch_size, "lr": lr,
                "seconds": round(seconds, 1), "val_scenes": f"{num_val} from index 10000000",
                "feature_scale": round(scale, 6)}
    net.save_pretrained(out, training, metrics)
    _write_card(Path(out), training, metrics)
    return net.eval().requires_grad_(False), {**training, **metrics}


def _write_card(out: Path, training: dict, metrics: dict) -> None:
    """card.md: what the artifact is, how it was made, how well its heads do."""
    rows = "\n".join(f"| {k} | {v} |" for k, v in metrics.items())
    scenes = training["steps"] * training["batch_size"]
    (out / "card.md").write_text(
        "# shapes-features\n\n"
        "ShapesWorld feature network for FID/KID (`fusion.eval.features.ShapesFeatureNet`, "
        "128-d penultimate features): `feature=\"shapes\"` in `fusion.eval.fid`.\n\n"
        f"Trained by `python scripts/train_shapes_features.py` on `ShapesWorld(seed="
        f"{training['world_seed']})` scenes 0..{scenes - 1}: {training['steps']} steps of "
        f"{training['batch_size']} in {training['seconds']} s (1 CPU thread).\n\n"
        f"Held-out accuracy per image, {training['val_scenes']} (every label of the kind "
        "right):\n\n| head | accuracy |\n|---|---|\n" + rows + "\n")
