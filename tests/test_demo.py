"""The README's main command, end to end with the debug config, and stage reuse."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    first = _run(out)
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
    second = _run(out)
    assert second.count("reused") == 8  # every stage
    # a changed setting redoes the stages it touches, and only those
    third = _run(out, "demo.grid_images=4")
    assert "[text_tokenizer] reused" in third and "[train] reused" in third
    assert "[edit_finetune] reused" in third
    assert "[shapes_preview] reused" not in third
