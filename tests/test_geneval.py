"""GenEval scoring: the official rules on hand-built detections, the folder layout, detectors."""

import collections
import json
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from fusion.data.prompts import PromptRecord, parse_prompt, read_prompts, shapes_prompt_set
from fusion.data.shapes import TAGS, ShapesWorld
from fusion.eval.detectors import (
    Detection,
    Detector,
    Mask2FormerDetector,
    ShapesDetector,
    build_detector,
)
from fusion.eval.geneval import (
    GenEvalRules,
    check_image,
    format_summary,
    keep_detections,
    read_geneval_folder,
    score_geneval,
    score_geneval_folder,
    shapes_ground_truth,
    write_geneval_folder,
)

GENEVAL = Path(__file__).resolve().parents[2] / "shared" / "geneval" / "evaluation_metadata.jsonl"
GENEVAL_NAMES_FILE = GENEVAL.with_name("object_names.txt")
needs_geneval = pytest.mark.skipif(not GENEVAL.exists(),
                                   reason=f"GenEval metadata not found at {GENEVAL}")


def rec(tag, include, exclude=(), prompt="p") -> PromptRecord:
    row = {"tag": tag, "include": list(include), "prompt": prompt}
    if exclude:
        row["exclude"] = list(exclude)
    return parse_prompt(row)


def det(name, score=1.0, box=(10, 10, 20, 20), color="red") -> Detection:
    return Detection(name, score, tuple(float(v) for v in box), color)


def judge(dets, record, rules=None):
    rules = rules or GenEvalRules()
    return check_image(keep_detections(dets, record.tag, rules), record, rules)


# --------------------------------------------------------------------------------------------
# GenEval's own prompt file
# --------------------------------------------------------------------------------------------
@needs_geneval
def test_geneval_prompt_file_parses_and_fits_the_rules():
    prompts = read_prompts(GENEVAL)
    assert len(prompts) == 553
    counts = collections.Counter(p.tag for p in prompts)
    assert [counts[t] for t in TAGS] == [80, 99, 80, 94, 100, 100]
    for p in prompts:
        for j, clause in enumerate(p.include):  # position targets always come earlier
            if "position" in clause:
                assert clause["position"][1] < j
        if p.tag == "counting":  # exact counts via exclude count + 1
            (inc,), (exc,) = p.include, p.exclude
            assert exc == {"class": inc["class"], "count": inc["count"] + 1}


# --------------------------------------------------------------------------------------------
# The rules, one by one
# --------------------------------------------------------------------------------------------
def test_threshold_is_strictly_above_0_3():
    r = rec("single_object", [{"class": "dog", "count": 1}])
    assert judge([det("dog", 0.31)], r)[0]
    ok, reason = judge([det("dog", 0.3)], r)
    assert not ok and reason == "expected dog>=1, found 0"


def test_counting_uses_threshold_0_9_and_is_exact():
    r = rec("counting", [{"class": "cup", "count": 2}], [{"class": "cup", "count": 3}])
    boxes = [(0, 0, 5, 5), (20, 0, 25, 5), (40, 0, 45, 5)]
    assert judge([det("cup", 0.95, boxes[0]), det("cup", 0.91, boxes[1])], r)[0]
    # 0.85 passes 0.3 but not counting's 0.9
    ok, reason = judge([det("cup", 0.95, boxes[0]), det("cup", 0.85, boxes[1])], r)
    assert not ok and reason == "expected cup>=2, found 1"
    # one too many trips the exclude clause
    ok, reason = judge([det("cup", 0.95, b) for b in boxes], r)
    assert not ok and reason == "expected cup<3, found 3"
    # ... but a third cup below 0.9 does not count
    assert judge([det("cup", 0.95, boxes[0]), det("cup", 0.95, boxes[1]),
                  det("cup", 0.89, boxes[2])], r)[0]
    # the same detections under another tag use 0.3
    two = rec("two_object", [{"class": "cup", "count": 2}])
    assert judge([det("cup", 0.95, boxes[0]), det("cup", 0.85, boxes[1])], two)[0]


def test_include_clauses_are_anded_and_exclude_fails_at_count():
    r = rec("two_object", [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}])
    assert judge([det("cat"), det("dog", box=(30, 30, 40, 40))], r)[0]
    ok, reason = judge([det("cat")], r)
    assert not ok and reason == "expected dog>=1, found 0"
    ex = rec("single_object", [{"class": "cat", "count": 1}], [{"class": "dog", "count": 1}])
    ok, reason = judge([det("cat"), det("dog", box=(30, 30, 40, 40))], ex)
    assert not ok and reason == "expected dog<1, found 1"
    assert judge([det("cat"), det("dog", 0.2, box=(30, 30, 40, 40))], ex)[0]


def test_colour_is_checked_on_the_most_confident_objects():
    r = rec("colors", [{"class": "car", "count": 1, "color": "red"}])
    assert judge([det("car", color="red")], r)[0]
    ok, reason = judge([det("car", color="blue")], r)
    assert not ok and reason == "expected red car>=1, found 0 red; and 1 blue"
    # Only the top-`count` detections are looked at: a red car behind a more confident blue one
    # does not rescue the image (GenEval's objects[class][:count]).
    assert not judge([det("car", 0.9, color="blue"), det("car", 0.8, (30, 30, 40, 40), "red")],
                     r)[0]
    assert judge([det("car", 0.8, color="blue"), det("car", 0.9, (30, 30, 40, 40), "red")], r)[0]
    attr = rec("color_attr", [{"class": "car", "count": 1, "color": "red"},
                              {"class": "bus", "count": 1, "color": "blue"}])
    assert judge([det("car", color="red"), det("bus", box=(30, 30, 40, 40), color="blue")], attr)[0]
    assert not judge([det("car", color="blue"), det("bus", box=(30, 30, 40, 40), color="red")],
                     attr)[0]


@pytest.mark.parametrize("relation,box", [
    ("left of", (0, 40, 10, 50)), ("right of", (80, 40, 90, 50)),
    ("above", (40, 0, 50, 10)), ("below", (40, 80, 50, 90)),
])
def test_each_position(relation, box):
    # "a photo of an A <relation> a B": include[1] (A) is <relation> include[0] (B).
    target = det("b", box=(40, 40, 50, 50))
    for rel in ("left of", "right of", "above", "below"):
        r = rec("position", [{"class": "b", "count": 1},
                             {"class": "a", "count": 1, "position": [rel, 0]}])
        ok, reason = judge([target, det("a", box=box)], r)
        assert ok == (rel == relation), (rel, reason)
        if not ok:
            assert reason == f"expected a {rel} target, found {relation} target"


def test_position_margin_and_no_relation():
    r = rec("position", [{"class": "b", "count": 1},
                         {"class": "a", "count": 1, "position": ["left of", 0]}])
    target = det("b", box=(40, 40, 60, 60))  # size 20: margin 0.1 * (20 + 20) = 4 px
    # Centres 3 px apart: the offset vanishes under the margin -> no relation at all.
    ok, reason = judge([target, det("a", box=(37, 40, 57, 60))], r)
    assert not ok and reason == "expected a left of target, found  target"
    # 7 px: 3 px survive the margin, 3 / 7 < 0.5 of the raw offset -> still no relation.
    assert not judge([target, det("a", box=(33, 40, 53, 60))], r)[0]
    # 9 px: 5 / 9 > 0.5 -> left of.
    assert judge([target, det("a", box=(31, 40, 51, 60))], r)[0]
    # Diagonal: dx = dy after the margin -> both components 0.707 > 0.5 -> left of and above.
    ok, _ = judge([target, det("a", box=(0, 0, 20, 20))], r)
    assert ok
    # Mostly vertical: |dx|/|offset| < 0.5 -> not "left of".
    assert not judge([target, det("a", box=(30, 0, 50, 20))], r)[0]


def test_position_needs_a_matched_target():
    r = rec("position", [{"class": "b", "count": 1},
                         {"class": "a", "count": 1, "position": ["left of", 0]}])
    ok, reason = judge([det("a", box=(0, 40, 10, 50))], r)
    assert not ok
    assert reason.splitlines() == ["expected b>=1, found 0", "no target for a to be left of"]


def test_at_most_16_objects_per_class():
    boxes = [(x * 10, y * 10, x * 10 + 5, y * 10 + 5) for x in range(5) for y in range(4)]
    dets = [det("dot", 0.5 + i / 100, b) for i, b in enumerate(boxes)]  # 20 dots
    kept = keep_detections(dets, "two_object")
    assert len(kept["dot"]) == 16
    assert [d.score for d in kept["dot"]] == sorted((d.score for d in dets), reverse=True)[:16]
    # an exclude of 17 can never fire: only 16 are kept (as in GenEval)
    r = rec("single_object", [{"class": "dot", "count": 1}], [{"class": "dot", "count": 17}])
    assert judge(dets, r)[0]
    assert not judge(dets, rec("single_object", [{"class": "dot", "count": 17}]))[0]


def test_optional_nms():
    dets = [det("cat", 0.9, (0, 0, 10, 10)), det("cat", 0.8, (1, 0, 11, 10))]
    assert len(keep_detections(dets, "two_object")["cat"]) == 2
    nms = GenEvalRules(max_overlap=0.5)
    assert len(keep_detections(dets, "two_object", nms)["cat"]) == 1


def test_summary_averages_tasks_present_and_says_which():
    results = score_geneval(
        [[np.zeros((8, 8, 3), np.uint8)] * 2, [np.zeros((8, 8, 3), np.uint8)]],
        [rec("single_object", [{"class": "a", "count": 1}], prompt="one"),
         rec("colors", [{"class": "a", "count": 1, "color": "red"}], prompt="two")],
        detector=lambda image: [det("a", color="red")], progress=False)
    assert results["tags"] == ["single_object", "colors"]
    assert results["missing_tags"] == ["two_object", "counting", "position", "color_attr"]
    assert results["overall"] == 1.0 and results["images"] == 3 and results["prompts"] == 2
    assert "mean over 2 tasks" in format_summary(results)
    assert results["empty_images"] == 0.0


def test_summary_counts_images_with_no_object():
    blank, drawn = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)
    results = score_geneval(
        [[blank, drawn, drawn], [blank]],
        [rec("single_object", [{"class": "a", "count": 1}], prompt="one"),
         rec("single_object", [{"class": "a", "count": 1}], prompt="two")],
        # detections below the 0.3 threshold are dropped (rule 1), so a faint one is no object
        detector=lambda image: [det("a", score=0.9 if image.any() else 0.1)], progress=False)
    assert results["empty_images"] == 0.5
    assert "no object found   50.00%  of the images" in format_summary(results)


# --------------------------------------------------------------------------------------------
# Detectors
# --------------------------------------------------------------------------------------------
def test_shapes_detector_scores_1_on_renders_and_0_on_noise():
    world = ShapesWorld(seed=3)
    detector = ShapesDetector()
    assert isinstance(detector, Detector)
    for i in range(30):
        scene = world.scene(i)
        found = detector(world.image(i))
        assert sorted((d.class_name, d.color) for d in found) == sorted(
            (o.shape, o.color) for o in scene.objects)
        assert all(d.score == 1.0 for d in found)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert all(d.score < 0.05 for d in detector(noise))


def test_mask2former_adapter_names_what_is_missing(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="config_path '.*nope.py' is not a file"):
        Mask2FormerDetector(tmp_path / "nope.py", tmp_path / "ckpt.pth", tmp_path / "clip.pt")
    files = [tmp_path / n for n in ("cfg.py", "ckpt.pth", "clip.pt")]
    for f in files:
        f.write_text("")
    for name in ("mmdet", "mmdet.apis", "open_clip"):  # as if not installed, even where it is
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ModuleNotFoundError, match="needs mmdet 2.x .*mmdet==2.27.0"):
        build_detector("mask2former", config_path=files[0], checkpoint_path=files[1],
                       clip_weights_path=files[2])
    with pytest.raises(ValueError, match="unknown detector"):
        build_detector("yolo")



def _stub_detector_packages(monkeypatch, mmdet_classes):
    """Stand-ins for mmdet.apis and open_clip that record how the adapter builds them."""
    import types

    calls = {}
    apis = types.ModuleType("mmdet.apis")
    apis.init_detector = lambda cfg, ckpt, device: types.SimpleNamespace(CLASSES=mmdet_classes)
    apis.inference_detector = lambda model, image: None
    clip = types.ModuleType("open_clip")

    def create(arch, pretrained, device):
        calls["arch"], calls["pretrained"] = arch, pretrained
        return types.SimpleNamespace(eval=lambda: None), None, None
    clip.create_model_and_transforms = create
    clip.get_tokenizer = lambda arch: calls.setdefault("tokenizer", arch)
    monkeypatch.setitem(sys.modules, "mmdet", types.ModuleType("mmdet"))
    monkeypatch.setitem(sys.modules, "mmdet.apis", apis)
    monkeypatch.setitem(sys.modules, "open_clip", clip)
    return calls


def test_mask2former_adapter_builds_geneval_clip_and_class_names(tmp_path, monkeypatch):
    """GenEval's colour classifier is open_clip ViT-L-14 with pretrained="openai", which
    open_clip builds with QuickGELU; loaded from a file the adapter must ask for that
    architecture by name. Without object_names_path the classes are GenEval's names, in
    Mask2Former's order, not mmdet's ("mouse", "remote", "keyboard")."""
    from fusion.eval.detectors import GENEVAL_CLIP_ARCH, GENEVAL_OBJECT_NAMES

    files = [tmp_path / n for n in ("cfg.py", "ckpt.pth", "clip.pt")]
    for f in files:
        f.write_text("")
    mmdet_names = tuple({"computer mouse": "mouse", "tv remote": "remote",
                         "computer keyboard": "keyboard"}.get(n, n) for n in GENEVAL_OBJECT_NAMES)
    calls = _stub_detector_packages(monkeypatch, mmdet_names)
    detector = build_detector("mask2former", config_path=files[0], checkpoint_path=files[1],
                              clip_weights_path=files[2], device="cpu")
    assert calls["arch"] == calls["tokenizer"] == GENEVAL_CLIP_ARCH == "ViT-L-14-quickgelu"
    assert calls["pretrained"] == str(files[2])
    assert detector.classes == GENEVAL_OBJECT_NAMES and len(detector.classes) == 80
    for name in ("computer mouse", "tv remote", "computer keyboard"):
        assert detector.classes[mmdet_names.index(name.split()[-1])] == name
    if GENEVAL_NAMES_FILE.exists():  # GenEval's own file, where the checkout has it
        official = [n.strip() for n in GENEVAL_NAMES_FILE.read_text().splitlines() if n.strip()]
        assert list(GENEVAL_OBJECT_NAMES) == official
    # every object a GenEval prompt names is a class the adapter can report
    if GENEVAL.exists():
        named = {inc["class"] for r in map(json.loads, GENEVAL.read_text().splitlines())
                 for inc in r.get("include", [])}
        assert named <= set(GENEVAL_OBJECT_NAMES), named - set(GENEVAL_OBJECT_NAMES)
    # a class list that does not match the detector's is refused, naming both counts
    short = tmp_path / "names.txt"
    short.write_text("cat\ndog\n")
    with pytest.raises(ValueError, match="2 class names for a detector with 80 classes"):
        build_detector("mask2former", config_path=files[0], checkpoint_path=files[1],
                       clip_weights_path=files[2], object_names_path=short, device="cpu")

# --------------------------------------------------------------------------------------------
# Layout and end-to-end scoring
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_prompt_set():
    world = ShapesWorld(seed=0)
    prompts = shapes_prompt_set(world, per_tag={t: 3 for t in TAGS}, max_scenes=3000)
    return world, prompts


def test_layout_round_trips(tmp_path, small_prompt_set):
    world, prompts = small_prompt_set
    rng = np.random.default_rng(0)
    images = [list(rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)) for _ in prompts]
    out = write_geneval_folder(tmp_path / "g", prompts, images, grid=True)
    # what GenEval's evaluate_images.py expects: digit folders, json.load-able metadata,
    # \d+.png samples
    first = out / "00000"
    assert json.load((first / "metadata.jsonl").open())["prompt"] == prompts[0].prompt
    assert sorted(p.name for p in (first / "samples").iterdir()) == [
        "0000.png", "0001.png", "0002.png", "0003.png"]
    assert (first / "grid.png").is_file()
    entries = read_geneval_folder(out)
    assert [e.record for e in entries] == prompts
    from fusion.eval.geneval import load_image

    for entry, imgs in zip(entries, images, strict=True):
        assert len(entry.images) == 4
        for path, img in zip(entry.images, imgs, strict=True):
            np.testing.assert_array_equal(load_image(path), img)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_geneval_folder(out, prompts, images)
    write_geneval_folder(out, prompts[:2], images[:2], overwrite=True)
    assert len(read_geneval_folder(out)) == 2


def test_reads_the_official_generator_layout(tmp_path):
    # generation/diffusers_generate.py: 5-digit sample names, grid.png, raw metadata dict
    meta = {"tag": "single_object", "include": [{"class": "circle", "count": 1}],
            "prompt": "a photo of a circle"}
    folder = tmp_path / "00007"
    (folder / "samples").mkdir(parents=True)
    with (folder / "metadata.jsonl").open("w") as fp:
        json.dump(meta, fp)
    world = ShapesWorld(seed=0)
    index = next(i for i in range(1000) if "single_object" in world.prompts(i)
                 and world.prompts(i)["single_object"]["prompt"] == meta["prompt"])
    from PIL import Image

    for k in (0, 1, 10):
        Image.fromarray(world.image(index)).save(folder / "samples" / f"{k:05}.png")
    Image.fromarray(world.image(index)).save(folder / "grid.png")
    (folder / "samples" / "notes.txt").write_text("ignored")
    (entry,) = read_geneval_folder(tmp_path)
    assert entry.index == 7 and entry.record.to_json() == meta
    assert [p.name for p in entry.images] == ["00000.png", "00001.png", "00010.png"]
    out = score_geneval_folder(tmp_path, ShapesDetector(), tmp_path / "results.jsonl",
                               progress=False)
    assert out["overall"] == 1.0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").open()]
    assert len(rows) == 3
    assert set(rows[0]) >= {"filename", "tag", "prompt", "correct", "reason", "metadata",
                            "details"}
    assert json.loads(rows[0]["metadata"]) == meta
    assert list(json.loads(rows[0]["details"])) == ["circle"]


def test_ground_truth_scores_1_and_noise_scores_0(small_prompt_set):
    world, prompts = small_prompt_set
    truth = shapes_ground_truth(prompts, world, per_prompt=1, progress=False)
    out = score_geneval(truth, prompts, ShapesDetector(), progress=False)
    assert out["overall"] == 1.0, [r.reason for r in out["results"] if not r.correct]
    assert out["tags"] == list(TAGS)
    rng = np.random.default_rng(0)
    noise = [[rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)] for _ in prompts]
    assert score_geneval(noise, prompts, ShapesDetector(), progress=False)["overall"] == 0.0


def test_bad_inputs_fail_clearly(tmp_path, small_prompt_set):
    _, prompts = small_prompt_set
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_geneval_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no GenEval prompt folders"):
        read_geneval_folder(tmp_path)
    (tmp_path / "00000" / "samples").mkdir(parents=True)
    (tmp_path / "00000" / "metadata.jsonl").write_text(json.dumps(prompts[0].to_json()))
    with pytest.raises(ValueError, match=re.escape("holds no sample images")):
        read_geneval_folder(tmp_path)
    with pytest.raises(ValueError, match=r"expected a uint8 \(H, W, 3\) image"):
        score_geneval([[np.zeros((64, 64), np.uint8)]], prompts[:1], ShapesDetector(),
                      progress=False)
    with pytest.raises(ValueError, match="images for 2 prompts but 1"):
        score_geneval([[], []], prompts[:1], ShapesDetector(), progress=False)
    with pytest.raises(ValueError, match="has no images"):
        score_geneval([[]], prompts[:1], ShapesDetector(), progress=False)
    with pytest.raises(ValueError, match="shapes_index"):
        shapes_ground_truth([rec("single_object", [{"class": "circle", "count": 1}])],
                            ShapesWorld(0))


@pytest.mark.slow
def test_full_shapes_prompt_set_sanity(tmp_path):
    """docs/evaluation.md: ground truth >= 0.99, noise <= 0.05, through the script."""
    main = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "evaluate.py"))[
        "main"]

    gt = main(["geneval", "--ground-truth", "--images", str(tmp_path / "gt")])
    assert gt["overall"] >= 0.99
    noise = main(["geneval", "--noise", "--images", str(tmp_path / "noise")])
    assert noise["overall"] <= 0.05
