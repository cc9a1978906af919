"""The README's main command, end to end with the debug config, and stage reuse."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fusion.pipeline import best_results, write_results

ROOT = Path(__file__).resolve().parents[1]


FAST = ["debug=default", "demo.eval_images_per_tag=2", "demo.eval_caption_images=4",
        "demo.train_overrides=['sampling.diffusion_steps=2']",
        "demo.edit_overrides=['sampling.diffusion_steps=2']", "demo.edit_per_kind=1"]


def _run(out: Path, *extra: str) -> str:
    # A tiny untrained VAE artifact stands in for the shipped one (training it is
    # scripts/train_tokenizer.py's own test); the demo reuses an artifact that exists.
    vae = out.parent / "vae"
    if not (vae / "config.json").exists():
        from fusion.image.vae import VAETokenizer, build_autoencoder

        VAETokenizer(build_autoencoder((16, 16, 16, 16), 1, 4, 8, False)).save_pretrained(vae)
    proc = subprocess.run([sys.executable, "scripts/demo.py", *FAST, f"output_dir={out}",
                           f"demo.image_tokenizer={out.parent / 'vae'}", *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# ~60 s: with transformers installed for the converter tests (diffusers then imports it in
# every process), the default suite passed its 5-minute limit; CI runs the slow checks too.
@pytest.mark.slow
def test_demo_runs_and_reuses_finished_stages(tmp_path):
    out = tmp_path / "demo"
    first = _run(out, "demo.edit_steps=1")  # the edit stage is off by default
    for name in ("results.md", "results.json", "shapes_grid.png", "stages.json",
                 "text_tokenizer/tokenizer.json", "samples.png", "samples_captions.png",
                 "eval.json", "transfusion/model/model.safetensors", "edits.png",
                 "edit_eval.json", "edit_transfusion/model/model.safetensors"):
        assert (out / name).exists(), name
    results = json.loads((out / "results.json").read_text())
    assert results["detector_exact_recovery"] >= 0.99
    assert results["family"] == "transfusion" and results["train_steps"] == 4
    for key in ("geneval_overall", "fid_shapes", "caption_single_object_accuracy",
                "edit_accuracy", "edit_accuracy_recolor", "edit_psnr"):
        assert key in results
    table = (out / "results.md").read_text()
    assert table.strip() in first  # the printed table is the written one
    assert "reused" not in first
    best = best_results("transfusion")
    assert set(best) <= results.keys()  # every reference names a metric the job prints
    for key, (value, where) in best.items():
        assert f"| {key} | " in table and f"{value:.4g} ({where})" in table
    second = _run(out, "demo.edit_steps=1")
    assert second.count("reused") == 8  # every stage
    # a changed setting redoes the stages it touches, and only those
    third = _run(out, "demo.edit_steps=1", "demo.grid_images=4")
    assert "[text_tokenizer] reused" in third and "[train] reused" in third
    assert "[edit_finetune] reused" in third
    assert "[shapes_preview] reused" not in third


def test_edit_stage_is_off_by_default():
    from fusion.config import DemoSettings

    assert DemoSettings().edit_steps == 0


@pytest.mark.parametrize("family", ["transfusion", "chameleon"])
def test_results_table_shows_the_best_figure_in_docs_beside_each_score(tmp_path, family):
    best = best_results(family)
    printed = {"geneval_overall", "fid_shapes", "geneval_empty_share",
               "caption_single_object_accuracy", "caption_single_object_class_accuracy",
               "edit_accuracy", "edit_psnr",
               *(f"edit_accuracy_{k}" for k in ("recolor", "move", "add", "remove"))}
    assert {"geneval_overall", "fid_shapes", "caption_single_object_accuracy",
            "edit_accuracy_recolor"} <= best.keys() <= printed  # no stale metric names
    table = write_results(tmp_path, {"family": family, "train_steps": 10,
                                     "geneval_overall": 0.125, "fid_shapes": 9.5})
    rows = table.splitlines()
    assert rows[0] == "| metric | this run | best in docs/ (where) |"
    value, where = best["geneval_overall"]
    assert f"| geneval_overall | 0.125 | {value:.4g} ({where}) |" in rows
    assert "| train_steps | 10 |  |" in rows  # no reference: an empty cell
    assert (tmp_path / "results.md").read_text() == table
    assert json.loads((tmp_path / "results.json").read_text())["fid_shapes"] == 9.5
