"""Object detectors for GenEval-style scoring, behind one interface.

A detector maps one image to a list of :class:`Detection` (class name, confidence, box, colour)::

    detector(image: uint8 (H, W, 3)) -> list[Detection]

It reports *every* candidate it has; GenEval's rules (confidence thresholds, at most 16 objects
per class, optional NMS) are applied by :mod:`fusion.eval.geneval`, exactly as the official
``evaluate_images.py`` applies them to Mask2Former's raw output.

Two detectors:

* :class:`ShapesDetector` -- ShapesWorld's renderer inverted (:func:`fusion.data.shapes.detect`):
  offline, exact on clean renders, colours read from the palette;
* :class:`Mask2FormerDetector` -- GenEval's own detector (Ghosh et al. 2023, arXiv:2310.11513):
  mmdet Mask2Former for boxes/masks and an open_clip ViT-L-14 zero-shot colour classifier. It
  needs mmdet 2.x, open_clip and local weights, none of which are part of fusion's install; it
  fails with a message naming what is missing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from fusion.data.shapes import COLORS, SHAPES, detect

# GenEval's colour names, in the order of its COLORS list (evaluate_images.py).
GENEVAL_COLORS: tuple[str, ...] = tuple(COLORS)

# GenEval's object_names.txt (MIT licence, Ghosh et al. 2023): COCO's 80 classes in the order
# of Mask2Former's outputs, under the names GenEval's prompts use ("computer mouse", "tv
# remote", ...; mmdet calls them "mouse", "remote", ...). Mask2Former's i-th class list is the
# i-th name here.
GENEVAL_OBJECT_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse",
    "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

# The colour classifier GenEval builds: open_clip.create_model_and_transforms("ViT-L-14",
# pretrained="openai"). open_clip builds OpenAI's CLIP with QuickGELU, the activation it was
# trained with; the same weights loaded from a file under "ViT-L-14" get nn.GELU and classify
# colours differently. "ViT-L-14-quickgelu" is that architecture under a name that takes a path.
GENEVAL_CLIP_ARCH = "ViT-L-14-quickgelu"


@dataclass(frozen=True)
class Detection:
    """One detected object. ``bbox`` is (x0, y0, x1, y1) in pixels, x right and y down."""

    class_name: str
    score: float
    bbox: tuple[float, float, float, float]
    color: str | None = None  # one of GENEVAL_COLORS, or None when the detector has no colour


@runtime_checkable
class Detector(Protocol):
    """``detector(image) -> list[Detection]`` for a uint8 (H, W, 3) image."""

    classes: tuple[str, ...]

    def __call__(self, image: np.ndarray) -> list[Detection]: ...


class ShapesDetector:
    """ShapesWorld detector: wraps :func:`fusion.data.shapes.detect`, offline.

    ``detect`` scores a candidate by the IoU between its coverage map and the best class
    template. That IoU is a match quality, not a confidence: on clean 64x64 renders it ranges
    0.81-1.0 (small anti-aliased outlines never match a template exactly), on uniform noise it is
    ~0.12. GenEval's thresholds (0.3, and 0.9 for counting) were set for Mask2Former
    confidences, so the IoU is mapped linearly to a confidence, ``iou_floor`` -> 0 and
    ``iou_full`` -> 1 (clipped): every object of a clean render at >= 64 px scores 1, noise
    scores ~0, and GenEval's counting threshold asks for an IoU above 0.695.
    """

    classes: tuple[str, ...] = SHAPES

    def __init__(self, iou_floor: float = 0.2, iou_full: float = 0.75, min_area: int = 6):
        if not 0 <= iou_floor < iou_full <= 1:
            raise ValueError(f"need 0 <= iou_floor < iou_full <= 1, got {iou_floor}, {iou_full}")
        self.iou_floor, self.iou_full, self.min_area = iou_floor, iou_full, min_area

    def confidence(self, iou: float) -> float:
        return float(np.clip((iou - self.iou_floor) / (self.iou_full - self.iou_floor), 0, 1))

    def __call__(self, image: np.ndarray) -> list[Detection]:
        found = detect(image, min_area=self.min_area, min_score=0.0)
        return [Detection(o.shape, self.confidence(o.score), o.bbox, o.color) for o in found]


class Mask2FormerDetector:
    """GenEval's official detector: mmdet Mask2Former + an open_clip colour classifier.

    Follows ``evaluate_images.py`` of djghosh13/geneval: boxes and masks from Mask2Former
    (mmdet 2.x, GenEval pins ``mmdet==2.27.0``); each object's colour is a zero-shot CLIP
    classification of its crop, the object masked onto a ``#999`` background, over GenEval's
    ten colours with the templates "a photo of a {c} {class}", "a photo of a {c}-colored
    {class}", "a photo of a {c} object". GenEval classifies only the objects that a colour
    clause looks at; this adapter classifies the (at most ``max_objects``) most confident
    candidates per class above ``min_score``, a superset of those (the same answer for them,
    more CLIP calls).

    Everything is local: ``config_path`` (the mmdet config), ``checkpoint_path``
    (``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth``), ``clip_weights_path`` (open_clip
    ViT-L-14 OpenAI weights, built as :data:`GENEVAL_CLIP_ARCH`) and ``object_names_path``
    (a class list, one name per line, in the detector's output order; GenEval's own,
    :data:`GENEVAL_OBJECT_NAMES`, when omitted). It needs a CUDA-capable install of mmdet and
    open_clip (``pip install "fusion[geneval]"`` plus ``mim install mmdet==2.27.0``) and cannot
    run on fusion's CPU test machines; only its error paths are tested there.
    """

    def __init__(self, config_path: str | Path, checkpoint_path: str | Path,
                 clip_weights_path: str | Path, object_names_path: str | Path | None = None,
                 device: str = "cuda", clip_arch: str = GENEVAL_CLIP_ARCH, min_score: float = 0.3,
                 max_objects: int = 16):
        paths = {"config_path": config_path, "checkpoint_path": checkpoint_path,
                 "clip_weights_path": clip_weights_path}
        if object_names_path is not None:
            paths["object_names_path"] = object_names_path
        for name, path in paths.items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"Mask2FormerDetector: {name} {str(path)!r} is not a file "
                                        "(GenEval's evaluation/download_models.sh fetches the "
                                        "detector; nothing is downloaded at run time)")
        mmdet_apis = _require("mmdet.apis", "mmdet 2.x (GenEval pins mmdet==2.27.0: "
                                            "`mim install mmdet==2.27.0`)")
        open_clip = _require("open_clip", "open_clip (`pip install \"fusion[geneval]\"`)")
        import torch

        self.device, self.min_score, self.max_objects = device, min_score, max_objects
        self._torch, self._inference = torch, mmdet_apis.inference_detector
        self.model = mmdet_apis.init_detector(str(config_path), str(checkpoint_path),
                                              device=device)
        if object_names_path is not None:
            names = Path(object_names_path).read_text().splitlines()
            self.classes = tuple(n.strip() for n in names if n.strip())
        else:
            self.classes = GENEVAL_OBJECT_NAMES
        detector_classes = getattr(self.model, "CLASSES", None)
        if not self.classes or (detector_classes and len(detector_classes) != len(self.classes)):
            raise ValueError(f"Mask2FormerDetector: {len(self.classes)} class names for a "
                             f"detector with {len(detector_classes or ())} classes "
                             f"(object_names_path {object_names_path!r})")
        self.clip, _, self.transform = open_clip.create_model_and_transforms(
            clip_arch, pretrained=str(clip_weights_path), device=device)
        self.clip.eval()
        self.tokenizer = open_clip.get_tokenizer(clip_arch)
        self._color_heads: dict[str, object] = {}

    def _color_head(self, class_name: str):
        """Zero-shot colour classifier for one class (clip_benchmark's zero_shot_classifier)."""
        if class_name not in self._color_heads:
            torch = self._torch
            templates = [f"a photo of a {{c}} {class_name}", f"a photo of a {{c}}-colored "
                         f"{class_name}", "a photo of a {c} object"]
            with torch.no_grad():
                weights = []
                for color in GENEVAL_COLORS:
                    tokens = self.tokenizer([t.format(c=color) for t in templates]).to(self.device)
                    emb = self.clip.encode_text(tokens)
                    emb = emb / emb.norm(dim=-1, keepdim=True)
                    emb = emb.mean(dim=0)
                    weights.append(emb / emb.norm())
            self._color_heads[class_name] = torch.stack(weights, dim=1)  # (D, 10)
        return self._color_heads[class_name]

    def _colors(self, image: np.ndarray, boxes: Sequence, masks: Sequence,
                class_name: str) -> list[str]:
        from PIL import Image

        torch = self._torch
        pil, blank = Image.fromarray(image), Image.new("RGB", image.shape[1::-1], "#999")
        crops = []
        for box, mask in zip(boxes, masks, strict=True):
            crop = pil if mask is None else Image.composite(pil, blank, Image.fromarray(mask))
            crops.append(self.transform(crop.crop(tuple(float(v) for v in box[:4]))))
        with torch.no_grad():
            feats = self.clip.encode_image(torch.stack(crops).to(self.device))
            feats = feats / feats.norm(dim=-1, keepdim=True)
            pred = (feats @ self._color_head(class_name)).argmax(dim=1)
        return [GENEVAL_COLORS[int(i)] for i in pred]

    def __call__(self, image: np.ndarray) -> list[Detection]:
        image = np.ascontiguousarray(image[..., :3])
        result = self._inference(self.model, image[..., ::-1].copy())  # mmdet reads BGR arrays
        if not isinstance(result, tuple | list):
            raise TypeError("Mask2FormerDetector expects mmdet 2.x results ((bbox, segm) lists);"
                            f" got {type(result).__name__} (mmdet 3.x is not supported)")
        bbox = result[0] if isinstance(result, tuple) else result
        segm = result[1] if isinstance(result, tuple) and len(result) > 1 else None
        found: list[Detection] = []
        for index, class_name in enumerate(self.classes):
            rows = np.asarray(bbox[index])
            if len(rows) == 0:
                continue
            # Most confident first, as GenEval keeps them; only its first 16 can ever be used.
            order = np.argsort(rows[:, 4])[::-1]
            keep = order[rows[order, 4] > self.min_score][:self.max_objects]
            if len(keep) == 0:
                continue
            masks = [None if segm is None else segm[index][k] for k in keep]
            colors = self._colors(image, rows[keep], masks, class_name)
            found += [Detection(class_name, float(rows[k, 4]), tuple(map(float, rows[k, :4])), c)
                      for k, c in zip(keep, colors, strict=True)]
        return found


def _require(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ModuleNotFoundError(f"Mask2FormerDetector needs {what}, which is not installed "
                                  f"({err})") from err


DETECTORS: dict[str, Callable[..., Detector]] = {"shapes": ShapesDetector,
                                                  "mask2former": Mask2FormerDetector}


def build_detector(name: str = "shapes", **kwargs) -> Detector:
    """A detector by name: ``shapes`` (default, offline) or ``mask2former`` (GenEval's)."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; expected one of {sorted(DETECTORS)}")
    return DETECTORS[name](**kwargs)
