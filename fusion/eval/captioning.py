"""Captioning metrics on ShapesWorld: parse what a caption names and check it against the scene.

A caption is read as a list of object mentions, each ``[number] [colour] class``, in any
sentence around them: "a photo of a red circle and two blue squares", "an orange star, three
triangles", "1 green diamond". A mention without a number is one object when the class is
singular and two when it is plural ("circles"); a mention without a colour has colour None.
Relations ("left of", "above") and other words are ignored.

Scores against the ground-truth scenes (:func:`score_captions`):

* ``exact_match``: the caption names exactly the scene's multiset of (colour, class);
* ``class_accuracy``: it names exactly the scene's multiset of classes (colours ignored);
* ``object_precision`` / ``object_recall``: over all images, (colour, class) objects named
  that are in the scene / scene objects that are named (multiset overlap);
* ``single_object_accuracy``: on single-object scenes, the caption names that one object's
  class *and* colour and nothing else -- the "right class and colour" figure;
* ``single_object_class_accuracy``: the same, colours ignored.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from fusion.data.shapes import COLORS, PLURALS, SHAPES, Scene

_NUMBERS = {"no": 0, "zero": 0, "a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3, "four": 4,
            "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
_SINGULAR = {s: s for s in SHAPES} | {p: s for s, p in PLURALS.items()}
_WORD = re.compile(r"[a-z]+|\d+")


def caption_objects(text: str) -> Counter[tuple[str | None, str]]:
    """Objects a caption names: ``Counter({(colour or None, class): count})``."""
    words = _WORD.findall(text.lower())
    found: Counter[tuple[str | None, str]] = Counter()
    for i, word in enumerate(words):
        shape = _SINGULAR.get(word)
        if shape is None:
            continue
        j = i - 1
        color = words[j] if j >= 0 and words[j] in COLORS else None
        if color is not None:
            j -= 1
        number = None
        if j >= 0:
            number = int(words[j]) if words[j].isdigit() else _NUMBERS.get(words[j])
        if number is None:
            number = 1 if word == shape else 2  # bare plural: "circles" means at least two
        if number > 0:
            found[(color, shape)] += number
    return found


def scene_objects(scene: Scene) -> Counter[tuple[str | None, str]]:
    """A scene's objects as ``Counter({(colour, class): count})``, the caption's key order."""
    return Counter((color, shape) for shape, color in scene.counts().elements())


def _classes(objects: Counter) -> Counter[str]:
    out: Counter[str] = Counter()
    for (_, shape), n in objects.items():
        out[shape] += n
    return out


def score_captions(captions: Sequence[str], scenes: Sequence[Scene]) -> dict[str, float | int]:
    """Caption scores against ground-truth scenes (see the module docstring)."""
    if len(captions) != len(scenes):
        raise ValueError(f"got {len(captions)} captions for {len(scenes)} scenes")
    if not scenes:
        raise ValueError("no captions to score")
    exact = classes = named_ok = named = truth_total = truth_named = 0
    single = single_ok = single_class_ok = 0
    for caption, scene in zip(captions, scenes, strict=True):
        said, truth = caption_objects(caption), scene_objects(scene)
        exact += said == truth
        classes += _classes(said) == _classes(truth)
        overlap = sum((said & truth).values())
        named_ok += overlap
        named += sum(said.values())
        truth_named += overlap
        truth_total += sum(truth.values())
        if len(scene.objects) == 1:
            single += 1
            single_ok += said == truth
            single_class_ok += _classes(said) == _classes(truth)
    n = len(scenes)
    return {
        "images": n,
        "exact_match": exact / n,
        "class_accuracy": classes / n,
        "object_precision": named_ok / named if named else 0.0,
        "object_recall": truth_named / truth_total if truth_total else 0.0,
        "single_object_images": single,
        "single_object_accuracy": single_ok / single if single else float("nan"),
        "single_object_class_accuracy": single_class_ok / single if single else float("nan"),
    }
