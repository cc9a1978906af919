"""FID/KID plumbing, the ShapesWorld feature network, and reconstruction metrics."""

import importlib.util
import os
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fusion.data.shapes import ShapesWorld
from fusion.eval import fid as fid_module
from fusion.eval.features import SHAPES_FEATURES_DIR, ShapesFeatureNet
from fusion.eval.fid import FIDScorer, ImageSet, compute_fid, shapes_fid
from fusion.eval.reconstruction import reconstruction_metrics

REPO = Path(__file__).resolve().parents[1]


class MeanColour(nn.Module):
    """A user feature network without ``num_features``: per-channel mean and std (6-d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Reference Fréchet distance, written independently of torchmetrics."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


# Tiny networks gain nothing from a second thread on a shared CPU (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_sets():
    return ImageSet.shapes(64, start=50_000), ImageSet.shapes(48, start=60_000)


# --------------------------------------------------------------------------------------------
# The ShapesWorld feature network
# --------------------------------------------------------------------------------------------
def test_shipped_feature_net_loads_from_safetensors_without_unpickling(monkeypatch):
    def no_pickles(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_pickles)
    net = ShapesFeatureNet.from_pretrained(SHAPES_FEATURES_DIR)
    assert (REPO / SHAPES_FEATURES_DIR / "model.safetensors").is_file()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.num_features == 128
    images = torch.from_numpy(np.stack([ShapesWorld(0).image(i) for i in range(4)]))
    x = images.permute(0, 3, 1, 2)
    f = net(x)
    assert f.shape == (4, 128) and torch.isfinite(f).all()
    # other sizes are resized, float input is read as [-1, 1]
    assert net(torch.nn.functional.interpolate(x.float(), 128) / 127.5 - 1).shape == (4, 128)
    # the heads recognise the scenes it was trained for (a smoke check, not the accuracy)
    assert net.config.metrics["scene_exact"] > 0.5


def test_feature_net_round_trips_and_missing_artifact_is_explained(tmp_path):
    net = ShapesFeatureNet(width=8, num_features=16).eval()
    net.save_pretrained(tmp_path / "f")
    again = ShapesFeatureNet.from_pretrained(tmp_path / "f")
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(net(x), again(x))
    with pytest.raises(FileNotFoundError, match="train_shapes_features.py"):
        ShapesFeatureNet.from_pretrained(tmp_path / "nothing")


def test_training_writes_a_loadable_artifact(tmp_path):
    from fusion.eval.features import train_shapes_features

    net, report = train_shapes_features(tmp_path / "f", steps=2, batch_size=8, num_val=16,
                                        progress=False, width=8, num_features=16)
    assert report["steps"] == 2 and {"scene_exact", "count", "feature_scale"} <= set(report)
    assert {p.name for p in (tmp_path / "f").iterdir()} == {"config.json", "model.safetensors",
                                                            "card.md"}
    again = ShapesFeatureNet.from_pretrained(tmp_path / "f")
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(net(x), again(x))


# --------------------------------------------------------------------------------------------
# FID / KID
# --------------------------------------------------------------------------------------------
def test_fid_matches_a_reference_and_uses_target_modules(small_sets, tmp_path):
    real, fake = small_sets
    scorer = FIDScorer(real, {"_target_": "test_fid.MeanColour"}, kid=True, kid_subset_size=32,
                       cache_dir=tmp_path, progress=False)
    out = scorer(fake)
    feats = [MeanColour()(torch.from_numpy(s.read(0, len(s))).permute(0, 3, 1, 2)).double()
             .numpy() for s in (real, fake)]
    assert out["fid"] == pytest.approx(frechet(*feats), rel=1e-3, abs=1e-6)
    assert out["feature"].startswith("target:") and out["real_cache"] == "miss"
    assert np.isfinite(out["kid_mean"]) and out["n_real"] == 64 and out["n_fake"] == 48
    with pytest.raises(ValueError, match="needs a '_target_'"):
        FIDScorer(real, {"name": "x"}, cache_dir=None)


def test_real_statistics_cache_hit_skips_recomputation(small_sets, tmp_path, monkeypatch):
    real, fake = small_sets
    first = FIDScorer(real, "shapes", kid_subset_size=32, cache_dir=tmp_path, progress=False)
    a = first(fake)
    assert a["real_cache"] == "miss" and "kid_mean" in a
    assert first.cache_path().is_file() and first.cache_path().suffix == ".safetensors"
    again_same_scorer = first(fake)  # in memory: real statistics kept across fake sets
    assert again_same_scorer["fid"] == a["fid"]

    def boom(start, stop):
        raise AssertionError("real images were read again")

    cached_real = ImageSet(real.name, real.size, real.count, boom, key=real.key)
    second = FIDScorer(cached_real, "shapes", kid_subset_size=32, cache_dir=tmp_path,
                       progress=False)
    b = second(fake)
    assert b["real_cache"] == "hit"
    assert (b["fid"], b["kid_mean"], b["kid_std"]) == (a["fid"], a["kid_mean"], a["kid_std"])
    # a different n is a different key: recomputed (and here, the reader fails)
    other = ImageSet(real.name, real.size, real.count - 1, boom, key=real.key + "x")
    with pytest.raises(AssertionError, match="read again"):
        FIDScorer(other, "shapes", cache_dir=tmp_path, progress=False)(fake)


def test_identical_sets_score_near_zero_and_noise_far(small_sets, tmp_path):
    real, _ = small_sets
    same = compute_fid(real, real, cache_dir=None, kid=False, progress=False)
    assert abs(same["fid"]) < 1e-2
    noise = shapes_fid(ImageSet.noise(48), n_real=64, cache_dir=None, kid=False,
                       progress=False)
    assert noise["fid"] > 100 * max(abs(same["fid"]), 1e-2)


class FakeInception(nn.Module):
    """Stands in for torchmetrics' NoTrainInceptionV3 where torch-fidelity is missing."""

    calls: list = []
    num_features = 6  # fusion sets 2048 only where the network does not say

    def __init__(self, name, features_list, feature_extractor_weights_path=None):
        super().__init__()
        FakeInception.calls.append((name, features_list, feature_extractor_weights_path))
        self.pool = MeanColour()

    def forward(self, x):
        assert x.dtype == torch.uint8  # what the real one requires
        return self.pool(x)


def test_inception_weights_path_reaches_torchmetrics(small_sets, tmp_path, monkeypatch):
    real, fake = small_sets
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"not really weights")
    import torchmetrics.image.fid as tm_fid

    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", FakeInception)
    monkeypatch.setattr(fid_module, "_has_torch_fidelity", lambda: True)
    FakeInception.calls.clear()
    out = FIDScorer(real, "inception", weights_path=weights, cache_dir=tmp_path,
                    progress=False)(fake)
    assert FakeInception.calls == [("inception-v3-compat", ["2048"], str(weights))]
    assert out["feature"].startswith("inception-2048:") and "kid_mean" not in out
    monkeypatch.setenv(fid_module.INCEPTION_WEIGHTS_ENV, str(weights))
    FIDScorer(real, "inception", cache_dir=None, progress=False)
    assert FakeInception.calls[-1][2] == str(weights)
    monkeypatch.delenv(fid_module.INCEPTION_WEIGHTS_ENV)
    with pytest.raises(ValueError, match="needs a local weights file"):
        FIDScorer(real, "inception", cache_dir=None)
    with pytest.raises(FileNotFoundError, match="not found"):
        FIDScorer(real, "inception", weights_path=tmp_path / "missing.pth", cache_dir=None)
    monkeypatch.setattr(fid_module, "_has_torch_fidelity", lambda: False)
    with pytest.raises(ModuleNotFoundError, match=r"fusion\[inception\]"):
        FIDScorer(real, "inception", weights_path=weights, cache_dir=None)


def test_default_path_never_imports_torchvision(small_sets):
    real, fake = small_sets
    compute_fid(real, fake, cache_dir=None, kid=False, progress=False)
    assert "torchvision" not in sys.modules and "torch_fidelity" not in sys.modules


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None
                    or not os.environ.get("FUSION_INCEPTION_WEIGHTS"),
                    reason="needs the optional extra fusion[inception] (torch-fidelity, "
                           "torchvision) and $FUSION_INCEPTION_WEIGHTS (a local weights file)")
def test_inception_end_to_end(small_sets):
    real, fake = small_sets
    out = FIDScorer(real, "inception", cache_dir=None, progress=False)(fake)
    assert out["fid"] > 0


def test_folders_and_bad_inputs(tmp_path, small_sets):
    real, _ = small_sets
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageSet.folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        ImageSet.folder(tmp_path / "empty")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(real.read(i, i + 1)[0]).save(folder / f"{i}.png")
    images = ImageSet.folder(folder)
    assert (images.size, len(images)) == (64, 6)
    np.testing.assert_array_equal(images.read(0, 6), real.read(0, 6))
    Image.new("RGB", (32, 32)).save(folder / "small.png")
    with pytest.raises(ValueError, match=r"not 64x64 \(first: .*small.png is 32x32\)"):
        ImageSet.folder(folder)
    assert len(ImageSet.folder(folder, size=64, resize="pad")) == 7
    with pytest.raises(ValueError, match="are 32 px but the real set's are 64 px"):
        compute_fid(real, ImageSet.noise(4, size=32), cache_dir=None, progress=False)
    with pytest.raises(ValueError, match=r"expected uint8 \(N, S, S, 3\)"):
        ImageSet.arrays(np.zeros((4, 64, 64), np.uint8))
    with pytest.raises(ValueError, match="unknown feature network"):
        FIDScorer(real, "vgg", cache_dir=None)


@pytest.mark.slow
def test_fid_sanity_figures(tmp_path):
    """docs/evaluation.md: two disjoint real sets of 2,000 vs real against noise."""
    real = ImageSet.shapes(2000, start=50_000)
    scorer = FIDScorer(real, "shapes", cache_dir=tmp_path)
    real_real = scorer(ImageSet.shapes(2000, start=52_000))
    real_noise = scorer(ImageSet.noise(2000))
    assert real_real["fid"] * 20 < real_noise["fid"]
    assert real_real["kid_mean"] < real_noise["kid_mean"]


# --------------------------------------------------------------------------------------------
# Reconstruction metrics
# --------------------------------------------------------------------------------------------
def test_reconstruction_metrics():
    world = ShapesWorld(0)
    originals = np.stack([world.image(i) for i in range(8)])
    perfect = reconstruction_metrics(originals, originals.copy(), progress=False)
    assert perfect == {"images": 8, "psnr": 100.0, "ssim": pytest.approx(1.0),
                       "attribute_accuracy": 1.0}
    noisy = np.clip(originals + np.random.default_rng(0).normal(0, 8, originals.shape), 0,
                    255).astype(np.uint8)
    out = reconstruction_metrics(originals, noisy, scenes=[world.scene(i) for i in range(8)],
                                 progress=False)
    assert 25 < out["psnr"] < 40 and out["ssim"] < 1 and out["attribute_accuracy"] == 1.0
    wrong = originals[::-1].copy()  # every reconstruction is another scene
    assert reconstruction_metrics(originals, wrong, progress=False)["attribute_accuracy"] < 0.5
    with pytest.raises(ValueError, match="differ in shape"):
        reconstruction_metrics(originals, originals[:4], progress=False)


class Identity(nn.Module):
    """A stand-in tokenizer: encode/decode on float (B, 3, H, W) in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def encode(self, x):
        return x * self.w

    def decode(self, z):
        return z


def test_reconstruct_round_trips_through_a_tokenizer():
    from fusion.eval.reconstruction import reconstruct

    images = np.stack([ShapesWorld(0).image(i) for i in range(5)])
    tok = Identity().train()
    np.testing.assert_array_equal(reconstruct(tok, images, batch_size=2, progress=False), images)
    assert tok.training  # mode restored


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------
def test_evaluate_script_fid_and_errors(tmp_path, capsys, monkeypatch):
    main = runpy.run_path(str(REPO / "scripts" / "evaluate.py"))["main"]
    monkeypatch.delenv("FUSION_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    out = main(["fid", "--real", "shapes", "--fake", "noise", "--n", "32", "--cache-dir", "none",
                "--json", str(tmp_path / "fid.json")])
    assert out["fid"] > 10 and (tmp_path / "fid.json").is_file()
    capsys.readouterr()
    # user errors: one `error:` line on stderr and exit status 2 (fusion.errors)
    for argv, message in (
            (["fid", "--real", "shapes", "--fake", str(tmp_path / "missing")],
             "error: image folder .* does not exist"),
            (["geneval", "--images", str(tmp_path / "missing")],
             "error: GenEval image folder .* does not exist")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and re.match(message, err) and err.count("\n") == 1
