"""scripts/train.py and scripts/sample.py end to end with the debug config (tiny VAE)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from fusion.image.vae import VAETokenizer, build_autoencoder

    path = tmp_path_factory.mktemp("vae")
    VAETokenizer(build_autoencoder((16, 16, 16, 16), 1, 4, 8, False)).save_pretrained(path)
    return path


def _run(*args, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_transfusion_train_resume_and_sample(tmp_path, tiny_vae):
    out = tmp_path / "run"
    common = ["scripts/train.py", "experiment=transfusion_tiny", "debug=default",
              f"image_tokenizer={tiny_vae}", f"output_dir={out}", "logger=csv",
              "sampling.diffusion_steps=2", "sampling.prompts=[a photo of a red circle]"]
    _run(*common)
    model_dir = out / "model"
    meta = json.loads((model_dir / "config.json").read_text())
    assert meta["steps"] == 4 and (model_dir / "model.safetensors").exists()
    assert (out / "checkpoints" / "last.ckpt").exists()
    assert list((out / "samples").glob("*.png"))
    # an interrupted run resumes from last.ckpt: asking for 6 steps trains 2 more
    _run(*common, "trainer.max_steps=6")
    assert json.loads((model_dir / "config.json").read_text())["steps"] == 6
    # scripts/sample.py is a thin wrapper of run_sampling; run its three tasks in-process
    from fusion.config import compose
    from fusion.sampling.run import run_sampling

    for task in ("text_to_image", "image_to_text", "text_to_text"):
        cfg = compose("sample", [f"model_dir={model_dir}", f"task={task}",
                                 f"output_dir={tmp_path / 'samples'}", "num_images=2",
                                 "max_new_tokens=3", "sampling.diffusion_steps=2",
                                 "prompts=[a photo of a circle]"])
        assert run_sampling(cfg)["count"] >= 1
        assert (tmp_path / "samples" / f"{task}.jsonl").exists()
    # scripts/evaluate.py model: the main job's evaluation for any saved model
    report = tmp_path / "eval.json"
    _run("scripts/evaluate.py", "model", "--model", str(model_dir), "--images-per-tag", "2",
         "--caption-images", "2", "--steps", "2", "--no-fid", "--json", str(report))
    scores = json.loads(report.read_text())
    assert scores["model"] == str(model_dir) and scores["caption_images"] == 2
    assert 0.0 <= scores["geneval_overall"] <= 1.0 and "fid_shapes" not in scores


def test_build_rejects_a_mismatched_latent_setting(tiny_vae):
    from fusion.config import compose
    from fusion.data.text import TextTokenizer
    from fusion.training.build import build_family, load_image_tokenizer

    cfg = compose("train", ["experiment=transfusion_tiny", "model.arch.latent_channels=16"])
    tok = TextTokenizer.from_file(ROOT / "tokenizers/shapes-bpe/tokenizer.json")
    with pytest.raises(ValueError, match="latent_channels=16 but the image tokenizer gives 4"):
        build_family(cfg.model, tok, load_image_tokenizer(str(tiny_vae)), 64)


def test_every_experiment_composes():
    from fusion.config import CONF_DIR, compose

    names = [p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")]
    assert {"transfusion_tiny", "chameleon_tiny"} <= set(names)
    for name in names:
        cfg = compose("train", [f"experiment={name}", "debug=default"])
        assert cfg.model.family in ("transfusion", "chameleon")
