"""fusion.FusionPipeline: a model folder used from Python, for both families."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusion import FusionPipeline
from fusion.config import compose
from fusion.data.text import TextTokenizer
from fusion.errors import UserError
from fusion.families import build_family, load_image_tokenizer
from fusion.families.folders import save_model

ROOT = Path(__file__).resolve().parents[1]
BPE = "tokenizers/shapes-bpe/tokenizer.json"


def _folder(path: Path, family: str, image_tokenizer: str, documents: str = "caption") -> Path:
    """An untrained model folder of ``family`` as scripts/train.py writes it."""
    torch.manual_seed(0)
    cfg = compose("train", [f"experiment={family}_tiny"])
    tok = TextTokenizer.from_file(ROOT / BPE)
    model, _ = build_family(cfg.model, tok, load_image_tokenizer(image_tokenizer), 64)
    recipe = {"guidance_scale": 2.0, "diffusion_steps": 2, "temperature": 1.0, "top_k": 8}
    return save_model(path, model, cfg.model, BPE, image_tokenizer,
                      extra={"image_size": 64, "documents": documents, "sampling": recipe})


@pytest.fixture(scope="module")
def transfusion(tmp_path_factory, tiny_vae):
    return _folder(tmp_path_factory.mktemp("tf") / "model", "transfusion", str(tiny_vae))


@pytest.fixture(scope="module")
def chameleon(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("ch") / "model", "chameleon", "tokenizers/shapes-vqgan")


@pytest.mark.parametrize("which", ["transfusion", "chameleon"])
def test_text_to_image_is_seeded_and_follows_the_recorded_recipe(which, request):
    pipe = FusionPipeline.from_pretrained(request.getfixturevalue(which))
    assert pipe.family == which
    s = pipe.settings()
    assert (s.guidance_scale, s.diffusion_steps, s.top_k) == (2.0, 2, 8)  # the folder's
    assert pipe.settings(guidance_scale=None).guidance_scale is None  # a keyword wins
    images = pipe(["a photo of a red circle", "a blue square"], num_images=2, seed=3,
                  progress=False)
    assert len(images) == 4 and all(isinstance(i, Image.Image) and i.size == (64, 64)
                                    for i in images)
    again = pipe(["a photo of a red circle", "a blue square"], num_images=2, seed=3,
                 output_type="np", progress=False)
    assert np.array_equal(np.stack([np.asarray(i) for i in images]), again)
    other = pipe("a photo of a red circle", seed=4, output_type="np", progress=False)
    assert not np.array_equal(other[0], again[0])
    # the same as the family sampler given the same settings (what the scripts call)
    from fusion.sampling.base import image_settings

    ids = [pipe.tokenizer.encode("a photo of a red circle")]
    direct = pipe.sampler.generate_images(ids, **image_settings(pipe.settings(seed=4)))
    assert torch.equal(pipe("a photo of a red circle", seed=4, output_type="pt",
                            progress=False), direct.float())


@pytest.mark.parametrize("which", ["transfusion", "chameleon"])
def test_caption_and_text_take_any_image_kind(which, request, tmp_path):
    pipe = FusionPipeline.from_pretrained(request.getfixturevalue(which))
    array = np.full((80, 96, 3), 200, np.uint8)  # another size: brought to 64 px
    Image.fromarray(array).save(tmp_path / "x.png")
    from_array = pipe.caption(array, max_new_tokens=3)
    assert isinstance(from_array, str)
    assert pipe.caption(Image.fromarray(array), max_new_tokens=3) == from_array
    assert pipe.caption(tmp_path / "x.png", max_new_tokens=3) == from_array
    assert len(pipe.caption([array, array], max_new_tokens=3)) == 2
    assert isinstance(pipe.caption(torch.zeros(3, 64, 64), max_new_tokens=3), str)
    assert isinstance(pipe.generate_text("a photo of", max_new_tokens=3, temperature=0.0), str)


def test_bad_inputs_are_named(transfusion, tmp_path):
    pipe = FusionPipeline.from_pretrained(transfusion)
    with pytest.raises(UserError, match=r"unknown sampling setting\(s\) \['guidance'\]"):
        pipe("a circle", guidance=3.0)
    with pytest.raises(UserError, match="output_type='jpg'"):
        pipe("a circle", output_type="jpg", progress=False)
    with pytest.raises(UserError, match="num_images must be at least 1"):
        pipe("a circle", num_images=0)
    with pytest.raises(UserError, match=r"prompt 1 is \d+ tokens"):
        pipe("a red circle " * 200)
    with pytest.raises(UserError, match=r"must be \(3, 64, 64\)"):
        pipe.caption(torch.zeros(3, 32, 32))
    with pytest.raises(UserError, match="must be uint8"):
        pipe.caption(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(FileNotFoundError, match="image file not found"):
        pipe.caption(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="is not a readable image"):
        pipe.caption(tmp_path / "junk.png")
    with pytest.raises(UserError, match="cannot read an image from .int."):
        pipe.caption(5)
    with pytest.raises(UserError, match="no images given"):
        pipe.caption([])
    with pytest.raises(UserError, match="trained on 'caption' documents, not edits"):
        pipe.edit(np.zeros((64, 64, 3), np.uint8), "make it blue")


def test_edit_with_an_edit_model(tmp_path, tiny_vae):
    pipe = FusionPipeline.from_pretrained(
        _folder(tmp_path / "model", "transfusion", str(tiny_vae), documents="edit"))
    source = np.zeros((64, 64, 3), np.uint8)
    edited = pipe.edit(source, "make the red circle blue", seed=1)
    assert isinstance(edited, Image.Image) and edited.size == (64, 64)
    assert np.array_equal(np.asarray(edited),
                          pipe.edit(source, "make the red circle blue", seed=1,
                                    output_type="np"))
    with pytest.raises(UserError, match="2 image\\(s\\) but 1 instruction"):
        pipe.edit([source, source], ["one"])


def test_the_readme_snippet_runs(transfusion):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use it from Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "FusionPipeline.from_pretrained" in code
    code = code.replace('"outputs/train/transfusion_tiny/model"', repr(str(transfusion)))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    assert len(namespace["images"]) == 4 and isinstance(namespace["text"], str)


@pytest.mark.parametrize("which", ["transfusion", "chameleon"])
def test_the_api_and_sample_py_give_the_same_images_and_files(which, request, tmp_path,
                                                               capsys):
    import json

    from fusion.data.prompts import shapes_prompt_set
    from fusion.data.shapes import ShapesWorld
    from fusion.jobs.evaluate import cmd_geneval
    from fusion.jobs.sample import run_sampling

    records = shapes_prompt_set(ShapesWorld(seed=0), start=10**6)[:3]
    prompt_file = tmp_path / "metadata.jsonl"
    prompt_file.write_text("".join(json.dumps(r.to_json()) + "\n" for r in records))
    folder = request.getfixturevalue(which)
    out = tmp_path / "samples"
    cfg = compose("sample", [f"model_dir={folder}", f"prompt_file={prompt_file}",
                             "images_per_prompt=2", "batch_size=4", f"output_dir={out}",
                             "device=cpu"])
    assert run_sampling(cfg)["count"] == 6
    rows = [json.loads(x) for x in (out / "text_to_image.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [r.prompt for r in records for _ in range(2)]
    assert [r["seed"] for r in rows] == [0, 0, 0, 0, 1, 1]  # batches of 4
    from_files = np.stack([np.asarray(Image.open(out / r["file"])) for r in rows])
    pipe = FusionPipeline.from_pretrained(folder)
    assert pipe.family == which
    from_api = pipe([r.prompt for r in records], num_images=2, batch_size=4, seed=0,
                    output_type="np", progress=False)
    assert np.array_equal(from_files, from_api)
    # both took the settings the folder recorded (sample.py says which)
    assert ("sampling as the model's recipe: guidance_scale=2.0, diffusion_steps=2, "
            "temperature=1.0, top_k=8") in capsys.readouterr().out
    # GenEval's layout, scored by scripts/evaluate.py geneval's command
    assert sorted(p.name for p in (out / "geneval").iterdir()) == ["00000", "00001", "00002"]
    assert len(list((out / "geneval" / "00001" / "samples").glob("*.png"))) == 2
    from argparse import Namespace

    summary = cmd_geneval(Namespace(images=str(out / "geneval"), outfile=None,
                                    detector="shapes", ground_truth=False, noise=False))
    assert summary["images"] == 6 and 0.0 <= summary["overall"] <= 1.0


def test_a_model_folder_carries_its_image_tokenizer(tmp_path, tiny_vae):
    """The folder holds a copy of the artifact it was trained with (``image_tokenizer/``), so
    it is complete on its own (e.g. uploaded to and downloaded from the Hub): moved away,
    with the recorded path gone, it loads and gives the same images; a tampered copy is
    refused, and a copy of the original passed explicitly still loads."""
    import json
    import shutil

    from fusion.families.folders import image_tokenizer_fingerprint

    art = tmp_path / "vae"
    shutil.copytree(tiny_vae, art)
    folder = _folder(tmp_path / "run" / "model", "transfusion", str(art))
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "config.json", "image_tokenizer", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in (folder / "image_tokenizer").iterdir()) == [
        "config.json", "model.safetensors"]
    meta = json.loads((folder / "config.json").read_text())
    assert meta["image_tokenizer"] == str(art)
    assert image_tokenizer_fingerprint(folder / "image_tokenizer") == meta[
        "image_tokenizer_sha256"]
    assert "| image tokenizer | `image_tokenizer/`, included: a copy of" in (
        folder / "README.md").read_text()
    kwargs = {"num_images": 2, "seed": 0, "output_type": "np", "progress": False}
    before = FusionPipeline.from_pretrained(folder)("a red circle", **kwargs)

    moved = tmp_path / "downloaded" / "model"
    shutil.copytree(folder, moved)
    shutil.rmtree(tmp_path / "run")
    shutil.rmtree(art)  # the recorded path no longer exists
    pipe = FusionPipeline.from_pretrained(moved)
    assert pipe.image_tokenizer.artifact_path == str(moved / "image_tokenizer")
    assert np.array_equal(pipe("a red circle", **kwargs), before)

    weights = moved / "image_tokenizer" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match=(
            rf"{re.escape(str(moved / 'image_tokenizer'))}, this model folder's copy of its "
            rf"image tokenizer {re.escape(str(art))}, does not match the sha256 recorded in "
            rf"{re.escape(str(moved / 'config.json'))} \(\w{{12}}\.\.\.\): the copy is damaged "
            r"or was replaced; copy the model folder again, or pass a copy of the original")):
        FusionPipeline.from_pretrained(moved)
    pipe = FusionPipeline.from_pretrained(moved, image_tokenizer=str(tiny_vae))
    assert np.array_equal(pipe("a red circle", **kwargs), before)


def test_a_model_folder_carries_a_model_card_with_its_scores(tmp_path, tiny_vae):
    from fusion.families.folders import file_sha256, load_model, record_scores

    folder = _folder(tmp_path / "model", "transfusion", str(tiny_vae))
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: fusion\n")  # the Hub's metadata block
    assert "| family | transfusion |" in card and "guidance_scale=2.0" in card
    assert "Not measured yet" in card
    weights = file_sha256(folder / "model.safetensors")
    record_scores(folder, {"geneval_overall": 0.25, "fid_shapes": 7.5, "caption_examples": []})
    card = (folder / "README.md").read_text()
    assert "| geneval_overall | 0.25 |" in card and "caption_examples" not in card
    assert file_sha256(folder / "model.safetensors") == weights
    assert load_model(folder)[4]["scores"] == {"geneval_overall": 0.25, "fid_shapes": 7.5}


@pytest.mark.parametrize("which", ["transfusion", "chameleon"])
def test_interleaved_documents_from_the_api_and_sample_py_are_the_same(which, request, tmp_path,
                                                                     scripted):
    import json

    from fusion.jobs.sample import run_sampling

    folder = request.getfixturevalue(which)
    pipe = FusionPipeline.from_pretrained(folder)
    s, tok = pipe.sampler.special, pipe.tokenizer
    # an untrained model opens no image by itself: the decisions are scripted
    script = [s.boi, *tok.encode(" make the red circle blue"), s.boi, s.eos]
    prompt = "two photos of a red circle"
    out = tmp_path / "page"
    cfg = compose("sample", [f"model_dir={folder}", "task=interleaved", f"prompts=[{prompt!r}]",
                             f"output_dir={out}", "device=cpu"])
    scripted(script)
    assert run_sampling(cfg)["count"] == 1
    (row,) = [json.loads(x) for x in (out / "interleaved.jsonl").read_text().splitlines()]
    assert row["prompt"] == prompt and row["stopped"] == "eos"
    files = [x["image"] for x in row["segments"] if "image" in x]
    assert len(files) == 2 and all(f"]({f})" in (out / "interleaved.md").read_text()
                                   for f in files)

    scripted(script)
    doc = pipe.generate(prompt, output_type="np", progress=False)
    assert doc[0] == prompt and doc[2] == " make the red circle blue"
    assert [x for x in doc[1:] if isinstance(x, str)] == [x["text"] for x in row["segments"]
                                                          if "text" in x]
    images = [x for x in doc if not isinstance(x, str)]
    assert all(np.array_equal(np.asarray(Image.open(out / f)), x)
               for f, x in zip(files, images, strict=True))

    scripted(script)
    again = pipe.generate(prompt, progress=False)
    assert [type(x) for x in again] == [str, Image.Image, str, Image.Image]
    assert np.array_equal(np.asarray(again[1]), images[0])


def test_interleaved_bad_inputs_are_named_before_any_generation(transfusion):
    pipe = FusionPipeline.from_pretrained(transfusion)
    with pytest.raises(UserError, match="one image"):  # no room left for an image
        pipe.generate("a red circle " * 300, progress=False)
    with pytest.raises(UserError, match="max_images"):
        pipe.generate("two photos of a red circle", max_images=-1, progress=False)
    with pytest.raises(UserError, match="output_type"):
        pipe.generate("two photos of a red circle", output_type="gif", progress=False)
    with pytest.raises(UserError, match="unknown sampling setting"):
        pipe.generate("two photos of a red circle", guidance=2.0, progress=False)
    long = pipe.generate("a red circle " * 300, prompt_overflow="truncate", max_new_tokens=2,
                         max_images=0, progress=False)
    assert isinstance(long[0], str) and len(long) <= 2
