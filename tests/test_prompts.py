import collections
import json
from pathlib import Path

import pytest

from fusion.data.prompts import parse_prompt, read_prompts, shapes_prompt_set, write_prompts
from fusion.data.shapes import ShapesWorld

GENEVAL = Path(__file__).resolve().parents[2] / "shared" / "geneval" / "evaluation_metadata.jsonl"


@pytest.mark.skipif(not GENEVAL.exists(), reason=f"GenEval metadata not found at {GENEVAL}")
def test_geneval_metadata_parses_with_the_same_reader():
    prompts = read_prompts(GENEVAL)
    assert len(prompts) == 553
    counts = collections.Counter(p.tag for p in prompts)
    assert [counts[t] for t in ("single_object", "two_object", "counting", "colors",
                                "position", "color_attr")] == [80, 99, 80, 94, 100, 100]


def test_shapes_prompt_set_round_trips_and_is_satisfied_by_its_scene(tmp_path):
    world = ShapesWorld(seed=0)
    prompts = shapes_prompt_set(world)
    path = write_prompts(prompts, tmp_path / "p.jsonl")
    again = read_prompts(path)
    assert again == prompts
    assert len({p.prompt for p in prompts}) == len(prompts)  # distinct
    for p in prompts:
        scene = world.scene(p.extra["shapes_index"])
        assert world.prompts(p.extra["shapes_index"])[p.tag]["prompt"] == p.prompt
        counts = collections.Counter(o.shape for o in scene.objects)
        for clause in p.include:
            assert counts[clause["class"]] >= clause["count"]


@pytest.mark.parametrize("row,message", [
    ("[1]", "expected a JSON object"),
    ('{"tag": "colors", "prompt": "x"}', "missing key 'include'"),
    ('{"tag": "bogus", "prompt": "x", "include": [{"class": "a"}]}', "unknown tag"),
    ('{"tag": "colors", "prompt": "x", "include": []}', "non-empty"),
    ('{"tag": "colors", "prompt": "x", "include": [{"count": 1}]}', "no 'class'"),
    ('{"tag": "counting", "prompt": "x", "include": [{"class": "a", "count": 0}]}', "bad 'count'"),
    ('{"tag": "position", "prompt": "x", "include": [{"class": "a", "position": ["near", 0]}]}',
     "bad 'position'"),
    ("{oops", "not valid JSON"),
])
def test_malformed_prompt_lines_fail_with_line_number(tmp_path, row, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"tag": "colors", "prompt": "ok", "include": [{"class": "a"}]})
                    + "\n" + row + "\n")
    with pytest.raises(ValueError, match=message) as err:
        read_prompts(path)
    assert "p.jsonl:2" in str(err.value)


def test_extra_keys_survive():
    rec = parse_prompt({"tag": "colors", "prompt": "p", "include": [{"class": "a"}], "x": 1})
    assert rec.to_json()["x"] == 1
