"""The 256-px recipes (experiment=transfusion_256 | chameleon_256, docs/recipes_256.md) at smoke
size: tiny random tokenizers saved as a user has them (a diffusers ``AutoencoderKL`` folder, a
fusion VQ-GAN artifact at f16 with the shipped 15,360-code quantiser), scripts/train.py with
the recipe and a tiny backbone, then the model folder through ``FusionPipeline``. No downloads:
every run is offline (HF_HUB_OFFLINE=1)."""

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a red circle"
# The recipe with a tiny backbone and a short run: what the test changes, nothing else.
SMOKE = ["debug=default", "model.arch.backbone=tiny", "trainer.max_steps=2", "logger=csv",
         "data.batch_size=2", "data.num_train=4", "data.num_val=2", "trainer.limit_val_batches=0",
         "callbacks.checkpoint_every_n_steps=0", "callbacks.progress_bar=none",
         f"sampling.prompts=[{PROMPT}]", "sampling.diffusion_steps=2"]


def _autoencoder_kl(latent_channels: int, **kw):
    """A tiny random diffusers AutoencoderKL, f8 (four levels) like SD's and FLUX's."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
                         latent_channels=latent_channels, mid_block_add_attention=False, **kw)


def _shipped_quantizer(kind: str = "fsq") -> dict:
    """conf/tokenizer/vqgan_f16.yaml's quantiser of ``kind``, as VQTokenizer takes it."""
    from omegaconf import OmegaConf

    from fusion.config import compose

    q = compose("train_tokenizer", ["tokenizer=vqgan_f16"]).tokenizer.quantizer
    return {"kind": kind, **OmegaConf.to_container(q[kind], resolve=True)}


def _tiny_f16_vqgan(kind: str = "fsq"):
    """A tiny random VQ-GAN at f16 (five levels) with the shipped quantiser."""
    from fusion.image.vqgan import VQTokenizer

    torch.manual_seed(0)
    return VQTokenizer({"block_out_channels": [8] * 5, "layers_per_block": 1,
                        "latent_channels": 8, "norm_num_groups": 4,
                        "mid_block_add_attention": False}, _shipped_quantizer(kind))


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """The on-disk tokenizers a user brings: SD-style (4 channels) and FLUX-style (16 channels,
    no quant convs, a shift) diffusers VAE folders (config.json +
    diffusion_pytorch_model.safetensors), and a fusion VQ-GAN artifact at f16."""
    root = tmp_path_factory.mktemp("user_tokenizers")
    _autoencoder_kl(4).save_pretrained(root / "sd-style-vae")
    _autoencoder_kl(16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                    shift_factor=0.1159).save_pretrained(root / "flux-style-vae")
    _tiny_f16_vqgan().save_pretrained(root / "vqgan-f16")
    return root


@pytest.fixture(scope="module")
def trained(user_files, tmp_path_factory):
    """Both recipes trained by scripts/train.py, the two runs side by side (one thread each):
    {family: the run's output_dir}. Each run reads its own copy of the user's tokenizer, which
    is deleted afterwards, so that sampling can only use the model folder's copy."""
    root = tmp_path_factory.mktemp("recipes_256")
    # Chameleon unguided: 256 codes drawn one by one are its slowest part, and CFG doubles them
    # (guidance itself is tested with chameleon_tiny).
    runs = {"transfusion": ("transfusion_256", "sd-style-vae", []),
            "chameleon": ("chameleon_256", "vqgan-f16", ["sampling.guidance_scale=null"])}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = {}
    for family, (experiment, tokenizer, extra) in runs.items():
        given = shutil.copytree(user_files / tokenizer, root / f"given-{tokenizer}")
        cmd = [sys.executable, "scripts/train.py", f"experiment={experiment}",
               f"image_tokenizer={given}", f"output_dir={root / family}", *SMOKE, *extra]
        procs[family] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True), given)
    failed = []
    try:
        for family, (proc, given) in procs.items():
            out, _ = proc.communicate(timeout=300)
            shutil.rmtree(given)
            if proc.returncode:
                failed.append(f"{family}: rc {proc.returncode}\n{out[-4000:]}")
    finally:  # a run that timed out is not left behind
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
    assert not failed, "\n".join(failed)
    return {family: root / family for family in runs}


def _sample_one(model_dir: Path):
    from fusion import FusionPipeline

    pipe = FusionPipeline.from_pretrained(model_dir)
    images = pipe(PROMPT, num_images=1, progress=False, diffusion_steps=2)
    assert len(images) == 1 and images[0].size == (256, 256)
    return pipe


@pytest.mark.slow  # two training runs of the real recipes' shapes
def test_transfusion_256_trains_on_a_diffusers_vae_folder_and_samples(trained):
    model_dir = trained["transfusion"] / "model"
    meta = json.loads((model_dir / "config.json").read_text())
    assert meta["steps"] == 2 and meta["image_size"] == 256
    # The model folder holds the user's diffusers folder as it was given.
    copy = model_dir / "image_tokenizer"
    assert json.loads((copy / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    assert (copy / "diffusion_pytorch_model.safetensors").is_file()
    pipe = _sample_one(model_dir)  # the original folder is gone: the copy is read
    tok = pipe.image_tokenizer
    assert (tok.latent_channels, tok.latent_grid(256)) == (4, (32, 32))
    assert float(tok.scale) == pytest.approx(0.18215)  # its config's (diffusers' default)
    assert pipe.model.tokens_per_image == 256  # 32x32 latents in 2x2 patches


@pytest.mark.slow  # two training runs of the real recipes' shapes
def test_chameleon_256_trains_on_an_f16_vqgan_and_samples(trained):
    model_dir = trained["chameleon"] / "model"
    meta = json.loads((model_dir / "config.json").read_text())
    assert meta["steps"] == 2 and meta["image_size"] == 256
    pipe = _sample_one(model_dir)
    tok = pipe.image_tokenizer
    assert tok.downsample_factor == 16 and tok.codebook_size == 15360
    assert pipe.model.code_grid == (16, 16)  # 256 codes per image


def _one_batch(cfg, tokenizer):
    from fusion.data.datamodule import DocumentDataModule

    data = DocumentDataModule(cfg.data, tokenizer)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


@pytest.mark.parametrize("patchifier", ["linear", "unet"])
def test_transfusion_256_takes_a_16_channel_vae(user_files, tokenizer, patchifier):
    # FLUX/SD3-style: 16 latent channels, no quant convs, scale and shift from its config.
    from fusion.config import compose
    from fusion.families import build_family, load_image_tokenizer

    cfg = compose("train", ["experiment=transfusion_256", "model.arch.backbone=tiny",
                            f"model.arch.patchifier={patchifier}", "data.batch_size=2",
                            "data.num_train=4", "data.num_val=2",
                            f"image_tokenizer={user_files / 'flux-style-vae'}"])
    image_tok = load_image_tokenizer(cfg.image_tokenizer)
    assert (image_tok.latent_channels, float(image_tok.scale), float(image_tok.shift)) == (
        16, pytest.approx(0.3611), pytest.approx(0.1159))
    model, loss = build_family(cfg.model, tokenizer, image_tok, cfg.data.image_size)
    assert model.tokens_per_image == 256
    out = loss(model, _one_batch(cfg, tokenizer), image_tok.encode, random.Random(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["diffusion_loss"] > 0


@pytest.mark.parametrize("kind", ["fsq", "vq", "lfq"])
def test_vqgan_f16_config_gives_256_codes_from_8k_or_more(kind):
    from fusion.config import compose

    cfg = compose("train_tokenizer", ["tokenizer=vqgan_f16"]).tokenizer
    assert 2 ** (len(cfg.autoencoder.block_out_channels) - 1) == 16
    size = math.prod(cfg.quantizer.fsq.levels) if kind == "fsq" else \
        cfg.quantizer[kind].codebook_size
    assert size >= 8192
    tok = _tiny_f16_vqgan(kind).eval()  # the shipped quantiser behind a tiny f16 network
    assert tok.codebook_size == size
    codes = tok.encode(torch.rand(1, 3, 256, 256) * 2 - 1)
    assert codes.shape == (1, 16, 16) and 0 <= int(codes.min()) <= int(codes.max()) < size
    assert tok.decode(codes).shape == (1, 3, 256, 256)


def test_recipes_compose_at_their_real_sizes():
    from fusion.config import compose

    for experiment in ("transfusion_256", "chameleon_256"):
        cfg = compose("train", [f"experiment={experiment}"])
        assert cfg.model.arch.backbone == "small"
        assert (cfg.data.image_size, cfg.data.batch_size) == (256, 8)
    # chameleon_256 reads the artifact that tokenizer=vqgan_f16 writes
    stage1 = compose("train_tokenizer", ["tokenizer=vqgan_f16"]).tokenizer
    assert compose("train", ["experiment=chameleon_256"]).image_tokenizer == stage1.artifact_dir


def test_a_diffusers_pipeline_folder_is_refused_naming_its_vae(user_files, tmp_path):
    from fusion.families import load_image_tokenizer
    from fusion.image.artifacts import TokenizerLoadError

    pipeline = tmp_path / "sd-pipeline"
    shutil.copytree(user_files / "sd-style-vae", pipeline / "vae")
    (pipeline / "model_index.json").write_text("{}")
    with pytest.raises(TokenizerLoadError, match="pass its VAE subfolder .*sd-pipeline/vae"):
        load_image_tokenizer(str(pipeline))
    assert load_image_tokenizer(str(pipeline / "vae")).latent_channels == 4
