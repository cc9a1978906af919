"""Interleaved (mixed-modal) documents and generation: ShapesWorld stories, their Documents,
and samplers that open images themselves (docs/interleaved.md)."""

import random

import pytest
import torch

# the tiny models and image-tokenizer stand-ins of the editing tests
from test_editing import (
    SPECIAL,
    transfusion,
    vae_encode,
    vq_encode,
)
from test_editing import chameleon as editing_chameleon

import fusion.sampling.base as base
from fusion.data.documents import Image, StoryDocuments, TextLimit, story_document
from fusion.data.shapes import (
    NUMBER_WORDS,
    ShapesWorld,
    describe,
    story_description,
    story_texts,
)
from fusion.data.sources import BadDataError, ShapesStorySource
from fusion.eval.captioning import caption_objects, scene_objects
from fusion.sampling.chameleon import ChameleonSampler
from fusion.sampling.text import TokenSampling
from fusion.sampling.transfusion import TransfusionSampler

# one thread, as the editing tests (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


# -- ShapesWorld stories ----------------------------------------------------------------------
def test_a_story_is_a_chain_of_edits_each_described_by_the_text_before_its_image():
    world = ShapesWorld(max_objects=3)
    for i in range(40):
        images = 1 + i % 4
        story = world.story(i, images)
        assert len(story.scenes) == images and len(story.instructions) == images - 1
        assert story.scenes[0] == world.scene(i)
        texts = story_texts(story)
        assert texts[0].startswith(f"{NUMBER_WORDS[images]} photos of ")
        for text, scene in zip(texts, story.scenes, strict=True):
            # the detector-side check of interleaved generation reads exactly this
            assert caption_objects(story_description(text)) == scene_objects(scene), text
        for k, instruction in enumerate(story.instructions):
            assert texts[k + 1] == f"{instruction}: {describe(story.scenes[k + 1])}"
            assert story.scenes[k + 1] != story.scenes[k]  # every edit changes the scene
    assert world.story(7, 3) == world.story(7, 3)  # deterministic


def test_story_documents_alternate_text_and_images_in_both_directions(tokenizer):
    source = ShapesStorySource(8, images_per_story=(3,))
    docs = StoryDocuments(source, tokenizer, image_first_ratio=0.5, seed=1)
    orders = set()
    for j in range(len(docs)):
        doc, rec = docs[j], source[docs.indices[j]]
        kinds = ["image" if isinstance(s, Image) else "text" for s in doc.segments]
        assert kinds.count("image") == 3 and not any(s.is_condition for s in doc.images)
        if kinds[0] == "text":
            assert kinds == ["text", "image"] * 3
            assert [t.text for t in doc.texts] == list(rec.texts)
        else:  # the first image, then text about it and the first edit
            assert kinds == ["image", "text", "image", "text", "image"]
            assert doc.texts[0].text == f"{rec.texts[0]}; {rec.texts[1]}"
        orders.add(kinds[0])
        for text in doc.texts:
            assert list(text.ids) == tokenizer.encode(text.text)
    assert orders == {"text", "image"}


def test_a_story_must_fit_its_row_with_all_its_texts_together(tokenizer):
    source = ShapesStorySource(40, images_per_story=(3,))
    lengths = [sum(len(tokenizer.encode(t)) for t in source.text_of(i)[1])
               for i in range(len(source))]
    longest_text = max(max(len(tokenizer.encode(t)) for t in source.text_of(i)[1])
                       for i in range(len(source)))
    budget = sorted(lengths)[len(lengths) // 2]
    assert longest_text <= budget  # every single text fits: only the sum can fail
    docs = StoryDocuments(source, tokenizer, limit=TextLimit(budget, truncate=True))
    # cutting one text cannot make a story fit, so truncate_captions skips them too
    assert docs.indices == [i for i, n in enumerate(lengths) if n <= budget]
    with pytest.raises(BadDataError, match="text longer"):
        StoryDocuments(source, tokenizer, limit=TextLimit(min(lengths) - 1))


def test_story_sources_refuse_bad_image_counts():
    with pytest.raises(base.UserError, match="story_images"):
        ShapesStorySource(4, images_per_story=(2, 5))


# -- training on stories: both losses fall on one batch -----------------------------------
def chameleon():
    return editing_chameleon(cm3=False)


def stories(side: int, n: int = 4):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        images = [torch.rand(3, side, side, generator=g) * 2 - 1 for _ in range(3)]
        texts = ["x" * (1 + i), "yz", "w"]
        doc = story_document(_Chars(), images, texts, image_first=i % 2 == 1)
        out.append(doc)
    return out


class _Chars:
    """A character tokenizer onto ids 20..39."""

    def encode(self, text):
        return [20 + (ord(c) % 20) for c in text]


LEARNED = ("loss", "lm_loss", "diffusion_loss")


@pytest.mark.parametrize("family", ["transfusion", "chameleon"])
def test_both_losses_fall_when_overfitting_a_batch_of_stories(family):
    model, loss = transfusion() if family == "transfusion" else chameleon()
    encode, side = (vae_encode, 16) if family == "transfusion" else (vq_encode, 8)
    docs = stories(side)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        g = torch.Generator().manual_seed(0)  # the same noise each step: a fixed target
        out = loss(model, docs, encode, random.Random(0), g)
        if first is None:
            first = {k: float(out[k]) for k in LEARNED if k in out}
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    last = {k: float(out[k]) for k in first}
    assert set(first) >= {"loss", "lm_loss"}
    for k in first:
        assert last[k] < 0.6 * first[k], (k, first[k], last[k])


# -- generation -----------------------------------------------------------------------------
def sampler(family, use_cache=True):
    if family == "transfusion":
        model, loss = transfusion()
        return TransfusionSampler(model, SPECIAL, loss.diffusion, use_cache=use_cache)
    model, _ = chameleon()
    return ChameleonSampler(model, SPECIAL, (2, 2), use_cache=use_cache)


@pytest.mark.parametrize("family", ["transfusion", "chameleon"])
def test_interleaved_documents_open_images_when_the_model_emits_boi(family, scripted):
    boi, eos = SPECIAL.boi, SPECIAL.eos
    s = sampler(family)
    scripted([21, 22, boi, 23, boi, 24, eos])
    (doc,) = s.generate_interleaved([[30, 31]], max_images=4, guidance_scale=2.0, steps=3,
                                    seed=5)
    kinds = ["image" if isinstance(x, torch.Tensor) else x for x in doc.segments]
    assert kinds == [[30, 31], [21, 22], "image", [23], "image", [24]]
    assert doc.stopped == "eos" and len(doc.images) == 2

    # The first image is text->image of everything before it, at the seed its document drew.
    image_seed = int(torch.randint(2**31 - 1, (1,),
                                   generator=torch.Generator().manual_seed(5)))
    alone = s.generate_images([[30, 31, 21, 22]], guidance_scale=2.0, steps=3, seed=image_seed)
    assert torch.allclose(doc.images[0].float(), alone[0].float(), atol=1e-5)
    assert not torch.equal(doc.images[0], doc.images[1])

    scripted([boi, eos])  # an empty prompt is still the first segment
    (doc,) = s.generate_interleaved([[]], steps=2)
    assert doc.segments[0] == [] and isinstance(doc.segments[1], torch.Tensor)


@pytest.mark.parametrize("family", ["transfusion", "chameleon"])
def test_interleaved_cached_equals_uncached_and_is_seeded(family, scripted):
    boi = SPECIAL.boi
    docs = []
    for use_cache in (True, False, True):
        scripted([21, boi, 22, 23, boi])
        docs.append(sampler(family, use_cache).generate_interleaved(
            [[30], [31, 32]], max_new_tokens=6, guidance_scale=2.0, steps=3, seed=1,
            text_sampling=TokenSampling(temperature=1.0))[0])
    for other in docs[1:]:
        assert len(other.segments) == len(docs[0].segments)
        for a, b in zip(docs[0].segments, other.segments, strict=True):
            if isinstance(a, torch.Tensor):
                assert torch.allclose(a.float(), b.float(), atol=1e-4)
            else:
                assert a == b


@pytest.mark.parametrize("family", ["transfusion", "chameleon"])
def test_interleaved_generation_keeps_to_its_limits(family, scripted):
    boi = SPECIAL.boi
    s = sampler(family)
    # <boi> whenever allowed, else text: after max_images, only text, up to max_new_tokens
    scripted([boi, boi] + [boi, 21] * 10)
    (doc,) = s.generate_interleaved([[30]], max_new_tokens=5, max_images=2, guidance_scale=None,
                                    steps=2)
    assert len(doc.images) == 2 and doc.stopped == "max_new_tokens"
    assert doc.segments[-1] == [21] * 5

    scripted([boi, 21])
    (doc,) = s.generate_interleaved([[30]], max_new_tokens=5, max_images=0, steps=2)
    assert doc.images == []

    # no room left for a second image: <boi> is masked out and text runs to the model's length
    prompt = [30] * (s.max_len - s.image_length - 3 - 4)  # <bos>, one image and 4 tokens
    scripted([boi] + [boi, 21] * 200)
    (doc,) = s.generate_interleaved([prompt], max_new_tokens=200, steps=2)
    assert len(doc.images) == 1 and doc.stopped == "max_len"
    assert doc.segments[-1] == [21] * 4


def test_an_interleaved_prompt_with_no_room_for_an_image_is_refused():
    s = sampler("chameleon")
    with pytest.raises(base.UserError, match="one image"):
        s.generate_interleaved([[30] * (s.max_len - s.image_length - 2)])


# -- scoring --------------------------------------------------------------------------------
def test_the_scorer_gives_true_stories_full_marks_and_catches_each_fault():
    from fusion.data.shapes import render
    from fusion.eval.interleaved import (
        InterleavedEvalConfig,
        expected_images,
        score_interleaved,
        story_prompts,
    )

    cfg = InterleavedEvalConfig(num_prompts=6)
    prompts = story_prompts(cfg)
    world = ShapesWorld(max_objects=3)
    stories = [world.story(cfg.heldout_start + i, (2, 3)[i % 2]) for i in range(6)]
    assert prompts == [s.texts[0] for s in stories]
    assert [expected_images(p) for p in prompts] == [2, 3] * 3
    truth = []
    for story in stories:
        doc = []
        for text, scene in zip(story.texts, story.scenes, strict=True):
            # the prompt, then the model's own text as separate pieces, as generated
            doc += [text] if not doc else ["", text]
            doc.append(render(scene))
        truth.append(doc)
    perfect = score_interleaved(prompts, truth)
    assert perfect["right_image_count"] == 1.0 and perfect["image_consistency"] == 1.0
    assert perfect["images"] == 15 and perfect["mean_images"] == 2.5
    assert perfect["object_precision"] == perfect["object_recall"] == 1.0
    assert perfect["text_coherence"] == 1.0

    faulty = [list(d) for d in truth]
    faulty[0] = faulty[0][:-2]  # stopped one image short
    faulty[1][-1] = faulty[0][1]  # last image shows another scene
    score = score_interleaved(prompts, faulty)
    assert score["right_image_count"] == 5 / 6 and score["images"] == 14
    assert score["image_consistency"] == 13 / 14 and score["first_image_consistency"] == 1.0
    assert score["object_precision"] < 1.0 and score["object_recall"] < 1.0
    with pytest.raises(ValueError, match="prompts"):
        score_interleaved(prompts, truth[:2])


def test_edit_follows_accepts_exactly_the_edits_shapesworld_makes():
    from fusion.eval.interleaved import edit_follows

    world = ShapesWorld(max_objects=3)
    for i in range(60):  # every kind, singular and plural recolours, from the world itself
        texts = world.story(i, 3).texts
        assert edit_follows(texts[0], texts[1]) and edit_follows(texts[1], texts[2]), texts
    before = "two photos of a red circle and two blue squares"
    assert edit_follows(before, "make the blue squares green: a red circle and two green squares")
    assert edit_follows(before, "move the red circle up: a red circle and two blue squares")
    assert edit_follows(before, " add a pink star: a red circle, two blue squares and a pink star")
    for wrong in ["remove the green circle: a red circle",  # no green circle
                  "make the blue square green: a red circle and two green squares",  # two of it
                  "remove the red circle: a red circle and two blue squares",  # not removed
                  "make the red circle red: a red circle and two blue squares",  # no change
                  "remove the red hexagon: two blue squares",  # not a class
                  "a red circle and two blue squares",  # no instruction
                  "paint the red circle: two blue squares"]:  # not an edit
        assert not edit_follows(before, wrong), wrong
