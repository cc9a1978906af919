"""Every bad input caught before training, and no diverged update ever applied or saved:
caption length against the family's row, non-UTF-8 index lines, the non-finite loss guard
(docs/reliability.md)."""

import json
import random
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from fusion.config import OptimConfig, compose
from fusion.data.datamodule import DocumentDataModule, ResumableSampler
from fusion.data.documents import Document, Text, TextLimit, fitting_records
from fusion.data.documents import Image as ImageSegment
from fusion.data.sources import BadDataError, CaptionFolder
from fusion.data.text import TextTokenizer
from fusion.families import build_family, load_image_tokenizer
from fusion.training.checkpointing import FusionCheckpoint, find_resume_checkpoint
from fusion.training.fusion_module import FusionModule, NonFiniteTrainingError

ROOT = Path(__file__).resolve().parents[1]
SHAPES_BPE = ROOT / "tokenizers/shapes-bpe/tokenizer.json"
# An ordinary English caption of 137 characters: 90 tokens of the ShapesWorld BPE, more than
# the 44 that transfusion_tiny's 64-position row holds next to an image's 16 patches.
LONG = ("A weathered wooden fishing boat rests on the pebbled shore at dawn, its blue paint "
        "peeling, while gulls circle above the quiet grey harbour.")


def _folder(root: Path, captions: list[str]) -> Path:
    root.mkdir()
    lines = []
    for i, caption in enumerate(captions):
        Image.fromarray(np.full((8, 8, 3), 40 * i % 255, np.uint8)).save(root / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "caption": caption}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def bpe() -> TextTokenizer:
    return TextTokenizer.from_file(SHAPES_BPE)


@pytest.fixture(scope="module")
def families(tiny_vae, bpe):
    """(model, loss) of both tiny recipes, as scripts/train.py builds them."""
    out = {}
    for family in ("transfusion", "chameleon"):
        cfg = compose("train", [f"experiment={family}_tiny"])
        image_tok = str(tiny_vae) if family == "transfusion" else cfg.image_tokenizer
        out[family] = build_family(cfg.model, bpe, load_image_tokenizer(image_tok), 64)
    return out


@pytest.mark.parametrize("family", ["transfusion", "chameleon"])
@pytest.mark.parametrize("n_images", [1, 2])
def test_text_budget_is_exactly_what_a_packed_row_holds(families, bpe, family, n_images):
    model, loss = families[family]
    budget = loss.text_budget(model, n_images)
    assert budget > 0
    pixels = torch.zeros(3, 64, 64)

    def doc(n_text: int) -> Document:
        text = Text(tuple([bpe.encode("a")[0]] * n_text))
        images = [ImageSegment(pixels, is_condition=n_images == 2)] * (n_images - 1)
        return Document((*images, text, ImageSegment(pixels)))

    model.eval()
    with torch.no_grad():  # caption dropout off: the text always counts
        loss.cfg.caption_dropout, saved = 0.0, loss.cfg.caption_dropout
        try:
            encode = (lambda x: torch.zeros(x.shape[0], *_latent_shape(model))) \
                if family == "transfusion" else (lambda x: torch.zeros(
                    x.shape[0], *model.code_grid, dtype=torch.long))
            loss(model, [doc(budget)], encode, random.Random(0))  # fits exactly
            with pytest.raises(ValueError, match="positions, more than max_len"):
                loss(model, [doc(budget + 1)], encode, random.Random(0))
        finally:
            loss.cfg.caption_dropout = saved


def _latent_shape(model) -> tuple[int, int, int]:
    cfg = model.cfg
    return cfg.latent_channels, cfg.latent_size, cfg.latent_size


def test_cm3_never_pushes_a_document_past_its_row(families, bpe):
    model, loss = families["chameleon"]
    budget = loss.text_budget(model, 1)
    text = Text(tuple([bpe.encode("a")[0]] * budget))
    doc = Document((text, ImageSegment(torch.zeros(3, 64, 64))))
    codes = lambda x: torch.zeros(x.shape[0], *model.code_grid, dtype=torch.long)  # noqa: E731
    saved = (loss.cfg.cm3_rate, loss.cfg.caption_dropout)
    loss.cfg.cm3_rate, loss.cfg.caption_dropout = 1.0, 0.0
    try:
        with torch.no_grad():
            for seed in range(30):  # ~2/3 of these draw at least one span
                loss(model, [doc], codes, random.Random(seed))
    finally:
        loss.cfg.cm3_rate, loss.cfg.caption_dropout = saved


def test_a_caption_too_long_for_the_row_is_skipped_when_the_data_opens(
        tmp_path, families, bpe, caplog):
    model, loss = families["transfusion"]
    root = _folder(tmp_path / "f", [LONG, LONG * 146] + ["a red circle"] * 28)
    assert len(bpe.encode(LONG)) > loss.text_budget(model, 1)
    cfg = compose("train", ["data=folder", f"data.root={root}", "data.val_share=0.1",
                            "data.image_size=64"]).data
    data = DocumentDataModule(cfg, bpe, text_budget=lambda n: loss.text_budget(model, n))
    data.setup()  # before the fix: fine here, then `document 1 has 120 positions` mid-run
    assert (len(data.train_set), len(data.val_set)) == (25, 3)  # the two long ones are out
    assert data.train_set.indices == list(range(2, 27))
    assert "skipped 2 record(s) with text longer than the" in caplog.text
    assert "data.truncate_captions=true" in caplog.text
    # every document the loader can produce now packs
    for j in range(len(data.train_set)):
        assert len(data.train_set[j].texts[0]) <= loss.text_budget(model, 1)


def test_truncate_captions_cuts_them_to_fit_instead(tmp_path, families, bpe, caplog):
    model, loss = families["transfusion"]
    root = _folder(tmp_path / "f", ["a red circle"] * 9 + [LONG])
    budget = loss.text_budget(model, 1)
    data = DocumentDataModule(
        compose("train", ["data=folder", f"data.root={root}", "data.val_share=0.1",
                          "data.truncate_captions=true"]).data, bpe,
        text_budget=lambda n: loss.text_budget(model, n))
    data.setup()
    assert len(data.train_set) + len(data.val_set) == 10
    lengths = [len(data.val_set[j].texts[0]) for j in range(len(data.val_set))]
    assert lengths == [budget]  # LONG is the last record: the held-out one, cut to fit
    assert "it is cut to fit" in caplog.text


def test_too_many_long_captions_refuse_the_folder(tmp_path, bpe):
    root = _folder(tmp_path / "f", [LONG] * 3 + ["a red circle"])
    with pytest.raises(BadDataError, match=r"3 of 4 records have text longer than the 20 "):
        fitting_records(CaptionFolder(root, size=8), bpe, TextLimit(20), max_bad_share=0.1)


def test_a_non_utf8_line_is_one_bad_record_not_a_bad_folder(tmp_path, caplog):
    root = _folder(tmp_path / "f", [f"caption {i}" for i in range(12)])
    index = root / "captions.jsonl"
    lines = index.read_bytes().splitlines(keepends=True)
    lines[3] = b'{"file": "3.png", "caption": "caf\xe9 au lait"}\n'  # Latin-1, not UTF-8
    index.write_bytes(b"".join(lines))
    folder = CaptionFolder(root, size=8)  # UnicodeDecodeError for the whole folder before
    assert len(folder) == 11 and folder.num_bad == 1
    assert "line that is not UTF-8" in caplog.text and "captions.jsonl:4" in caplog.text


def test_check_data_reports_long_captions_against_a_recipe(tmp_path):
    root = _folder(tmp_path / "f", ["a red circle"] * 19 + [LONG])
    proc = subprocess.run([sys.executable, "scripts/check_data.py", str(root),
                           "--experiment", "transfusion_tiny"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 record(s) with text longer than the" in proc.stderr
    assert "19 record(s) fit" in proc.stdout


def test_resumable_sampler_order_depends_on_seed_and_epoch_only():
    a, b = ResumableSampler(10, seed=3), ResumableSampler(10, seed=3)
    a.set_epoch(2)
    first = list(a)
    assert sorted(first) == list(range(10)) and first == list(a)
    b.resume_at(2, 4)
    assert list(b) == first[4:]  # once: the next pass is the whole epoch again
    assert list(b) == first
    b.resume_at(2, 4)
    b.set_epoch(3)  # another epoch drops the request
    assert list(b) == a.order(3)


# -- non-finite guard ------------------------------------------------------------------
class _Flaky(torch.nn.Module):
    """A linear model whose loss is NaN at the steps listed in ``bad``."""

    def __init__(self, bad):
        super().__init__()
        self.lin, self.bad, self.calls = torch.nn.Linear(4, 1), set(bad), 0

    def loss(self, model, batch, encode, rng, generator=None):
        value = model.lin(batch).pow(2).mean()
        self.calls += 1
        return {"loss": value * float("nan") if self.calls - 1 in self.bad else value}


def _fit(flaky, steps, tmp_path, max_nonfinite=3):
    module = FusionModule(flaky, flaky.loss, None,
                          OptimConfig(warmup_steps=1, max_nonfinite_steps=max_nonfinite),
                          max_steps=steps)
    weights = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            weights.append(flaky.lin.weight.detach().clone())

    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[Watch(), FusionCheckpoint(tmp_path / "ckpt", 1, 0, 10)])
    batches = torch.utils.data.DataLoader(torch.randn(64, 4), batch_size=4)
    return module, trainer, batches, weights


def test_a_non_finite_step_applies_no_update_and_training_goes_on(tmp_path):
    flaky = _Flaky(bad={2, 3})
    module, trainer, batches, weights = _fit(flaky, 6, tmp_path)
    trainer.fit(module, batches)
    assert trainer.global_step == 6 and module.nonfinite_steps == 2
    assert torch.equal(weights[1], weights[2]) and torch.equal(weights[2], weights[3])
    assert not torch.equal(weights[3], weights[4])  # finite again: updates resume
    assert all(torch.isfinite(w).all() for w in weights)
    saved = sorted(p.name for p in (tmp_path / "ckpt").glob("step*.ckpt"))
    assert "step0000003.ckpt" not in saved and "step0000004.ckpt" not in saved  # in the streak


def test_a_streak_of_non_finite_steps_stops_the_run_keeping_the_last_good_checkpoint(tmp_path):
    flaky = _Flaky(bad=set(range(3, 100)))
    module, trainer, batches, weights = _fit(flaky, 50, tmp_path, max_nonfinite=2)
    with pytest.raises(NonFiniteTrainingError, match=r"3 steps in a row \(steps 3-5"):
        trainer.fit(module, batches)
    path, step = find_resume_checkpoint(tmp_path / "ckpt")
    assert step == 3  # the last step before the streak; nothing saved on the exception
    assert all(torch.isfinite(w).all() for w in weights)


def test_a_diverging_run_exits_non_zero_without_a_model_folder(tmp_path, tiny_vae):
    # The case: optim.lr=1e6 gave loss 5e12, then NaN, rc 0 and a saved NaN model.
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "experiment=transfusion_tiny", "debug=default",
         "logger=csv", f"image_tokenizer={tiny_vae}", f"output_dir={out}", "optim.lr=1e6",
         "optim.warmup_steps=1", "trainer.max_steps=12", "trainer.limit_val_batches=0",
         "sampling.prompts=[]"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "error: training diverged" in proc.stderr or "error: the trained weights" in proc.stderr
    assert not (out / "model").exists()


def test_a_config_mistake_is_one_line_without_a_traceback(tmp_path):
    # data=folder without data.root printed its words under a full Hydra traceback before
    # (FUSION_DEBUG=1 keeping the traceback: tests/test_reliability_parts.py)
    cmd = [sys.executable, "scripts/train.py", "experiment=transfusion_tiny", "debug=default",
           "data=folder", f"output_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: data.source=folder needs data.root=/path/to/folder" in proc.stderr


def test_checking_grid_prompts_leaves_the_model_in_training_mode(families, bpe, tiny_vae):
    from fusion.training.samplers import make_image_sampler

    model, loss = families["transfusion"]
    model.train()
    cfg = compose("train", ["experiment=transfusion_tiny"])
    make_image_sampler(cfg, bpe, load_image_tokenizer(str(tiny_vae)), loss,
                       check_prompts_for=model)
    assert all(m.training for m in model.modules())
    cfg.sampling.prompts = [LONG * 10]
    with pytest.raises(Exception, match="sampling.prompts entry 1"):
        make_image_sampler(cfg, bpe, load_image_tokenizer(str(tiny_vae)), loss,
                           check_prompts_for=model)


def test_checkpoints_also_come_by_wall_time(tmp_path):
    # The reported case: checkpoints every 500 steps only, so a run killed at step 60 had
    # none. A time interval saves regardless of the step count (here: every step's worth).
    flaky = _Flaky(bad=set())
    module = FusionModule(flaky, flaky.loss, None, OptimConfig(warmup_steps=1), max_steps=5)
    trainer = L.Trainer(max_steps=5, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[FusionCheckpoint(tmp_path / "ckpt", 0, 1e-6, 10)])
    trainer.fit(module, torch.utils.data.DataLoader(torch.randn(64, 4), batch_size=4))
    saved = sorted(p.name for p in (tmp_path / "ckpt").glob("step*.ckpt"))
    assert len(saved) >= 3, saved  # no step interval at all: these came by time
    assert find_resume_checkpoint(tmp_path / "ckpt")[1] == 5
