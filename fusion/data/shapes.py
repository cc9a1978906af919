"""ShapesWorld: a procedural world of coloured shapes with exact, offline ground truth.

Every scene is a pure function of ``(seed, index)``: no files, random access, identical on every
machine. ShapesWorld gives each task in fusion a checkable answer:

* text -> image: captions in GenEval's phrasing for its six tags (Ghosh et al. 2023,
  arXiv:2310.11513), so generated images can be scored with GenEval's own rules;
* image -> text: a free-form description of the whole scene;
* editing: recolour / move / add / remove triplets with instruction text;
* a detector (:func:`detect`) that inverts the renderer, used by evaluation and edit checks.

Images are ``uint8`` arrays of shape (S, S, 3) (S = ``size``, 64 by default). Boxes are
``(x0, y0, x1, y1)`` in pixels, x to the right and y downwards, as in GenEval.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

# GenEval's ten colour names (geneval/evaluation/evaluate_images.py), with RGB values picked so
# that all ten are far from each other and from the background below.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (245, 230, 20),
    "green": (20, 160, 50),
    "blue": (30, 70, 230),
    "purple": (130, 40, 190),
    "pink": (255, 140, 200),
    "brown": (110, 60, 20),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}
# Mid grey keeps both black and white (and every saturated colour) clearly visible.
BACKGROUND: tuple[int, int, int] = (150, 150, 150)

# Outline of each class inside the unit box; every outline touches all four sides so that an
# object's bbox is exactly its drawn extent (the detector measures that extent).
_STAR = [
    (0.5 + 0.5 * math.sin(math.pi * k / 5) * (1.0 if k % 2 == 0 else 0.42),
     0.5 - 0.5 * math.cos(math.pi * k / 5) * (1.0 if k % 2 == 0 else 0.42))
    for k in range(10)
]
_STAR_Y0, _STAR_Y1 = min(p[1] for p in _STAR), max(p[1] for p in _STAR)
_STAR_X0, _STAR_X1 = min(p[0] for p in _STAR), max(p[0] for p in _STAR)
_OUTLINES: dict[str, list[tuple[float, float]] | None] = {
    "circle": None,  # drawn as an ellipse
    "square": [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)],
    "triangle": [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)],
    "diamond": [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)],
    "star": [((x - _STAR_X0) / (_STAR_X1 - _STAR_X0), (y - _STAR_Y0) / (_STAR_Y1 - _STAR_Y0))
             for x, y in _STAR],
}
SHAPES: tuple[str, ...] = tuple(_OUTLINES)
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
# GenEval's six tags, in the order of its metadata file.
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position",
                         "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
EDIT_KINDS: tuple[str, ...] = ("recolor", "move", "add", "remove")
_SUPERSAMPLE = 4  # render at 4x and box-filter down: anti-aliased edges
# GenEval's position rule: offsets smaller than 0.1 * (size A + size B) do not count.
POSITION_MARGIN = 0.1


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene. ``bbox`` is (x0, y0, x1, y1) in pixels."""

    shape: str
    color: str
    bbox: tuple[float, float, float, float]
    score: float = 1.0  # detector confidence; 1 for ground truth

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def size(self) -> float:
        return self.bbox[2] - self.bbox[0]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    size: int
    objects: tuple[ShapeObject, ...]

    def counts(self) -> Counter:
        """Multiset of (shape, colour): what "the same objects" means for attribute checks."""
        return Counter((o.shape, o.color) for o in self.objects)


@dataclass(frozen=True)
class ShapesSample:
    index: int
    scene: Scene
    image: np.ndarray  # (S, S, 3) uint8
    captions: dict[str, str]  # GenEval tag -> prompt (only the tags that apply) + "description"
    prompts: dict[str, dict]  # GenEval tag -> metadata record {"tag", "include", ["exclude"], "prompt"}


@dataclass(frozen=True)
class ShapesEdit:
    kind: str
    source: Scene
    instruction: str
    target: Scene


@dataclass(frozen=True)
class ShapesStory:
    """A scene and the edits made to it one after another (:meth:`ShapesWorld.story`):
    ``instructions[k]`` turns ``scenes[k]`` into ``scenes[k + 1]``."""

    scenes: tuple[Scene, ...]
    instructions: tuple[str, ...]

    @property
    def texts(self) -> tuple[str, ...]:
        """The text before each image (:func:`story_texts`)."""
        return story_texts(self)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def _draw(draw: ImageDraw.ImageDraw, shape: str, box: Sequence[float], fill) -> None:
    x0, y0, x1, y1 = box
    outline = _OUTLINES[shape]
    if outline is None:
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    else:
        w, h = x1 - x0, y1 - y0
        draw.polygon([(x0 + u * w, y0 + v * h) for u, v in outline], fill=fill)


def render(scene: Scene) -> np.ndarray:
    """Scene -> (S, S, 3) uint8 image, anti-aliased by 4x supersampling and a box filter."""
    k = _SUPERSAMPLE
    canvas = Image.new("RGB", (scene.size * k, scene.size * k), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        # PIL fills pixel centres inside [x0, x1 - 1]; subtract one supersample pixel.
        box = [c * k for c in obj.bbox]
        box[2] -= 1
        box[3] -= 1
        _draw(draw, obj.shape, box, COLORS[obj.color])
    return np.asarray(canvas.reduce(k))


@lru_cache(maxsize=16384)
def _template(shape: str, width_q: int, height_q: int, frac_x_q: int,
              frac_y_q: int) -> tuple[np.ndarray, float]:
    """Visible-shape map (see :func:`_visible`) of ``shape`` rendered exactly like :func:`render`
    in a box of ``width_q`` x ``height_q`` quarter pixels whose corner lies ``frac_x_q``,
    ``frac_y_q`` quarter pixels into the first pixel of the returned array; and its sum."""
    k = _SUPERSAMPLE
    win_w, win_h = -(-(frac_x_q + width_q) // k), -(-(frac_y_q + height_q) // k)
    canvas = Image.new("L", (win_w * k, win_h * k), 0)
    box = [frac_x_q, frac_y_q, frac_x_q + width_q - 1, frac_y_q + height_q - 1]
    _draw(ImageDraw.Draw(canvas), shape, box, 255)
    tpl = _visible(np.asarray(canvas.reduce(k), dtype=np.float32) / 255.0)
    return tpl, float(tpl.sum())


@lru_cache(maxsize=16)
def _unit_moments(shape: str) -> tuple[float, float, float, float, float]:
    """Area, centroid (x, y) and central second moments (x, y) of ``shape`` in the unit box."""
    n = 1024
    canvas = Image.new("L", (n, n), 0)
    _draw(ImageDraw.Draw(canvas), shape, [0, 0, n - 1, n - 1], 255)
    cover = np.asarray(canvas, dtype=np.float64) / 255.0
    c = (np.arange(n) + 0.5) / n
    px, py = cover.sum(axis=0), cover.sum(axis=1)
    mass = px.sum()
    mx, my = float(px @ c / mass), float(py @ c / mass)
    vx, vy = float(px @ (c - mx) ** 2 / mass), float(py @ (c - my) ** 2 / mass)
    return float(mass / n**2), mx, my, vx, vy


# --------------------------------------------------------------------------------------------
# Captions in GenEval's phrasing
# --------------------------------------------------------------------------------------------
def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def relative_position(box_a: Sequence[float], box_b: Sequence[float],
                      margin: float = POSITION_MARGIN) -> set[str]:
    """Relations of A relative to B by GenEval's rule.

    The centre offset is shrunk by ``margin * (size A + size B)`` per axis; what is left,
    divided by the length of the raw offset, must exceed 0.5 along an axis for that relation.
    """
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = (a[2:] - a[:2]) + (b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - margin * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


def describe(scene: Scene) -> str:
    """Free-form description for captioning, objects grouped by (colour, shape), left to right."""
    if not scene.objects:
        return "an empty scene"
    groups: dict[tuple[str, str], int] = {}
    for obj in sorted(scene.objects, key=lambda o: o.center[0]):
        groups[(obj.color, obj.shape)] = groups.get((obj.color, obj.shape), 0) + 1
    parts = [f"{article(c)} {c} {s}" if n == 1 else f"{NUMBER_WORDS[n]} {c} {PLURALS[s]}"
             for (c, s), n in groups.items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def story_texts(story: ShapesStory) -> tuple[str, ...]:
    """The text before each image of an interleaved ShapesWorld document. The first names how
    many images follow and describes the first scene ("three photos of a red circle and a blue
    square"); each later one is the edit and the scene it makes ("make the red circle green: a
    green circle and a blue square"), so every image is fully described by the text just
    before it, after its last colon (:func:`story_description`)."""
    first = f"{NUMBER_WORDS[len(story.scenes)]} photos of {describe(story.scenes[0])}"
    return (first, *(f"{instruction}: {describe(scene)}"
                     for instruction, scene in zip(story.instructions, story.scenes[1:],
                                                   strict=True)))


def story_description(text: str) -> str:
    """The scene description inside one of :func:`story_texts`' texts: what follows the last
    colon (the whole text when it has none)."""
    return text.rsplit(":", 1)[-1]


def geneval_prompts(scene: Scene, rng: random.Random) -> dict[str, dict]:
    """The GenEval metadata records (tag, include, exclude, prompt) that this scene satisfies."""
    objs = scene.objects
    out: dict[str, dict] = {}
    if len(objs) == 1:
        (o,) = objs
        out["single_object"] = {"tag": "single_object",
                                "include": [{"class": o.shape, "count": 1}],
                                "prompt": f"a photo of {article(o.shape)} {o.shape}"}
        out["colors"] = {"tag": "colors",
                         "include": [{"class": o.shape, "count": 1, "color": o.color}],
                         "prompt": f"a photo of {article(o.color)} {o.color} {o.shape}"}
    shapes = {o.shape for o in objs}
    if len(objs) >= 2 and len(shapes) == 1:
        s, n = objs[0].shape, len(objs)
        out["counting"] = {"tag": "counting", "include": [{"class": s, "count": n}],
                           "exclude": [{"class": s, "count": n + 1}],
                           "prompt": f"a photo of {NUMBER_WORDS[n]} {PLURALS[s]}"}
    if len(objs) == 2 and len(shapes) == 2:
        a, b = objs
        out["two_object"] = {"tag": "two_object",
                             "include": [{"class": a.shape, "count": 1},
                                         {"class": b.shape, "count": 1}],
                             "prompt": f"a photo of {article(a.shape)} {a.shape} and "
                                       f"{article(b.shape)} {b.shape}"}
        out["color_attr"] = {"tag": "color_attr",
                             "include": [{"class": a.shape, "count": 1, "color": a.color},
                                         {"class": b.shape, "count": 1, "color": b.color}],
                             "prompt": f"a photo of {article(a.color)} {a.color} {a.shape} and "
                                       f"{article(b.color)} {b.color} {b.shape}"}
        # GenEval: include[1] carries ["relation", 0]: include[1] is <relation> include[0].
        relations = sorted(relative_position(a.bbox, b.bbox))
        if relations:
            rel = rng.choice(relations)
            out["position"] = {"tag": "position",
                               "include": [{"class": b.shape, "count": 1},
                                           {"class": a.shape, "count": 1,
                                            "position": [rel, 0]}],
                               "prompt": f"a photo of {article(a.shape)} {a.shape} {rel} "
                                         f"{article(b.shape)} {b.shape}"}
    return {tag: out[tag] for tag in TAGS if tag in out}


# --------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------
@dataclass
class ShapesWorld:
    """Deterministic random-access scenes: ``world[i]`` is the same everywhere for a seed.

    Args:
        seed: world seed; ``(seed, index)`` fixes everything about a scene.
        size: image side in pixels (>= 32).
        min_objects, max_objects: objects per scene (1..4 by default).
        same_shape_share: share of multi-object scenes whose objects share one class, so that
            GenEval's counting prompts get enough examples.
    """

    seed: int = 0
    size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    same_shape_share: float = 0.3
    min_object_frac: float = 0.19
    max_object_frac: float = 0.34
    _gap: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.size < 32:
            raise ValueError(f"ShapesWorld size must be >= 32 pixels, got {self.size}")
        if not 1 <= self.min_objects <= self.max_objects <= 4:
            raise ValueError("ShapesWorld needs 1 <= min_objects <= max_objects <= 4, got "
                             f"{self.min_objects}..{self.max_objects}")
        # Objects are at least this far apart so anti-aliased edges never touch.
        self._gap = max(3.0, self.size / 21)

    def _rng(self, index: int, stream: str = "scene") -> random.Random:
        if index < 0:
            raise IndexError(f"ShapesWorld index must be >= 0, got {index}")
        # Python's Random seeded by a string is cheap and stable across platforms/versions.
        return random.Random(f"shapesworld/{self.seed}/{stream}/{index}")

    # -- placement ------------------------------------------------------------------------
    def _free_box(self, rng: random.Random, taken: Sequence[tuple[float, ...]],
                  side: float | None = None, tries: int = 200) -> tuple[float, ...] | None:
        lo, hi = self.min_object_frac * self.size, self.max_object_frac * self.size
        margin = 1.0
        for _ in range(tries):
            s = side if side is not None else round(rng.uniform(lo, hi) * 4) / 4
            x0 = round(rng.uniform(margin, self.size - margin - s) * 4) / 4
            y0 = round(rng.uniform(margin, self.size - margin - s) * 4) / 4
            box = (x0, y0, x0 + s, y0 + s)
            if all(not _boxes_close(box, t, self._gap) for t in taken):
                return box
        return None

    def scene(self, index: int) -> Scene:
        rng = self._rng(index)
        n = rng.randint(self.min_objects, self.max_objects)
        one_shape = rng.choice(SHAPES) if n > 1 and rng.random() < self.same_shape_share else None
        objects: list[ShapeObject] = []
        for _ in range(n):
            box = self._free_box(rng, [o.bbox for o in objects])
            if box is None:  # crowded: keep the objects placed so far (never below 1)
                break
            objects.append(ShapeObject(one_shape or rng.choice(SHAPES), rng.choice(list(COLORS)),
                                       box))
        return Scene(self.size, tuple(objects))

    def image(self, index: int) -> np.ndarray:
        return render(self.scene(index))

    def prompts(self, index: int) -> dict[str, dict]:
        """GenEval metadata records this scene satisfies (no rendering needed)."""
        return geneval_prompts(self.scene(index), self._rng(index, "caption"))

    def captions(self, index: int, scene: Scene | None = None) -> tuple[dict[str, str], dict]:
        """(captions by tag, GenEval metadata) of a scene, without rendering it."""
        scene = scene or self.scene(index)
        prompts = geneval_prompts(scene, self._rng(index, "caption"))
        captions = {tag: rec["prompt"] for tag, rec in prompts.items()}
        captions["description"] = describe(scene)
        return captions, prompts

    def sample(self, index: int) -> ShapesSample:
        scene = self.scene(index)
        captions, prompts = self.captions(index, scene)
        return ShapesSample(index, scene, render(scene), captions, prompts)

    __getitem__ = sample

    # -- edits ----------------------------------------------------------------------------
    def edit(self, index: int, kind: str | None = None) -> ShapesEdit:
        """A (source scene, instruction, target scene) triplet.

        ``kind`` is one of ``EDIT_KINDS`` or None (drawn from the index). The edited object is
        always named unambiguously (its colour+shape is unique in the scene). When the asked kind
        is impossible for this scene (remove from a one-object scene, add to a full one, move an
        object that has no free space), the next kind in ``EDIT_KINDS`` order is used.
        """
        if kind is not None and kind not in EDIT_KINDS:
            raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")
        return self._edit_scene(self.scene(index), self._rng(index, "edit"), kind)

    def _edit_scene(self, source: Scene, rng: random.Random, kind: str | None) -> ShapesEdit:
        """:meth:`edit` of any scene: ``kind``, or the next possible one in ``EDIT_KINDS``."""
        start = EDIT_KINDS.index(kind) if kind else rng.randrange(len(EDIT_KINDS))
        for k in range(len(EDIT_KINDS)):
            result = self._try_edit(EDIT_KINDS[(start + k) % len(EDIT_KINDS)], source, rng)
            if result is not None:
                return result
        raise AssertionError("no edit possible")  # recolor always applies

    def story(self, index: int, images: int) -> ShapesStory:
        """Scene ``index`` edited ``images - 1`` times in a row, each edit of a kind drawn from
        the index (as :meth:`edit` draws it) and applied to the previous edit's result: the
        content of an interleaved document (:func:`story_texts`)."""
        if images < 1:
            raise ValueError(f"a story has at least one image, got {images}")
        rng = self._rng(index, f"story{images}")
        scenes, instructions = [self.scene(index)], []
        for _ in range(images - 1):
            step = self._edit_scene(scenes[-1], rng, None)
            scenes.append(step.target)
            instructions.append(step.instruction)
        return ShapesStory(tuple(scenes), tuple(instructions))

    def _try_edit(self, kind: str, src: Scene, rng: random.Random) -> ShapesEdit | None:
        counts = src.counts()
        unique = [i for i, o in enumerate(src.objects) if counts[(o.shape, o.color)] == 1]
        objs = list(src.objects)
        if kind == "add":
            if len(objs) >= self.max_objects:
                return None
            box = self._free_box(rng, [o.bbox for o in objs])
            if box is None:
                return None
            new = ShapeObject(rng.choice(SHAPES), rng.choice(list(COLORS)), box)
            return ShapesEdit(kind, src, f"add {article(new.color)} {new.name}",
                              Scene(src.size, tuple(objs + [new])))
        if not unique:
            if kind != "recolor":
                return None
            # Every object has a twin: recolour one whole (colour, shape) group, named in plural.
            color, shape = rng.choice(sorted({(o.color, o.shape) for o in objs}))
            new_color = rng.choice([c for c in COLORS if c != color])
            objs = [replace(o, color=new_color) if (o.color, o.shape) == (color, shape) else o
                    for o in objs]
            return ShapesEdit(kind, src, f"make the {color} {PLURALS[shape]} {new_color}",
                              Scene(src.size, tuple(objs)))
        i = rng.choice(unique)
        obj = objs[i]
        if kind == "recolor":
            color = rng.choice([c for c in COLORS if c != obj.color])
            objs[i] = replace(obj, color=color)
            return ShapesEdit(kind, src, f"make the {obj.name} {color}", Scene(src.size, tuple(objs)))
        if kind == "remove":
            if len(objs) < 2:
                return None
            del objs[i]
            return ShapesEdit(kind, src, f"remove the {obj.name}", Scene(src.size, tuple(objs)))
        if kind == "move":
            step = self.size / 4
            directions = {"left": (-step, 0), "right": (step, 0), "up": (0, -step),
                          "down": (0, step)}
            names = list(directions)
            rng.shuffle(names)
            others = [o.bbox for j, o in enumerate(objs) if j != i]
            for d in names:
                dx, dy = directions[d]
                x0, y0, x1, y1 = obj.bbox
                box = (x0 + dx, y0 + dy, x1 + dx, y1 + dy)
                inside = box[0] >= 1 and box[1] >= 1 and box[2] <= self.size - 1 and \
                    box[3] <= self.size - 1
                if inside and all(not _boxes_close(box, t, self._gap) for t in others):
                    objs[i] = replace(obj, bbox=box)
                    return ShapesEdit(kind, src, f"move the {obj.name} {d}",
                                      Scene(src.size, tuple(objs)))
            return None
        raise ValueError(kind)


def _boxes_close(a: Sequence[float], b: Sequence[float], gap: float) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or
                b[3] + gap <= a[1])


# --------------------------------------------------------------------------------------------
# Detector: inverts the renderer
# --------------------------------------------------------------------------------------------
_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (10, 3)
_BG = np.array(BACKGROUND, dtype=np.float32)
_FG_THRESHOLD = 40.0  # RGB distance from the background that counts as "ink"
# Coverage is a least-squares projection onto (colour - background) in YCbCr with the chroma
# channels down-weighted: JPEG (4:2:0) and most codecs keep chroma at half resolution, so edge
# geometry lives in luma. Colours with little luma contrast (orange) still fall back on chroma.
_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5],
                 [0.5, -0.418688, -0.081312]], dtype=np.float32)
_CHROMA_WEIGHT = 0.1
_ALPHA_METRIC = _YCC.T @ np.diag([1.0, _CHROMA_WEIGHT, _CHROMA_WEIGHT]).astype(np.float32) @ _YCC
# Shapes are compared through the "visible" coverage clip((a - 0.25) / 0.5): the faint halo that
# blur, JPEG ringing or chroma bleeding leave around an edge (a < 0.25) carries no shape, while
# heavy blur that fills a star's notches past half coverage is a real loss of shape.
_VISIBLE = (0.25, 0.75)
# A class whose second moment, at the observed mass, exceeds the observed one by more than 3 %
# cannot explain the object (see _classify_component).
_MIN_SPREAD_RATIO = 0.97


def _visible(alpha: np.ndarray) -> np.ndarray:
    lo, hi = _VISIBLE
    return np.clip((alpha - lo) / (hi - lo), 0.0, 1.0)


def _label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected component labels (0 = background) by iterated max-propagation.

    Each pass spreads the largest label to 8-neighbours inside the mask; components in
    ShapesWorld images are small, so this converges in tens of vectorised passes and needs no
    scipy.
    """
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1, dtype=np.int32).reshape(h, w), 0)
    while True:
        padded = np.pad(labels, 1)
        spread = labels.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                np.maximum(spread, padded[dy:dy + h, dx:dx + w], out=spread)
        spread = np.where(mask, spread, 0)
        if np.array_equal(spread, labels):
            break
        labels = spread
    uniq, inverse = np.unique(labels, return_inverse=True)
    labels = inverse.reshape(h, w).astype(np.int32)  # 0 stays 0 because it is the minimum
    return labels, len(uniq) - (1 if uniq[0] == 0 else 0)


def detect(image: np.ndarray | Image.Image, min_area: int = 6,
           min_score: float = 0.3) -> list[ShapeObject]:
    """Find ShapesWorld objects in an image: class, colour, bbox and a confidence score.

    Pipeline: pixels far from the background are ink; 8-connected ink components are object
    candidates; each candidate's colour is the palette entry nearest to its core pixels, and its
    coverage map (alpha) is the projection of the pixels onto colour - background. Each class
    then gets its own box from the coverage moments (mass, centroid, spread), is ruled out when
    it is more spread out than the object, and is scored by the soft IoU of its rendered
    template with the visible coverage; the best class wins and its IoU is the detection score.
    On images that are not clean renders (noise, blur, samples from a model) it reports whatever
    passes ``min_score``; it never raises on a well-formed RGB image.

    Why moments and not the extent: the first version boxed each object by the first/last rows
    and columns with alpha > 0.02 and fitted every class in that one box. Any faint halo (blur,
    JPEG ringing, chroma bleeding) inflated that box by 1-2.5 px per side, and a square fitted in
    a too large box matches a circle better (they differ only in the corners): at ~35 dB PSNR
    (Gaussian blur sigma 0.8 / JPEG quality 95 / 90) it got 89.5 % / 81.5 % / 74.5 % of 400
    scenes right, mostly square -> circle, against 100 % on clean renders. Mass and centroid are
    unchanged by blur and barely moved by ringing, so the moment boxes stay exact: now 100 % /
    100 % / 99.8 % (JPEG 75: 64.5 % -> 97 %).

    Real defects stay defects. Blur (any non-negative kernel) and noise only ever add to the
    second moment, while cutting a star's tips, filling its notches (pentagon, fat star) or
    rounding a square's corners takes from it: a class whose second moment at the observed mass
    is more than 3 % above the object's is ruled out (clean, blurred, JPEG and noisy renders of
    the true class: >= 0.996 of it; a star with tips cut at 0.8 R: <= 0.94). And the IoU
    compares the visible shape, clip((alpha - 0.25) / 0.5), so a star blurred into a blob
    (sigma 2) or a square rounded with corner radius >= 40 % of its side reads as a circle. The
    price: a small star (< 15 px) in orange, the one colour with no luma contrast, is blurred
    by JPEG's half-resolution chroma almost as much as by a blur of sigma 1.2, and about 1 in 5
    of those reads as a circle after JPEG 90.

    Args:
        image: (H, W, 3) uint8 array (or a PIL image); grey/RGBA inputs are converted.
    """
    arr = _as_rgb_array(image).astype(np.float32)
    dist = np.linalg.norm(arr - _BG, axis=-1)
    labels, n = _label_components(dist > _FG_THRESHOLD)
    found: list[ShapeObject] = []
    for comp in range(1, n + 1):
        ys, xs = np.nonzero(labels == comp)
        if len(ys) < min_area:
            continue
        obj = _classify_component(arr, dist, ys, xs, labels, comp)
        if obj is not None and obj.score >= min_score:
            found.append(obj)
    found.sort(key=lambda o: (o.bbox[1], o.bbox[0]))
    return found


def _classify_component(arr: np.ndarray, dist: np.ndarray, ys: np.ndarray, xs: np.ndarray,
                        labels: np.ndarray, comp: int) -> ShapeObject | None:
    # Colour: the core of the blob (pixels at least 80 % as far from bg as the farthest one)
    # holds the unblended fill colour in a clean render.
    d = dist[ys, xs]
    core = d >= 0.8 * d.max()
    rgb = np.median(arr[ys[core], xs[core]], axis=0)
    ci = int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=-1)))
    color_vec = _PALETTE[ci] - _BG
    # Coverage window around the blob, one pixel of margin; other blobs' pixels are not ours.
    h, w = dist.shape
    y0, y1 = max(ys.min() - 1, 0), min(ys.max() + 2, h)
    x0, x1 = max(xs.min() - 1, 0), min(xs.max() + 2, w)
    proj = _ALPHA_METRIC @ color_vec
    alpha = np.clip((arr[y0:y1, x0:x1] - _BG) @ (proj / float(color_vec @ proj)), 0.0, 1.0)
    other = labels[y0:y1, x0:x1]
    alpha[(other != 0) & (other != comp)] = 0.0
    mass = float(alpha.sum())
    if mass < 1:
        return None
    # Coverage moments: mass, centroid, per-axis variance (pixel i spans [i, i + 1]).
    px, py = alpha.sum(axis=0), alpha.sum(axis=1)
    cx, cy = np.arange(alpha.shape[1]) + 0.5, np.arange(alpha.shape[0]) + 0.5
    mx, my = float(px @ cx) / mass, float(py @ cy) / mass
    vx = max(float(px @ (cx - mx) ** 2) / mass, 1e-3)
    vy = max(float(py @ (cy - my) ** 2) / mass, 1e-3)
    visible = _visible(alpha)
    visible_sum = float(visible.sum())
    k = _SUPERSAMPLE
    best: tuple[str, float, tuple[float, float, float, float]] | None = None
    fallback = None
    for shape in SHAPES:
        # This class's box: its area matches the mass, its centroid the centroid and its
        # aspect the variance ratio.
        area, ux, uy, uvx, uvy = _unit_moments(shape)
        aspect = math.sqrt(vx * uvy / (vy * uvx))  # width / height
        bh = math.sqrt(mass / (area * aspect))
        bw = aspect * bh
        spread = (vx + vy) / (uvx * bw**2 + uvy * bh**2)  # observed / this class's
        wq, hq = max(round(bw * k), 1), max(round(bh * k), 1)
        qx, qy = round((mx - ux * bw) * k), round((my - uy * bh) * k)
        ox, oy = qx // k, qy // k
        tpl, tpl_sum = _template(shape, wq, hq, qx - ox * k, qy - oy * k)
        iou = _soft_iou(visible, visible_sum, tpl, tpl_sum, ox, oy)
        cand = (shape, iou, (qx / k, qy / k, (qx + wq) / k, (qy + hq) / k))
        if spread >= _MIN_SPREAD_RATIO and (best is None or iou > best[1]):
            best = cand
        if fallback is None or iou > fallback[1]:
            fallback = cand
    # The disk is the most compact outline, so the circle is (up to rasterisation) never
    # ruled out; the fallback only guards odd inputs.
    shape, iou, (bx0, by0, bx1, by1) = best or fallback
    if min(bx1 - bx0, by1 - by0) < 2:
        return None
    bbox = (x0 + bx0, y0 + by0, x0 + bx1, y0 + by1)
    return ShapeObject(shape, list(COLORS)[ci], tuple(float(round(v, 2)) for v in bbox),
                       score=round(iou, 4))


def _soft_iou(obs: np.ndarray, obs_sum: float, tpl: np.ndarray, tpl_sum: float, ox: int,
              oy: int) -> float:
    """Soft IoU, sum(min) / sum(max), of ``obs`` and ``tpl`` placed with its corner at (ox, oy)
    of ``obs``; either may extend past the other."""
    oh, ow = obs.shape
    th, tw = tpl.shape
    ya, yb, xa, xb = max(oy, 0), min(oy + th, oh), max(ox, 0), min(ox + tw, ow)
    inter = 0.0
    if yb > ya and xb > xa:
        inter = float(np.minimum(obs[ya:yb, xa:xb], tpl[ya - oy:yb - oy, xa - ox:xb - ox]).sum())
    return inter / max(obs_sum + tpl_sum - inter, 1e-6)


def _as_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"detect() expects an (H, W, 3) image, got shape {image.shape}")
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and image.max(initial=0) <= 1.0:
            image = image * 255.0
        image = np.clip(np.nan_to_num(image), 0, 255).astype(np.uint8)
    return image[..., :3]


def same_objects(a: Scene | Iterable[ShapeObject], b: Scene | Iterable[ShapeObject]) -> bool:
    """True when both hold the same multiset of (class, colour): the attribute-accuracy check."""
    def key(x):
        objs = x.objects if isinstance(x, Scene) else x
        return Counter((o.shape, o.color) for o in objs)
    return key(a) == key(b)


def scene_matches(truth: Scene, found: Sequence[ShapeObject], center_tol: float = 2.0) -> bool:
    """Exact recovery: same classes, colours and counts, each centre within ``center_tol`` px."""
    if not same_objects(truth, found):
        return False
    remaining = list(found)
    for obj in truth.objects:
        best = None
        for cand in remaining:
            if (cand.shape, cand.color) != (obj.shape, obj.color):
                continue
            dist = math.dist(cand.center, obj.center)
            if dist <= center_tol and (best is None or dist < best[0]):
                best = (dist, cand)
        if best is None:
            return False
        remaining.remove(best[1])
    return True
