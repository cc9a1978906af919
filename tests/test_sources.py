"""Users' folders: every bad-input kind is skipped, counted and reported once; too many fail."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from fusion.data.export import export_shapes
from fusion.data.images import fit, to_rgb, to_tensor, to_uint8
from fusion.data.prompts import read_prompts
from fusion.data.sources import BadDataError, CaptionFolder, EditFolder, ShapesSource


def _write(folder, rows):
    with (folder / "captions.jsonl").open("w") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def _good(folder, n, size=(40, 30)):
    rows = []
    for i in range(n):
        Image.new("RGB", size, (i * 10 % 256, 0, 0)).save(folder / f"g{i}.png")
        rows.append({"file": f"g{i}.png", "caption": f"image {i}"})
    return rows


def test_export_read_round_trip(tmp_path):
    counts = export_shapes(tmp_path, 12, seed=3, num_edits=5, show_progress=False)
    assert counts["images"] == 12 and counts["edits"] == 5
    folder = CaptionFolder(tmp_path, size=64, show_progress=False)
    source = ShapesSource(12, seed=3)
    assert len(folder) == 12 and folder.num_bad == 0
    for i in range(12):
        a, b = folder[i], source[i]
        assert a.caption == b.caption
        assert np.array_equal(a.image, b.image)  # PNG is lossless: pixels round-trip exactly
    edits = EditFolder(tmp_path, show_progress=False)
    assert len(edits) == 5 and edits[0].instruction
    prompts = read_prompts(tmp_path / "evaluation_metadata.jsonl")
    assert {p.tag for p in prompts} == {"single_object", "two_object", "counting", "colors",
                                        "position", "color_attr"}


def test_every_bad_kind_is_skipped_counted_and_warned_once(tmp_path, caplog):
    rows = _good(tmp_path, 40)
    (tmp_path / "notes.png").write_text("this is not an image")
    Image.new("RGB", (50, 50)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    rows += [
        {"file": "notes.png", "caption": "non-image"},
        {"file": "trunc.png", "caption": "truncated"},
        {"file": "missing.png", "caption": "missing file"},
        {"file": "g0.png", "caption": ""},
        {"file": "g1.png"},
        "{not json",
    ]
    _write(tmp_path, rows)
    with caplog.at_level(logging.WARNING):
        folder = CaptionFolder(tmp_path, size=32, max_bad_share=0.2, show_progress=False)
    assert len(folder) == 40 and folder.num_bad == 6
    lines = [r.getMessage() for r in caplog.records]
    kinds = ["unreadable, truncated or non-image", "missing image file",
             "missing or empty caption", "malformed JSON line"]
    for kind in kinds:
        matching = [m for m in lines if kind in m]
        assert len(matching) == 1, (kind, lines)
    assert any("skipped 2 record(s) with unreadable" in m for m in lines)
    assert any("skipped 2 record(s) with missing or empty caption" in m for m in lines)


def test_too_many_bad_records_fail_naming_them(tmp_path):
    rows = _good(tmp_path, 8) + [{"file": f"gone{i}.png", "caption": "x"} for i in range(2)]
    _write(tmp_path, rows)
    with pytest.raises(BadDataError, match=r"2 of 10 records are bad .*captions.jsonl:9 gone0.png"):
        CaptionFolder(tmp_path, show_progress=False)  # 20 % > default 10 %
    folder = CaptionFolder(tmp_path, max_bad_share=0.25, show_progress=False)
    assert len(folder) == 8


def test_missing_folder_and_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        CaptionFolder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="captions.jsonl"):
        CaptionFolder(tmp_path)
    _write(tmp_path, [])
    with pytest.raises(BadDataError, match="no records"):
        CaptionFolder(tmp_path, show_progress=False)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "CMYK"])
def test_image_modes_are_converted(tmp_path, mode):
    if mode == "I;16":
        img = Image.fromarray(np.arange(0, 60000, 60000 // 1200, dtype=np.uint16)[:1200]
                              .reshape(30, 40))
        assert img.mode.startswith("I;16")
    elif mode == "P":
        img = Image.new("RGB", (40, 30), (0, 200, 0)).convert("P")
    else:
        img = Image.new(mode, (40, 30))
    img.save(tmp_path / "x.png" if mode != "CMYK" else tmp_path / "x.jpg")
    name = "x.png" if mode != "CMYK" else "x.jpg"
    _write(tmp_path, [{"file": name, "caption": "c"}])
    rec = CaptionFolder(tmp_path, size=16, show_progress=False)[0]
    assert rec.image.shape == (16, 16, 3) and rec.image.dtype == np.uint8
    if mode == "I;16":  # 16-bit is rescaled, not clipped to white
        assert rec.image.min() < 50 and rec.image.max() > 200


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("policy", ["center_crop", "resize", "pad"])
def test_resize_policies(policy):
    img = Image.new("RGB", (100, 50), (255, 0, 0))
    out = fit(img, 32, policy)
    arr = np.asarray(out)
    assert out.size == (32, 32)
    if policy == "pad":  # letterboxed: top rows are the fill colour
        assert arr[0, 16].tolist() == [255, 255, 255] and arr[16, 16].tolist() == [255, 0, 0]
    else:
        assert (arr == [255, 0, 0]).all()
    with pytest.raises(ValueError, match="unknown resize policy"):
        fit(img, 32, "stretch")


def test_edit_folder_bad_rows(tmp_path):
    _good(tmp_path, 10)
    rows = [{"source": f"g{i}.png", "instruction": "make it blue", "target": f"g{i+1}.png"}
            for i in range(9)]
    rows.append({"source": "g0.png", "instruction": "  ", "target": "g1.png"})
    with (tmp_path / "edits.jsonl").open("w") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(BadDataError, match="missing or empty instruction"):
        EditFolder(tmp_path, max_bad_share=0.05, show_progress=False)
    assert len(EditFolder(tmp_path, show_progress=False)) == 9


def test_tensor_round_trip():
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    t = to_tensor(img)
    assert t.shape == (3, 8, 8) and t.min() >= -1 and t.max() <= 1
    assert np.array_equal(to_uint8(t), img)
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(img.astype(np.float32))
