"""FID and KID on torchmetrics, with a choice of feature network and cached real statistics.

FID (Heusel et al. 2017, arXiv:1706.08500) compares Gaussian fits of two image sets' features;
KID (Binkowski et al. 2018, arXiv:1801.01401) an unbiased polynomial-kernel MMD between them.
Both come from torchmetrics (``FrechetInceptionDistance``, ``KernelInceptionDistance``), given
the feature network as a module through their ``feature=`` argument. The network receives what
torchmetrics' own Inception receives with ``normalize=False``: uint8 (B, 3, H, W) in [0, 255].

Feature networks (``feature=``):

* ``"shapes"`` (default): :class:`fusion.eval.features.ShapesFeatureNet`, 128-d, trained on
  ShapesWorld and shipped in ``tokenizers/shapes-features/``: the offline choice for ShapesWorld.
* ``"inception"``: the standard 2048-d pool features of FID's Inception-v3 (torchmetrics'
  ``NoTrainInceptionV3``). Needs the optional extra ``pip install "fusion[inception]"``
  (torch-fidelity, torchvision: never a core dependency) and a local weights file
  (``pt_inception-2015-12-05-6726825d.pth``) given as ``weights_path`` or the
  ``FUSION_INCEPTION_WEIGHTS`` environment variable, handed to torchmetrics as
  ``feature_extractor_weights_path``; nothing is downloaded.
* a Hydra-style dict ``{"_target_": "pkg.Module", ...}`` or an ``nn.Module``: any network
  mapping uint8 (B, 3, H, W) to (B, d); give it a ``num_features`` attribute to spare
  torchmetrics a dummy forward pass.

Real-image statistics are computed once: a :class:`FIDScorer` keeps them in memory across fake
sets (torchmetrics' ``reset_real_features=False``), and writes them to a cache file (FID's
feature sum and outer-product sum, plus the real features for KID) keyed by the real set, the
image size, the feature network and the number of images. Files are safetensors, never pickles.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from fusion.data.images import fit, to_rgb
from fusion.data.shapes import ShapesWorld
from fusion.eval.geneval import is_geneval_folder, read_geneval_folder

log = logging.getLogger(__name__)

# Real ShapesWorld reference: seed 0 scenes from here on are disjoint from the default training
# (0..19,999) and validation (20,000..20,511) scenes of conf/data/shapes.yaml.
REAL_SHAPES_START = 50_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INCEPTION_WEIGHTS_ENV = "FUSION_INCEPTION_WEIGHTS"
CACHE_ENV = "FUSION_CACHE_DIR"

FeatureSpec = str | Mapping | nn.Module


def default_cache_dir() -> Path:
    """``$FUSION_CACHE_DIR/fid`` or ``~/.cache/fusion/fid``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "fusion") / "fid"


# --------------------------------------------------------------------------------------------
# Image sets
# --------------------------------------------------------------------------------------------
@dataclass
class ImageSet:
    """``count`` square uint8 images of side ``size``, read in slices.

    ``key`` names the set's content for the statistics cache; None means "never cache" (for
    example images in memory). Build one with :meth:`shapes`, :meth:`folder`, :meth:`arrays`
    or :meth:`noise`.
    """

    name: str
    size: int
    count: int
    read: Callable[[int, int], np.ndarray]  # (start, stop) -> uint8 (stop - start, S, S, 3)
    key: str | None = None

    def __len__(self) -> int:
        return self.count

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, self.count, batch_size):
            yield self.read(start, min(start + batch_size, self.count))

    @classmethod
    def shapes(cls, n: int, seed: int = 0, start: int = REAL_SHAPES_START,
               size: int = 64) -> ImageSet:
        """ShapesWorld scenes ``start .. start + n - 1`` of ``ShapesWorld(seed, size)``."""
        world = ShapesWorld(seed=seed, size=size)
        name = f"shapesworld(seed={seed},start={start},n={n},size={size})"
        return cls(name, size, n, lambda a, b: np.stack([world.image(start + i)
                                                         for i in range(a, b)]), key=name)

    @classmethod
    def arrays(cls, images: np.ndarray | Sequence[np.ndarray], name: str = "images",
               key: str | None = None) -> ImageSet:
        """Images in memory: uint8 (N, S, S, 3) or a list of (S, S, 3)."""
        try:
            arr = images if isinstance(images, np.ndarray) else np.stack(list(images))
        except ValueError as err:
            raise ValueError(f"{name}: images differ in shape ({err})") from err
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or \
                arr.shape[1] != arr.shape[2]:
            raise ValueError(f"{name}: expected uint8 (N, S, S, 3) images, got {arr.dtype} "
                             f"{arr.shape}")
        if len(arr) == 0:
            raise ValueError(f"{name}: no images")
        return cls(name, arr.shape[1], len(arr), lambda a, b: arr[a:b], key=key)

    @classmethod
    def noise(cls, n: int, size: int = 64, seed: int = 0) -> ImageSet:
        """Uniform noise images: the "everything wrong" reference."""
        name = f"noise(seed={seed},n={n},size={size})"

        def read(a: int, b: int) -> np.ndarray:
            return np.stack([np.random.default_rng([seed, i]).integers(
                0, 256, (size, size, 3), dtype=np.uint8) for i in range(a, b)])
        return cls(name, size, n, read, key=name)

    @classmethod
    def folder(cls, path: str | Path, size: int | None = None, resize: str | None = None,
               limit: int | None = None) -> ImageSet:
        """Image files under ``path`` (recursively, sorted; in a GenEval layout only the
        ``samples/`` images).

        Every image must be ``size`` x ``size`` (default: the first image's size) unless
        ``resize`` names a :func:`fusion.data.images.fit` policy (``center_crop``, ``resize``,
        ``pad``) to bring it there. ``limit`` keeps the first ``limit`` files.
        """
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
        files = _image_files(root)[:limit]
        if not files:
            raise ValueError(f"image folder {str(root)!r} holds no images "
                             f"({', '.join(IMAGE_SUFFIXES)})")
        from PIL import Image

        sizes = []
        for f in files:  # header only: cheap, and bad sizes fail before any work is done
            try:
                with Image.open(f) as img:
                    sizes.append(img.size)
            except OSError as err:
                raise ValueError(f"cannot read image {str(f)!r}: {err}") from err
        if size is None:
            w, h = sizes[0]
            if w != h and resize is None:
                raise ValueError(f"{files[0]} is {w}x{h}; FID image sets must be square (pass "
                                 "a size and a resize policy)")
            size = w
        if resize is None:
            bad = [(f, s) for f, s in zip(files, sizes, strict=True) if s != (size, size)]
            if bad:
                (f, (w, h)) = bad[0]
                raise ValueError(f"{len(bad)} image(s) in {root} are not {size}x{size} (first: "
                                 f"{f} is {w}x{h}); resize them or pass resize='center_crop'")

        def read(a: int, b: int) -> np.ndarray:
            out = []
            for f in files[a:b]:
                with Image.open(f) as img:
                    rgb = to_rgb(img)
                    out.append(np.asarray(fit(rgb, size, resize) if resize else rgb))
            return np.stack(out)

        digest = hashlib.sha256()
        for f in files:
            st = f.stat()
            digest.update(f"{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        key = f"folder({root.resolve()},{digest.hexdigest()[:16]},resize={resize})"
        return cls(f"folder({root})", size, len(files), read, key=key)


def _image_files(root: Path) -> list[Path]:
    if is_geneval_folder(root):
        return [p for entry in read_geneval_folder(root) for p in entry.images]
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and p.suffix.lower() in IMAGE_SUFFIXES)


def as_image_set(images: ImageSet | str | Path | np.ndarray | Sequence[np.ndarray],
                 name: str = "images") -> ImageSet:
    """An :class:`ImageSet` from a set, a folder path, or images in memory."""
    if isinstance(images, ImageSet):
        return images
    if isinstance(images, str | Path):
        return ImageSet.folder(images)
    return ImageSet.arrays(images, name)


# --------------------------------------------------------------------------------------------
# Feature networks
# --------------------------------------------------------------------------------------------
def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _has_torch_fidelity() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


def inception_network(weights_path: str | Path | None = None) -> nn.Module:
    """FID's Inception-v3 (2048-d pool features) through torchmetrics, from a local file.

    ``weights_path`` (or ``$FUSION_INCEPTION_WEIGHTS``) is handed to torchmetrics'
    ``NoTrainInceptionV3`` as ``feature_extractor_weights_path``, so nothing is downloaded.
    """
    path = weights_path or os.environ.get(INCEPTION_WEIGHTS_ENV)
    if not _has_torch_fidelity():
        raise ModuleNotFoundError(
            "feature='inception' needs torch-fidelity and torchvision, which fusion keeps "
            "optional: pip install \"fusion[inception]\" (or use feature='shapes')")
    if not path:
        raise ValueError("feature='inception' needs a local weights file "
                         "(pt_inception-2015-12-05-6726825d.pth): pass weights_path= "
                         f"(--inception-weights) or set ${INCEPTION_WEIGHTS_ENV}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"Inception weights {str(path)!r} not found")
    from torchmetrics.image import fid as tm_fid  # looked up here so tests can stand it in

    net = tm_fid.NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                    feature_extractor_weights_path=str(path))
    if not hasattr(net, "num_features"):
        net.num_features = 2048
    return net


def build_feature_network(feature: FeatureSpec = "shapes",
                          weights_path: str | Path | None = None) -> tuple[nn.Module, str | None]:
    """The feature network and its identity for the cache (None: do not cache).

    ``weights_path``: the shapes network's folder, or the Inception weights file.
    """
    if isinstance(feature, nn.Module):
        return feature.eval(), None
    if isinstance(feature, Mapping):
        if "_target_" not in feature:
            raise ValueError(f"a feature network dict needs a '_target_', got {dict(feature)}")
        from hydra.utils import instantiate

        net = instantiate(dict(feature))
        if not isinstance(net, nn.Module):
            raise TypeError(f"{feature['_target_']} built a {type(net).__name__}, not an "
                            "nn.Module")
        return net.eval(), "target:" + json.dumps(dict(feature), sort_keys=True, default=str)
    if feature == "shapes":
        from fusion.config import resolve_path
        from fusion.eval.features import SHAPES_FEATURES_DIR, ShapesFeatureNet

        root = resolve_path(weights_path or SHAPES_FEATURES_DIR)
        net = ShapesFeatureNet.from_pretrained(root)
        return net, f"shapes:{_file_digest(root / 'model.safetensors')}"
    if feature == "inception":
        net = inception_network(weights_path)
        path = Path(weights_path or os.environ[INCEPTION_WEIGHTS_ENV])
        return net, f"inception-2048:{_file_digest(path)}"
    raise ValueError(f"unknown feature network {feature!r}; expected 'shapes', 'inception', a "
                     "{'_target_': ...} dict or an nn.Module")


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------
class FIDScorer:
    """FID (and KID) of image sets against one real set.

    Real statistics are computed on first use, or loaded from ``cache_dir``, and kept for every
    later call; each call scores one fake set::

        scorer = FIDScorer(ImageSet.shapes(2000))
        scorer(generated_images)  # {"fid": ..., "kid_mean": ..., "kid_std": ..., ...}

    Args:
        real: the reference images.
        feature: ``"shapes"``, ``"inception"``, a ``{"_target_": ...}`` dict or an nn.Module.
        weights_path: for ``"shapes"`` the network folder, for ``"inception"`` the weights file.
        kid: compute KID too (default: only with the cheap ``"shapes"`` network; KID runs the
            feature network a second time and keeps all real features in memory).
        kid_subsets, kid_subset_size: KID's subsets (subset size is capped by the set sizes).
        cache_dir: where real statistics are cached; None disables the disk cache.
        cache_key: the network's identity for the cache when it has none of its own (a module).
    """

    def __init__(self, real: ImageSet, feature: FeatureSpec = "shapes", *,
                 weights_path: str | Path | None = None, kid: bool | None = None,
                 kid_subsets: int = 100, kid_subset_size: int = 1000, batch_size: int = 250,
                 cache_dir: str | Path | None = "default", cache_key: str | None = None,
                 device: str | torch.device = "cpu", progress: bool = True):
        if len(real) < 2:
            raise ValueError(f"FID needs at least 2 real images, got {len(real)}")
        self.real, self.batch_size, self.progress = real, batch_size, progress
        self.device = torch.device(device)
        self.net, net_id = build_feature_network(feature, weights_path)
        self.net.requires_grad_(False)
        self.feature_id = cache_key or net_id
        self.kid = (feature == "shapes") if kid is None else kid
        self.kid_subset_size = kid_subset_size
        img_shape = (3, real.size, real.size)  # for networks without num_features
        # sync_on_compute=False: a scorer holds whole sets. Under several processes
        # (fusion.distributed) every rank scores all images, and torchmetrics' default would
        # add up the ranks' copies of the same features.
        self.fid_metric = FrechetInceptionDistance(feature=self.net, reset_real_features=False,
                                                   normalize=False, input_img_size=img_shape,
                                                   sync_on_compute=False).to(self.device)
        self.kid_metric = None
        if self.kid:
            with warnings.catch_warnings():  # "will save all extracted features": known, wanted
                warnings.filterwarnings("ignore", message=".*will save all extracted features")
                self.kid_metric = KernelInceptionDistance(
                    feature=self.net, subsets=kid_subsets, subset_size=kid_subset_size,
                    reset_real_features=False, normalize=False,
                    sync_on_compute=False).to(self.device)
        cache = default_cache_dir() if cache_dir == "default" else cache_dir
        self.cache_dir = Path(cache) if cache is not None else None
        self.cache_status = "off"
        self._real_ready = False

    # -- real statistics -------------------------------------------------------------------
    def cache_path(self) -> Path | None:
        """The cache file for this real set and network; None when either has no identity."""
        if self.cache_dir is None or self.real.key is None or self.feature_id is None:
            return None
        key = json.dumps(self._cache_key(), sort_keys=True)
        return self.cache_dir / f"real-{hashlib.sha256(key.encode()).hexdigest()[:20]}.safetensors"

    def _cache_key(self) -> dict:
        return {"images": self.real.key, "size": self.real.size, "n": len(self.real),
                "feature": self.feature_id}

    def _load_cache(self, path: Path) -> bool:
        if not path.is_file():
            return False
        stats = load_file(str(path))
        if self.kid and "kid_real_features" not in stats:
            return False  # written by a FID-only run: recompute with KID features
        m = self.fid_metric
        if stats["real_features_sum"].shape != m.real_features_sum.shape:
            log.warning("ignoring %s: feature size does not match the network", path)
            return False
        m.real_features_sum = stats["real_features_sum"].to(self.device)
        m.real_features_cov_sum = stats["real_features_cov_sum"].to(self.device)
        m.real_features_num_samples = stats["real_features_num_samples"].to(self.device)
        if self.kid:
            self.kid_metric.real_features = [stats["kid_real_features"].to(self.device)]
        return True

    def _save_cache(self, path: Path) -> None:
        m = self.fid_metric
        stats = {"real_features_sum": m.real_features_sum, "real_features_cov_sum":
                 m.real_features_cov_sum, "real_features_num_samples":
                 m.real_features_num_samples}
        if self.kid:
            stats["kid_real_features"] = torch.cat(self.kid_metric.real_features)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in stats.items()}, str(tmp),
                  metadata={"key": json.dumps(self._cache_key(), sort_keys=True)})
        tmp.replace(path)  # atomic: a concurrent reader never sees half a file

    def prepare_real(self) -> None:
        """Compute (or load) the real statistics; called by the first scoring call."""
        if self._real_ready:
            return
        path = self.cache_path()
        if path is not None and self._load_cache(path):
            self.cache_status = "hit"
        else:
            self._accumulate(self.real, real=True)
            self.cache_status = "miss" if path is not None else "off"
            if path is not None:
                self._save_cache(path)
        self._real_ready = True

    def _accumulate(self, images: ImageSet, real: bool) -> None:
        steps = (len(images) + self.batch_size - 1) // self.batch_size
        desc = f"features ({'real' if real else 'fake'}: {images.name})"
        for batch in tqdm(images.batches(self.batch_size), total=steps, desc=desc,
                          disable=not self.progress, leave=False):
            x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(self.device)
            self.fid_metric.update(x, real=real)
            if self.kid:
                self.kid_metric.update(x, real=real)

    # -- scoring ---------------------------------------------------------------------------
    def __call__(self, fake: ImageSet | str | Path | np.ndarray | Sequence[np.ndarray]) -> dict:
        """FID (and KID) of ``fake`` against the real set."""
        fake = as_image_set(fake, "fake")
        if fake.size != self.real.size:
            raise ValueError(f"{fake.name} images are {fake.size} px but the real set's are "
                             f"{self.real.size} px; compare images of one size")
        if len(fake) < 2:
            raise ValueError(f"FID needs at least 2 images, {fake.name} has {len(fake)}")
        self.prepare_real()
        self.fid_metric.reset()  # fake statistics only (reset_real_features=False)
        if self.kid:
            self.kid_metric.reset()
        self._accumulate(fake, real=False)
        out = {"fid": float(self.fid_metric.compute()), "n_real": len(self.real),
               "n_fake": len(fake), "feature": self.feature_id or "custom",
               "real": self.real.name, "fake": fake.name, "real_cache": self.cache_status}
        if self.kid:
            n_real = int(self.fid_metric.real_features_num_samples)
            self.kid_metric.subset_size = min(self.kid_subset_size, n_real, len(fake))
            with torch.random.fork_rng(devices=[]):  # KID's subsets: same draw every call
                torch.manual_seed(0)
                kid_mean, kid_std = self.kid_metric.compute()
            out.update(kid_mean=float(kid_mean), kid_std=float(kid_std))
        return out


def compute_fid(real: ImageSet | str | Path | np.ndarray | Sequence[np.ndarray],
                fake: ImageSet | str | Path | np.ndarray | Sequence[np.ndarray],
                feature: FeatureSpec = "shapes", **kwargs) -> dict:
    """FID/KID between two image sets (folders, arrays or :class:`ImageSet`); ``kwargs`` go to
    :class:`FIDScorer`."""
    return FIDScorer(as_image_set(real, "real"), feature, **kwargs)(fake)


def shapes_fid(fake: ImageSet | str | Path | np.ndarray | Sequence[np.ndarray],
               n_real: int = 2000, seed: int = 0, start: int = REAL_SHAPES_START,
               feature: FeatureSpec = "shapes", **kwargs) -> dict:
    """FID/KID of ``fake`` against ``n_real`` held-out real ShapesWorld scenes of its size."""
    fake = as_image_set(fake, "fake")
    real = ImageSet.shapes(n_real, seed=seed, start=start, size=fake.size)
    return FIDScorer(real, feature, **kwargs)(fake)
