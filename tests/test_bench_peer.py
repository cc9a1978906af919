"""scripts/bench.py peer: fusion against transfusion-pytorch (the `bench` extra) side by side."""

import re

import pytest

from fusion.benchmarks import peer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_peer_gets_fusions_documents_in_order_with_the_same_latent_patches():
    import torch

    from fusion.data.documents import Document, Image, Text
    from fusion.models.patchify import latent_to_patches

    pixels = [torch.full((3, 8, 8), float(i)) for i in range(3)]
    docs = [Document((Text((5, 6)), Image(pixels[0]))),
            Document((Image(pixels[1]), Text((7,)))),
            Document((Text((8,)), Image(pixels[2])))]

    def encode(p):  # (I, 3, 8, 8) -> (I, 4, 4, 4): a stand-in VAE
        return p[:, :1].repeat(1, 4, 1, 1)[..., ::2, ::2] + torch.arange(4.0).view(1, 4, 1, 1)

    out = peer.peer_documents(docs, encode, patch_size=2)
    assert [len(d) for d in out] == [2, 2, 2]
    assert out[0][0].tolist() == [5, 6] and out[1][1].tolist() == [7]
    for doc, (k, i) in zip(out, ((1, 0), (0, 1), (1, 2)), strict=True):
        image = doc[k]
        assert image.shape == (2, 2, 16)  # the peer's (grid h, grid w, p·p·C)
        expected = latent_to_patches(encode(pixels[i][None]), 2)[0]
        assert torch.equal(image.flatten(0, 1), expected)


@pytest.mark.slow  # ~15 s: both models built, trained and sampled once
def test_peer_benchmark_prints_both_rows_and_their_ratios(capsys):
    pytest.importorskip("transfusion_pytorch")
    peer.main(["--batch", "4", "--rounds", "1", "--warmup", "0", "--sample-batch", "1",
               "--steps", "2"])
    out = capsys.readouterr().out
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| (fusion|transfusion-pytorch) \|.*$",
                                                        out, re.M)}
    assert set(rows) == {"fusion", "transfusion-pytorch"}
    assert rows["transfusion-pytorch"].endswith("| 1.00x | 1.00x |")
    assert "training batch 4 documents" in out and "width 256, depth 4, heads 4" in out
    fusion_params = float(rows["fusion"].split("|")[2].strip(" M"))
    assert 3.0 < fusion_params < 4.0  # transfusion_tiny


def test_peer_benchmark_says_so_when_the_peer_is_missing(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "transfusion_pytorch", None)  # import fails
    peer.main([])
    assert "skipped, transfusion-pytorch is not installed" in capsys.readouterr().out
