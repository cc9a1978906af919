"""Interleaved generation on held-out ShapesWorld stories (docs/interleaved.md).

Each prompt is the first text of a held-out story ("three photos of a red circle and a blue
square"): it names how many images the document should hold and describes the first. The
model writes the rest itself: when to open an image, the edits between them, when to stop.
Two measures:

* ``right_image_count``: the share of documents with exactly the number of images their
  prompt names;
* ``image_consistency``: the share of generated images in which the ShapesWorld detector
  finds exactly the objects (colour and class, with counts) that the text just before the
  image describes (after its last colon: :func:`fusion.data.shapes.story_description`;
  read as :func:`fusion.eval.captioning.caption_objects` reads captions). Also reported for
  first images (drawn from the prompt) and later ones (drawn from the model's own text)
  apart, and as object precision and recall (multiset overlap of found and described
  objects, over all images);
* ``text_coherence``: the share of the model's own texts before later images that are a
  valid edit of the scene described before (:func:`edit_follows`): the text side of the
  document, which the image measures take as given.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

from fusion.config import SamplingConfig
from fusion.data.images import to_uint8
from fusion.data.shapes import (
    COLORS,
    NUMBER_WORDS,
    PLURALS,
    SHAPES,
    detect,
    story_description,
)
from fusion.data.sources import ShapesStorySource
from fusion.eval.captioning import caption_objects
from fusion.sampling.interleaved import generate_documents

# the number words a story prompt opens with, back to numbers
_COUNTS = {word: n for n, word in NUMBER_WORDS.items()}


@dataclass
class InterleavedEvalConfig:
    num_prompts: int = 64  # held-out stories, their image counts cycling through story_images
    story_images: list[int] = field(default_factory=lambda: [2, 3])
    heldout_start: int = 1_000_000  # stories of scenes from here on are never trained on
    max_new_tokens: int = 96  # text tokens the model may write per document
    max_images: int = 4
    # guidance, steps, Chameleon's code sampling (scripts/evaluate.py passes the model's
    # recorded ones); text is decoded greedily
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


def story_prompts(cfg: InterleavedEvalConfig, image_size: int = 64,
                  world_seed: int = 0) -> list[str]:
    """The held-out prompts: the first text of each story of a
    :class:`~fusion.data.sources.ShapesStorySource` starting at ``heldout_start``, built
    as the training stories are."""
    stories = ShapesStorySource(cfg.num_prompts, seed=world_seed, size=image_size,
                                offset=cfg.heldout_start,
                                images_per_story=tuple(cfg.story_images))
    return [stories.story(i).texts[0] for i in range(cfg.num_prompts)]


def expected_images(prompt: str) -> int | None:
    """How many images a story prompt asks for ("three photos of ..." -> 3), else None."""
    return _COUNTS.get(prompt.split(" ", 1)[0])


def texts_before_images(segments: Sequence) -> list[str]:
    """For each image of a document (segments: str texts and images, in order), the text
    written since the previous image (the prompt included for the first)."""
    out, text = [], []
    for seg in segments:
        if isinstance(seg, str):
            text.append(seg)
        else:
            out.append("".join(text))
            text = []
    return out


def found_and_described(image: np.ndarray, text: str) -> tuple[Counter, Counter]:
    """(the objects the detector finds in ``image``, the objects ``text`` describes), each
    as ``Counter({(colour, class): count})``; the image matches when they are equal."""
    return (Counter((o.color, o.shape) for o in detect(image)),
            caption_objects(story_description(text)))


_SINGULAR = {plural: shape for shape, plural in PLURALS.items()}
_EDIT = re.compile(r"(?:make the (?P<recolor>\w+ \w+) (?P<to>\w+)"
                   r"|add an? (?P<add>\w+ \w+)"
                   r"|remove the (?P<remove>\w+ \w+)"
                   r"|move the (?P<move>\w+ \w+) (?:left|right|up|down))")


def edit_follows(previous: str, text: str) -> bool:
    """Whether ``text`` ("<instruction>: <description>") is a valid ShapesWorld edit of the
    scene ``previous`` describes: the instruction names an object the scene has (one of it, or
    a whole group for a plural recolour), and the description is the scene with exactly that
    edit made. The check of the model's own text; images are checked by the detector."""
    if ":" not in text:
        return False
    instruction, description = (x.strip() for x in text.rsplit(":", 1))
    match = _EDIT.fullmatch(instruction)
    if match is None:
        return False
    before, after = caption_objects(story_description(previous)), caption_objects(description)
    kind = next(k for k in ("recolor", "add", "remove", "move") if match[k])
    color, word = match[kind].split(" ")
    shape = _SINGULAR.get(word, word)
    if color not in COLORS or shape not in SHAPES or (word != shape and kind != "recolor"):
        return False
    key, expected = (color, shape), Counter(before)
    if kind == "add":
        expected[key] += 1
        return after == expected
    group = word != shape  # "make the red circles blue": every red circle
    if (before[key] < 2) if group else (before[key] != 1):
        return False  # the named object is not in the scene as named
    if kind == "remove":
        expected[key] -= 1
    elif kind == "recolor":
        if match["to"] not in COLORS or match["to"] == color:
            return False
        n = before[key] if group else 1
        expected[key] -= n
        expected[(match["to"], shape)] += n
    return after == +expected


def score_interleaved(prompts: Sequence[str], documents: Sequence[Sequence]) -> dict:
    """Scores of generated documents (each: str texts and uint8 (H, W, 3) images in order,
    starting with its prompt) against their prompts."""
    if len(prompts) != len(documents):
        raise ValueError(f"{len(prompts)} prompts but {len(documents)} documents")
    if not prompts:
        raise ValueError("no documents to score")
    right = first_ok = first_n = later_ok = later_n = 0
    counts, overlap, found_total, described_total, coherent = [], 0, 0, 0, 0
    for prompt, doc in zip(prompts, documents, strict=True):
        images = [x for x in doc if not isinstance(x, str)]
        counts.append(len(images))
        right += len(images) == expected_images(prompt)
        texts = texts_before_images(doc)
        coherent += sum(edit_follows(a, b) for a, b in pairwise(texts))
        for k, (image, text) in enumerate(zip(images, texts, strict=True)):
            found, described = found_and_described(image, text)
            ok = found == described
            overlap += sum((found & described).values())
            found_total += sum(found.values())
            described_total += sum(described.values())
            if k == 0:
                first_ok, first_n = first_ok + ok, first_n + 1
            else:
                later_ok, later_n = later_ok + ok, later_n + 1
    n_images = first_n + later_n
    return {"documents": len(prompts), "right_image_count": right / len(prompts),
            "mean_images": float(np.mean(counts)), "images": n_images,
            "image_consistency": (first_ok + later_ok) / n_images if n_images else 0.0,
            "first_image_consistency": first_ok / first_n if first_n else 0.0,
            "later_image_consistency": later_ok / later_n if later_n else 0.0,
            # over all images: objects found that the text describes / described objects found
            "object_precision": overlap / found_total if found_total else 0.0,
            "object_recall": overlap / described_total if described_total else 0.0,
            # the model's own text: later texts that are a valid edit of the scene before
            "text_coherence": coherent / later_n if later_n else 0.0}


def evaluate_interleaved(sampler, tokenizer, image_size: int,
                         cfg: InterleavedEvalConfig | None = None, world_seed: int = 0,
                         progress: bool = True) -> tuple[dict, list[list], list[str]]:
    """Generate from the held-out story prompts and score them -> (summary, documents as
    str texts and uint8 (H, W, 3) images, why each stopped)."""
    cfg = cfg or InterleavedEvalConfig()
    prompts = story_prompts(cfg, image_size, world_seed)
    docs, stops = generate_documents(sampler, tokenizer, prompts, cfg.sampling,
                                     cfg.max_new_tokens, cfg.max_images, progress=progress)
    docs = [[x if isinstance(x, str) else to_uint8(x) for x in doc] for doc in docs]
    summary = score_interleaved(prompts, docs)
    summary["stopped"] = dict(Counter(stops))
    summary["settings"] = {"guidance_scale": cfg.sampling.guidance_scale,
                           "diffusion_steps": cfg.sampling.diffusion_steps,
                           "temperature": cfg.sampling.temperature,
                           "top_k": cfg.sampling.top_k, "seed": cfg.sampling.seed,
                           "heldout_start": cfg.heldout_start, "world_seed": world_seed}
    return summary, docs, stops
