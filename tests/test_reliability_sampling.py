"""Sampling inputs fail early and clearly (issue #29): a prompt longer than the model can take
is refused before any model call (or cut, with sampling.prompt_overflow=truncate), an empty
prompt samples unconditionally with a warning, and an unreadable image in a folder to caption
is skipped and reported instead of stopping the run."""

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict
from PIL import Image

from fusion.errors import UserError
from fusion.models.chameleon import Chameleon
from fusion.models.packing import SpecialIds
from fusion.models.schemas import (
    ChameleonConfig,
    TransfusionConfig,
    TransfusionLossConfig,
)
from fusion.models.transfusion import Transfusion, TransfusionLoss
from fusion.sampling.chameleon import ChameleonSampler
from fusion.sampling.transfusion import TransfusionSampler

SPECIAL = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4)
MAX_LEN = 96
SMALL = dict(d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=MAX_LEN,
             multiple_of=32)
LONG = "a photo of a red circle left of a blue square and a green star " * 20


def vae_encode(pixels):
    """A stand-in for the VAE: (B, 3, 16, 16) -> latents (B, 4, 8, 8)."""
    x = F.avg_pool2d(pixels, 2)
    return torch.cat([x, x[:, :1]], 1)


def vae_decode(latents):
    return F.interpolate(latents[:, :3], scale_factor=2).clamp(-1, 1)


def vq_encode(pixels):
    """A stand-in for the VQ-GAN: (B, 3, 8, 8) -> codes (B, 2, 2) in [0, 16)."""
    x = F.avg_pool2d(pixels.mean(1, keepdim=True), 4)[:, 0]
    return ((x + 1) / 2 * 16).long().clamp(0, 15)


def transfusion(vocab=32, special=SPECIAL):
    torch.manual_seed(0)
    arch = TransfusionConfig(backbone="tiny", backbone_overrides=SMALL, patchifier="linear",
                             patch_size=2, latent_channels=4, latent_size=8)
    model = Transfusion(arch, vocab)
    loss = TransfusionLoss(TransfusionLossConfig(), special)
    return model, loss, TransfusionSampler(model, special, loss.diffusion, vae_decode,
                                           vae_encode)


def chameleon():
    torch.manual_seed(0)
    model = Chameleon(ChameleonConfig(backbone_overrides=SMALL), 40, 16, codes_per_image=4)
    return ChameleonSampler(model, SPECIAL, (2, 2), encode_images=vq_encode)


def never_eos(sampler):
    """Decode text to its full max_new_tokens: the longest a stream gets."""
    logits = sampler._logits

    def without_eos(hidden):
        out = logits(hidden)
        out[..., SPECIAL.eos] = float("-inf")
        return out

    sampler._logits = without_eos
    return sampler


# --------------------------------------------------------------------------------------------
# The budget of each family and task is exact: `limit` tokens fit, one more is refused
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["transfusion", "chameleon"])
@pytest.mark.parametrize("task", ["text_to_image", "text_to_text", "edit", "image_to_text"])
def test_the_prompt_budget_is_exactly_what_fits(family, task, monkeypatch):
    import fusion.sampling.base
    import fusion.sampling.chameleon
    import fusion.sampling.transfusion

    sampler = never_eos(transfusion()[2] if family == "transfusion" else chameleon())
    size = 16 if family == "transfusion" else 8
    new = 5
    budget = sampler.prompt_budget(task, new)
    if task == "image_to_text":  # no prompt: max_new_tokens takes the room left
        new = budget.limit + new
        assert sampler.prompt_budget(task, new).limit == 0

    def run(n: int):
        prompt = [[20] * n]
        if task == "text_to_image":
            return sampler.generate_images(prompt, guidance_scale=2.0, steps=1)
        if task == "text_to_text":
            return sampler.generate_text(prompt, new)
        if task == "edit":
            return sampler.edit(torch.zeros(1, 3, size, size), prompt, 2.0, 1.5, steps=1)
        return sampler.caption(torch.zeros(1, 3, size, size), n)

    if task == "image_to_text":
        assert len(run(new)[0]) == new  # the whole answer fits ...
        with pytest.raises(UserError, match=rf"image_to_text needs {MAX_LEN + 1} positions .* "
                                            rf"lower max_new_tokens to at most {new}"):
            run(new + 1)  # ... one more token does not, and says so before decoding
        more = new + 1
    else:
        run(budget.limit)
        what = "instruction" if task == "edit" else "prompt"
        with pytest.raises(UserError, match=rf"{what} 1 is {budget.limit + 1} tokens; this "
                                            rf"model takes at most {budget.limit} {what} tokens"):
            run(budget.limit + 1)
        more = budget.limit + 1
    # unchecked, one more token overflows the model: the budget is exact, not just safe
    for module in (fusion.sampling.base, fusion.sampling.transfusion, fusion.sampling.chameleon):
        monkeypatch.setattr(module, "fit_prompts", lambda prompts, *a, **k: prompts)
    with pytest.raises(ValueError, match="cache overflow"):
        run(more)


# --------------------------------------------------------------------------------------------
# scripts/sample.py (run_sampling) and scripts/edit.py (edit_images)
# --------------------------------------------------------------------------------------------
class Recording:
    """Wraps a sampler and records what reaches the model."""

    def __init__(self, sampler):
        self.sampler, self.calls = sampler, []

    def __getattr__(self, name):
        attr = getattr(self.sampler, name)
        if name in ("generate_images", "generate_text", "caption", "edit"):
            def record(*args, **kwargs):
                self.calls.append((name, args))
                return attr(*args, **kwargs)
            return record
        return attr


@pytest.fixture
def sample(monkeypatch, tmp_path, tokenizer):
    """run_sampling(overrides, prompts) on a small in-memory Transfusion model; returns
    (result, the recording sampler), which is also ``sample.recording``."""
    import fusion.jobs.sample as run
    from fusion.config import compose

    model, loss, sampler = transfusion(tokenizer.vocab_size, SpecialIds.from_tokenizer(tokenizer))
    recording = Recording(sampler)
    pipe = run.FusionPipeline.__new__(run.FusionPipeline)  # what run_sampling loads
    pipe.sampler, pipe.tokenizer, pipe.meta = recording, tokenizer, {"image_size": 16}
    monkeypatch.setattr(run.FusionPipeline, "from_pretrained", lambda *a, **k: pipe)

    def go(overrides=(), prompts=None, overflow=None):
        cfg = compose("sample", [f"output_dir={tmp_path / 'out'}", "device=cpu",
                                 "sampling.diffusion_steps=1", "batch_size=1", *overrides])
        if prompts is not None:
            cfg.prompts = prompts
        if overflow is not None:
            with open_dict(cfg.sampling):
                cfg.sampling.prompt_overflow = overflow
        return run.run_sampling(cfg), recording

    go.recording = recording
    return go


def test_a_too_long_prompt_is_refused_before_any_model_call(sample, tokenizer):
    n = len(tokenizer.encode(LONG))
    limit = MAX_LEN - 18  # <bos>, <boi> and 16 image positions
    with pytest.raises(UserError) as err:
        sample(prompts=["a red circle", "a blue square", LONG])  # batch_size=1
    assert str(err.value) == (
        f"prompt 3 is {n} tokens; this model takes at most {limit} prompt tokens (max_len "
        f"{MAX_LEN} minus 18 positions for <bos>, <boi> and the 16-position image); shorten "
        "it or set sampling.prompt_overflow=truncate")
    assert sample.recording.calls == []  # not even the first two prompts' batches ran


def test_long_prompts_are_cut_with_one_warning_when_asked(sample, tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        result, recording = sample(prompts=[LONG, "a red circle", LONG], overflow="truncate")
    assert result["count"] == 3
    cut = [r for r in caplog.records if "longer than" in r.getMessage()]
    assert len(cut) == 1 and cut[0].getMessage().startswith(
        f"2 of 3 prompts are longer than the {MAX_LEN - 18} tokens this model takes")
    seen = [p for name, args in recording.calls for p in args[0]]
    assert [len(p) for p in seen] == [MAX_LEN - 18, len(tokenizer.encode("a red circle")),
                                      MAX_LEN - 18]
    assert seen[0] == tokenizer.encode(LONG)[:MAX_LEN - 18]


def test_text_to_text_names_max_new_tokens_too(sample, tokenizer):
    limit = MAX_LEN - 1 - 24
    with pytest.raises(UserError, match=(
            rf"prompt 2 is {len(tokenizer.encode(LONG))} tokens; this model takes at most "
            rf"{limit} prompt tokens \(max_len {MAX_LEN} minus 25 positions for "
            r"<bos> and max_new_tokens=24\); shorten it or lower max_new_tokens \(now 24\) or "
            r"set sampling.prompt_overflow=truncate")):
        sample(["task=text_to_text"], prompts=["a red circle", LONG])


def test_captions_longer_than_the_model_are_refused_naming_max_new_tokens(sample):
    with pytest.raises(UserError, match=r"image_to_text needs 219 positions for .* more than "
                                        rf"this model's max_len {MAX_LEN}; lower "
                                        r"max_new_tokens to at most 77"):
        sample(["task=image_to_text", "max_new_tokens=200", "num_images=1"])


def test_a_bad_prompt_overflow_setting_is_refused(sample):
    with pytest.raises(UserError, match="sampling.prompt_overflow='cut' is not a setting"):
        sample(prompts=["a red circle"], overflow="cut")


def test_an_empty_prompt_samples_unconditionally_with_a_warning(sample, caplog):
    with caplog.at_level(logging.WARNING):
        result, recording = sample(prompts=["a red circle", "   "])
    assert result["count"] == 2
    assert any(r.getMessage() == "prompt 2 is empty: sampled unconditionally, as if no "
               "description were given" for r in caplog.records)
    assert recording.calls[1][1][0] == [[]]  # no tokens: the unconditional <bos> <boi>


def test_unreadable_images_are_skipped_and_reported(sample, tmp_path, caplog):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "c.png"):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / name)
    data = (folder / "a.png").read_bytes()
    (folder / "b.png").write_bytes(data[:len(data) // 2])  # truncated
    (folder / "d.jpg").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        result, recording = sample(["task=image_to_text", f"images={folder}",
                                    "max_new_tokens=2"])
    assert result["count"] == 2 and result["skipped"] == 2
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"skipped 2 of 4 image files in {folder} that are not readable images: b.png, d.jpg")
    rows = [json.loads(line) for line in
            (tmp_path / "out" / "image_to_text.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows if "caption" in r] == ["a.png", "c.png"]
    assert [r["image"] for r in rows if "skipped" in r] == ["b.png", "d.jpg"]

    for name in ("a.png", "c.png"):
        (folder / name).write_bytes(b"")
    with pytest.raises(UserError, match=rf"none of the 4 image files in images={folder} is "
                                        r"readable \(first: a\.png: .*\); pass a folder of PNG"):
        sample(["task=image_to_text", f"images={folder}"])


def test_an_edit_instruction_longer_than_the_model_is_refused_before_any_edit(tokenizer):
    from fusion.config import SamplingConfig
    from fusion.sampling.edit import edit_images

    _, _, sampler = transfusion(tokenizer.vocab_size, SpecialIds.from_tokenizer(tokenizer))
    recording = Recording(sampler)
    limit = MAX_LEN - (2 * 16 + 4)
    with pytest.raises(UserError, match=rf"instruction 2 is \d+ tokens; this model takes at "
                                        rf"most {limit} instruction tokens"):
        edit_images(recording, tokenizer, torch.zeros(2, 3, 16, 16), ["make it blue", LONG],
                    SamplingConfig(diffusion_steps=1), batch_size=1)
    assert recording.calls == []
