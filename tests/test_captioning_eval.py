"""Captioning metrics: the caption parser on hand-written captions and scores against scenes."""

import math
from collections import Counter

import pytest

from fusion.data.shapes import Scene, ShapeObject, ShapesWorld, describe
from fusion.eval.captioning import caption_objects, scene_objects, score_captions


@pytest.mark.parametrize("caption,expected", [
    ("a photo of a red circle", {("red", "circle"): 1}),
    ("A photo of an orange star.", {("orange", "star"): 1}),
    ("a photo of a circle", {(None, "circle"): 1}),
    ("a photo of three triangles", {(None, "triangle"): 3}),
    ("two blue squares and a green diamond", {("blue", "square"): 2, ("green", "diamond"): 1}),
    ("an orange star, two red circles and a blue square",
     {("orange", "star"): 1, ("red", "circle"): 2, ("blue", "square"): 1}),
    ("a photo of a red circle left of a blue square", {("red", "circle"): 1,
                                                      ("blue", "square"): 1}),
    ("4 white stars", {("white", "star"): 4}),
    ("one black diamond above one pink triangle", {("black", "diamond"): 1,
                                                   ("pink", "triangle"): 1}),
    ("some purple circles", {("purple", "circle"): 2}),  # bare plural: at least two
    ("no squares, just a brown circle", {("brown", "circle"): 1}),
    ("a red photo of nothing", {}),
    ("", {}),
])
def test_caption_objects(caption, expected):
    assert caption_objects(caption) == Counter(expected)


def _scene(*objects: tuple[str, str]) -> Scene:
    return Scene(64, tuple(ShapeObject(shape, color, (4.0 + 20 * i, 4.0, 16.0 + 20 * i, 16.0))
                           for i, (color, shape) in enumerate(objects)))


def test_scene_objects_use_colour_class_order():
    assert scene_objects(_scene(("red", "circle"), ("red", "circle"), ("blue", "star"))) == \
        Counter({("red", "circle"): 2, ("blue", "star"): 1})


def test_score_captions():
    scenes = [_scene(("red", "circle")), _scene(("blue", "star")), _scene(("green", "square")),
              _scene(("red", "circle"), ("blue", "square"))]
    captions = ["a red circle",  # right
                "a yellow star",  # right class, wrong colour
                "a green square and a circle",  # an extra object
                "a red circle and a blue square"]  # right
    out = score_captions(captions, scenes)
    assert out["images"] == 4 and out["single_object_images"] == 3
    assert out["exact_match"] == 0.5
    assert out["class_accuracy"] == 0.75
    assert out["single_object_accuracy"] == pytest.approx(1 / 3)
    assert out["single_object_class_accuracy"] == pytest.approx(2 / 3)
    assert out["object_precision"] == pytest.approx(4 / 6)  # 6 named, 4 right
    assert out["object_recall"] == pytest.approx(4 / 5)  # 5 in the scenes, 4 named


def test_ground_truth_descriptions_score_perfectly():
    world = ShapesWorld(seed=0)
    scenes = [world.scene(i) for i in range(200)]
    out = score_captions([describe(s) for s in scenes], scenes)
    assert out["exact_match"] == 1.0 and out["single_object_accuracy"] == 1.0
    # the colors-tag prompt names the class and colour of a single-object scene
    singles = [i for i in range(200) if len(scenes[i].objects) == 1]
    colors = [world.prompts(i)["colors"]["prompt"] for i in singles]
    assert score_captions(colors, [scenes[i] for i in singles])["exact_match"] == 1.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="2 captions for 1 scenes"):
        score_captions(["a", "b"], [_scene(("red", "circle"))])
    with pytest.raises(ValueError, match="no captions"):
        score_captions([], [])
    assert math.isnan(score_captions(["x"], [_scene(("red", "circle"),
                                                    ("red", "square"))])[
        "single_object_accuracy"])
