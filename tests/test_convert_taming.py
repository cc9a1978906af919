"""fusion.convert.taming: a taming-transformers VQ-GAN (Chameleon's image tokenizer) as
fusion's VQTokenizer, checked against a reference taming forward written here over the state
dict (independent of diffusers), through files and artifacts, and against Hugging Face's
ChameleonVQVAE when transformers is installed. Tiny random models, CPU."""

import argparse
import logging

import pytest
import torch
import torch.nn.functional as F
import yaml

from fusion.convert.taming import (
    TamingConversionError,
    ddconfig_from_hf,
    read_taming_vqgan,
    vqgan_from_taming,
    vqgan_from_taming_files,
)
from fusion.errors import UserError
from fusion.image.vqgan import VQTokenizer

# 3 levels (f4; levels 1 and 2 share a width, so a reversed decoder would still fit its
# shapes and only the values catch it), a width change (nin_shortcut) in both directions,
# z_channels != embed_dim (quant_conv is not square).
DDCONFIG = {"double_z": False, "z_channels": 16, "resolution": 32, "in_channels": 3,
            "out_ch": 3, "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1,
            "attn_resolutions": [], "dropout": 0.0}
EMBED_DIM, N_EMBED = 8, 64
HF_PREFIX = "model.vqmodel."


# Tiny networks gain nothing from a second thread on a shared CPU (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- a taming-layout state dict and its reference forward -------------------------------
def resnet_shapes(prefix: str, c_in: int, c_out: int) -> dict[str, tuple]:
    shapes = {f"{prefix}.norm1.weight": (c_in,), f"{prefix}.norm1.bias": (c_in,),
              f"{prefix}.conv1.weight": (c_out, c_in, 3, 3), f"{prefix}.conv1.bias": (c_out,),
              f"{prefix}.norm2.weight": (c_out,), f"{prefix}.norm2.bias": (c_out,),
              f"{prefix}.conv2.weight": (c_out, c_out, 3, 3), f"{prefix}.conv2.bias": (c_out,)}
    if c_in != c_out:
        shapes |= {f"{prefix}.nin_shortcut.weight": (c_out, c_in, 1, 1),
                   f"{prefix}.nin_shortcut.bias": (c_out,)}
    return shapes


def attn_shapes(prefix: str, c: int) -> dict[str, tuple]:
    shapes = {f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,)}
    for name in ("q", "k", "v", "proj_out"):
        shapes |= {f"{prefix}.{name}.weight": (c, c, 1, 1), f"{prefix}.{name}.bias": (c,)}
    return shapes


def taming_shapes(dd: dict, embed_dim: int, n_embed: int) -> dict[str, tuple]:
    """Every key of taming's VQModel (Encoder, Decoder, quantiser, 1x1 convs) and its shape."""
    ch, mult, r, z = dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["z_channels"]
    levels = len(mult)
    s = {"encoder.conv_in.weight": (ch, 3, 3, 3), "encoder.conv_in.bias": (ch,)}
    c_in = ch
    for i in range(levels):
        for j in range(r):
            s |= resnet_shapes(f"encoder.down.{i}.block.{j}", c_in, ch * mult[i])
            c_in = ch * mult[i]
        if i != levels - 1:
            s |= {f"encoder.down.{i}.downsample.conv.weight": (c_in, c_in, 3, 3),
                  f"encoder.down.{i}.downsample.conv.bias": (c_in,)}
    for part in ("encoder", "decoder"):
        c = ch * mult[-1]
        s |= resnet_shapes(f"{part}.mid.block_1", c, c) | attn_shapes(f"{part}.mid.attn_1", c)
        s |= resnet_shapes(f"{part}.mid.block_2", c, c)
    s |= {"encoder.norm_out.weight": (c_in,), "encoder.norm_out.bias": (c_in,),
          "encoder.conv_out.weight": (z, c_in, 3, 3), "encoder.conv_out.bias": (z,),
          "quant_conv.weight": (embed_dim, z, 1, 1), "quant_conv.bias": (embed_dim,),
          "quantize.embedding.weight": (n_embed, embed_dim),
          "post_quant_conv.weight": (z, embed_dim, 1, 1), "post_quant_conv.bias": (z,),
          "decoder.conv_in.weight": (ch * mult[-1], z, 3, 3),
          "decoder.conv_in.bias": (ch * mult[-1],)}
    c_in = ch * mult[-1]
    for i in reversed(range(levels)):
        for j in range(r + 1):
            s |= resnet_shapes(f"decoder.up.{i}.block.{j}", c_in, ch * mult[i])
            c_in = ch * mult[i]
        if i != 0:
            s |= {f"decoder.up.{i}.upsample.conv.weight": (c_in, c_in, 3, 3),
                  f"decoder.up.{i}.upsample.conv.bias": (c_in,)}
    s |= {"decoder.norm_out.weight": (c_in,), "decoder.norm_out.bias": (c_in,),
          "decoder.conv_out.weight": (3, c_in, 3, 3), "decoder.conv_out.bias": (3,)}
    return s


def random_state(dd: dict = DDCONFIG, embed_dim: int = EMBED_DIM, n_embed: int = N_EMBED,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights at a scale that keeps activations O(1): norms near identity, convs
    ~1/sqrt(fan-in), codebook vectors at the quantised features' scale."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in taming_shapes(dd, embed_dim, n_embed).items():
        if key == "quantize.embedding.weight":
            value = torch.randn(shape, generator=g) * 0.5
        elif "norm" in key.rsplit(".", 2)[-2] and key.endswith("weight"):
            value = 1 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("bias"):
            value = 0.1 * torch.randn(shape, generator=g)
        else:
            value = torch.randn(shape, generator=g) / (shape[1] * shape[2] * shape[3]) ** 0.5
        state[key] = value
    return state


def _conv(sd, p, x, **kw):
    return F.conv2d(x, sd[f"{p}.weight"], sd[f"{p}.bias"], **kw)


def _norm(sd, p, x):
    return F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)


def ref_resnet(sd, p, x):
    h = _conv(sd, f"{p}.conv1", F.silu(_norm(sd, f"{p}.norm1", x)), padding=1)
    h = _conv(sd, f"{p}.conv2", F.silu(_norm(sd, f"{p}.norm2", h)), padding=1)
    if f"{p}.nin_shortcut.weight" in sd:
        x = _conv(sd, f"{p}.nin_shortcut", x)
    return x + h


def ref_attn(sd, p, x):
    """taming's AttnBlock: one head over all h·w positions, scale 1/sqrt(C), residual."""
    b, c, hh, ww = x.shape
    h = _norm(sd, f"{p}.norm", x)
    q, k, v = (_conv(sd, f"{p}.{n}", h).reshape(b, c, hh * ww) for n in "qkv")
    w = torch.softmax(torch.bmm(q.transpose(1, 2), k) * c ** -0.5, dim=2)  # (b, query, key)
    out = torch.bmm(v, w.transpose(1, 2)).reshape(b, c, hh, ww)
    return x + _conv(sd, f"{p}.proj_out", out)


def ref_mid(sd, p, x):
    return ref_resnet(sd, f"{p}.block_2", ref_attn(sd, f"{p}.attn_1",
                                                   ref_resnet(sd, f"{p}.block_1", x)))


def ref_encode(sd, x, dd=DDCONFIG):
    """taming Encoder -> quant_conv -> nearest code (VectorQuantizer2's distance)."""
    levels = len(dd["ch_mult"])
    h = _conv(sd, "encoder.conv_in", x, padding=1)
    for i in range(levels):
        for j in range(dd["num_res_blocks"]):
            h = ref_resnet(sd, f"encoder.down.{i}.block.{j}", h)
        if i != levels - 1:  # asymmetric padding, then a stride-2 valid conv
            h = _conv(sd, f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2)
    h = ref_mid(sd, "encoder.mid", h)
    h = _conv(sd, "encoder.conv_out", F.silu(_norm(sd, "encoder.norm_out", h)), padding=1)
    z = _conv(sd, "quant_conv", h)  # (B, D, h, w)
    b, d, hh, ww = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, d)
    e = sd["quantize.embedding.weight"]
    dist = (flat ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * flat @ e.T
    return dist.argmin(1).reshape(b, hh, ww), dist


def ref_decode(sd, codes, dd=DDCONFIG):
    """codebook rows -> post_quant_conv -> taming Decoder (up.{L-1} first)."""
    zq = sd["quantize.embedding.weight"][codes].permute(0, 3, 1, 2)
    h = _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", zq), padding=1)
    h = ref_mid(sd, "decoder.mid", h)
    for i in reversed(range(len(dd["ch_mult"]))):
        for j in range(dd["num_res_blocks"] + 1):
            h = ref_resnet(sd, f"decoder.up.{i}.block.{j}", h)
        if i != 0:
            h = _conv(sd, f"decoder.up.{i}.upsample.conv",
                      F.interpolate(h, scale_factor=2.0, mode="nearest"), padding=1)
    return _conv(sd, "decoder.conv_out", F.silu(_norm(sd, "decoder.norm_out", h)), padding=1)


def images(n: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return random_state()


@pytest.fixture(scope="module")
def reference(state):
    with torch.no_grad():
        codes, dist = ref_encode(state, images())
        return codes, ref_decode(state, codes), dist


def check_matches(tok: VQTokenizer, reference, decoder: bool = True) -> None:
    codes, decoded, _ = reference
    with torch.no_grad():
        assert torch.equal(tok.encode(images()), codes)
        if decoder:
            torch.testing.assert_close(tok.decode(codes), decoded, rtol=1e-4, atol=1e-4)


# ---- conversions ---------------------------------------------------------------------------
def test_reference_codes_are_well_posed(reference):
    """The fixture is a fair test: many codes in use and no near-tie between the nearest two
    codes (where float rounding, not the conversion, would decide)."""
    codes, decoded, dist = reference
    assert codes.shape == (2, 8, 8) and decoded.shape == (2, 3, 32, 32)
    assert codes.unique().numel() >= 10
    top2 = dist.topk(2, dim=1, largest=False).values
    assert float((top2[:, 1] - top2[:, 0]).min()) > 1e-4


def test_converted_tokenizer_matches_the_reference_and_round_trips(state, reference,
                                                                   tmp_path):
    tok = vqgan_from_taming(state, DDCONFIG, EMBED_DIM, N_EMBED, info={"note": "kept"})
    assert not tok.training and tok.codebook_size == N_EMBED and tok.downsample_factor == 4
    assert (tok.latent_channels, tok.code_channels) == (16, EMBED_DIM)
    assert tok.info["decoder"] == "converted" and tok.info["note"] == "kept"
    assert tok.info["taming"]["n_embed"] == N_EMBED
    check_matches(tok, reference)

    tok.save_pretrained(tmp_path / "art")
    loaded = VQTokenizer.from_pretrained(tmp_path / "art")
    assert loaded.autoencoder_config["quant_conv_channels"] == EMBED_DIM
    assert loaded.info["decoder"] == "converted"
    check_matches(loaded, reference)

    # Frozen: a training pass moves no code vector (no EMA, no expiry, not a parameter).
    before = loaded.quantizer.lookup(torch.arange(N_EMBED)[None]).clone()
    loaded.train()
    loaded(images())
    assert torch.equal(loaded.quantizer.lookup(torch.arange(N_EMBED)[None]), before)
    assert not any("codebook" in name for name, _ in loaded.named_parameters())


def test_checkpoint_and_yaml_files_read_back(state, reference, tmp_path):
    extra = {"loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4),
             "loss.perceptual_loss.net.slice1.0.weight": torch.randn(4, 3, 3, 3)}
    ckpt = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": {**state, **extra}, "global_step": 7, "epoch": 1}, ckpt)
    cfg_file = tmp_path / "vqgan.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": {
        "target": "taming.models.vqgan.VQModel",
        "params": {"embed_dim": EMBED_DIM, "n_embed": N_EMBED, "ddconfig": DDCONFIG,
                   "lossconfig": {"target": "taming.modules.losses.vqperceptual.Dummy"}}}}))

    config, read = read_taming_vqgan(ckpt, cfg_file)
    assert config == {"ddconfig": DDCONFIG, "embed_dim": EMBED_DIM, "n_embed": N_EMBED}
    assert set(read) == set(state) | set(extra)
    check_matches(vqgan_from_taming(read, **config), reference)

    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "vqgan.safetensors"))
    tok = vqgan_from_taming_files(tmp_path / "vqgan.safetensors", cfg_file)
    assert tok.info["converted_from"].endswith("vqgan.safetensors")
    assert tok.info["converted_config"].endswith("vqgan.yaml")
    check_matches(tok, reference)


def test_encoder_only_state_with_a_prefix_encodes_identically(state, reference, caplog):
    """Hugging Face's ChameleonForConditionalGeneration: the encoder side under
    model.vqmodel., next to the language model's weights, and no decoder."""
    hf = {HF_PREFIX + k: v for k, v in state.items() if not k.startswith("decoder.")}
    hf |= {"model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4),
           "lm_head.weight": torch.randn(4, 4)}
    with caplog.at_level(logging.WARNING, logger="fusion.convert.taming"):
        tok = vqgan_from_taming(hf, DDCONFIG, EMBED_DIM, N_EMBED, prefix=HF_PREFIX,
                                with_decoder=False)
    assert tok.info["decoder"] == "untrained"
    assert "without a decoder" in caplog.text
    check_matches(tok, reference, decoder=False)

    with pytest.raises(TamingConversionError, match=r"missing: model\.vqmodel\.decoder\.conv_in"
                       r".*with_decoder=False"):
        vqgan_from_taming(hf, DDCONFIG, EMBED_DIM, N_EMBED, prefix=HF_PREFIX)
    with pytest.raises(TamingConversionError, match="no key starts with 'vqmodel.'"):
        vqgan_from_taming(hf, DDCONFIG, EMBED_DIM, N_EMBED, prefix="vqmodel.")


def test_hugging_face_chameleon_vqvae_gives_the_same_codes(state):
    transformers = pytest.importorskip("transformers")
    vq = {"embed_dim": EMBED_DIM, "num_embeddings": N_EMBED, "double_latent": False,
          "latent_channels": 16, "resolution": 32, "in_channels": 3, "base_channels": 32,
          "channel_multiplier": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": None,
          "dropout": 0.0, "attn_type": "vanilla"}
    torch.manual_seed(0)
    model = transformers.ChameleonVQVAE(transformers.ChameleonVQVAEConfig(**vq)).eval()
    # Its random init collapses every position onto one or two codes; the fixture's weights
    # (taming names, which Hugging Face keeps: nothing is missing or left over) spread them.
    result = model.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith("decoder.")}, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    state = {HF_PREFIX + k: v for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    tok = vqgan_from_taming(state, ddconfig_from_hf(config), config["embed_dim"],
                            config["num_embeddings"], prefix=HF_PREFIX, with_decoder=False)
    x = images()
    with torch.no_grad():
        expected = model.encode(x).image_tokens
        codes = tok.encode(x)
    assert codes.unique().numel() >= 10
    assert torch.equal(codes.flatten(), expected.flatten())


def test_ddconfig_from_hf_maps_every_field():
    dd = ddconfig_from_hf({"double_latent": False, "latent_channels": 256, "resolution": 512,
                           "in_channels": 3, "base_channels": 128,
                           "channel_multiplier": [1, 1, 2, 2, 4], "num_res_blocks": 2,
                           "attn_resolutions": None, "attn_type": None, "embed_dim": 256})
    assert dd == {"double_z": False, "z_channels": 256, "resolution": 512, "in_channels": 3,
                  "out_ch": 3, "ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2,
                  "attn_resolutions": [], "dropout": 0.0, "attn_type": "none"}
    with pytest.raises(TamingConversionError, match=r"missing \['base_channels'\]"):
        ddconfig_from_hf({k: v for k, v in dd.items() if k != "ch"} | {
            "double_latent": False, "latent_channels": 1, "channel_multiplier": [1]})


def test_quant_conv_channels_is_checked_and_off_by_default():
    assert VQTokenizer().quant_conv is None  # old artifacts: no such weights to load
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="quant_conv_channels"):
            VQTokenizer({"quant_conv_channels": bad})


def test_no_mid_attention_converts():
    """attn_type 'none' (taming/LDM's Identity, Hugging Face's non-'vanilla'): no attention
    weights, and diffusers' mid block without attention."""
    dd = {**DDCONFIG, "attn_type": "none"}
    state = {k: v for k, v in random_state().items() if ".attn_1." not in k}
    tok = vqgan_from_taming(state, dd, EMBED_DIM, N_EMBED)
    assert not tok.autoencoder_config["mid_block_add_attention"]
    assert tok.encode(images()).shape == (2, 8, 8)


# ---- refusals ------------------------------------------------------------------------------
@pytest.mark.parametrize("change, match", [
    ({"attn_resolutions": [16]}, r"attn_resolutions=\[16\].*resolution \[16\]"),
    ({"double_z": True}, "double_z=True"),
    ({"ch_mult": [2, 2, 2]}, r"ch_mult=\[2, 2, 2\]: the first multiplier must be 1"),
    ({"in_channels": 1}, "in_channels=1"),
    ({"out_ch": 4}, "out_ch=4"),
    ({"ch": 24}, r"ch=24 .*widths \[24, 48, 48\].*32 groups"),
    ({"attn_type": "linear"}, "attn_type='linear'"),
    ({"resamp_with_conv": False}, "resamp_with_conv=False"),
    ({"ch": 32.5}, r"ddconfig\.ch=32\.5 is not an integer"),
    ({"z_channels": None}, r"ddconfig\.z_channels=None"),
])
def test_unsupported_configs_are_refused_naming_the_field(state, change, match):
    with pytest.raises(TamingConversionError, match=match):
        vqgan_from_taming(state, {**DDCONFIG, **change}, EMBED_DIM, N_EMBED)


def test_missing_required_field_is_named(state):
    with pytest.raises(TamingConversionError, match=r"ddconfig is missing \['z_channels'\]"):
        vqgan_from_taming(state, {k: v for k, v in DDCONFIG.items() if k != "z_channels"},
                          EMBED_DIM, N_EMBED)


def test_missing_extra_and_misshapen_keys_are_named(state):
    assert issubclass(TamingConversionError, UserError)
    less = {k: v for k, v in state.items() if k != "encoder.mid.attn_1.q.weight"}
    with pytest.raises(TamingConversionError, match=r"1 missing: encoder\.mid\.attn_1\.q\.weight"):
        vqgan_from_taming(less, DDCONFIG, EMBED_DIM, N_EMBED)
    more = {**state, "encoder.down.0.attn.0.q.weight": torch.zeros(32, 32, 1, 1)}
    with pytest.raises(TamingConversionError,
                       match=r"1 unexpected: encoder\.down\.0\.attn\.0\.q\.weight"):
        vqgan_from_taming(more, DDCONFIG, EMBED_DIM, N_EMBED)
    wrong = {**state, "quant_conv.weight": torch.zeros(EMBED_DIM, 32, 1, 1)}
    with pytest.raises(TamingConversionError,
                       match=r"quant_conv\.weight \(8, 32, 1, 1\) \(expected \(8, 16, 1, 1\)\)"):
        vqgan_from_taming(wrong, DDCONFIG, EMBED_DIM, N_EMBED)
    with pytest.raises(TamingConversionError,
                       match=r"quantize\.embedding\.weight \(64, 8\) \(expected \(32, 8\)\)"):
        vqgan_from_taming(state, DDCONFIG, EMBED_DIM, 32)
    ints = {**state, "quant_conv.bias": torch.zeros(EMBED_DIM, dtype=torch.long)}
    with pytest.raises(TamingConversionError, match=r"quant_conv\.bias: expected a float"):
        vqgan_from_taming(ints, DDCONFIG, EMBED_DIM, N_EMBED)


def test_unreadable_files_are_refused_naming_the_file(state, tmp_path):
    cfg_file = tmp_path / "vqgan.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": {"params": {
        "embed_dim": EMBED_DIM, "n_embed": N_EMBED, "ddconfig": DDCONFIG}}}))

    pickled = tmp_path / "pickled.ckpt"  # Lightning-style hyper-parameters object
    torch.save({"state_dict": state, "hparams": argparse.Namespace(lr=1e-4)}, pickled)
    with pytest.raises(TamingConversionError,
                       match=r"pickled\.ckpt: the checkpoint pickles Python objects .*"
                             r"argparse\.Namespace.*weights_only=True"):
        read_taming_vqgan(pickled, cfg_file)

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(TamingConversionError, match="garbage.ckpt: not a"):
        read_taming_vqgan(garbage, cfg_file)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(TamingConversionError, match=r"bad\.safetensors: corrupt"):
        read_taming_vqgan(bad_st, cfg_file)
    with pytest.raises(TamingConversionError, match="nowhere.ckpt: no such"):
        read_taming_vqgan(tmp_path / "nowhere.ckpt", cfg_file)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(TamingConversionError, match="expected a taming checkpoint"):
        read_taming_vqgan(listed, cfg_file)

    ckpt = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": state}, ckpt)
    for text, match in [
        ("model: {params: {embed_dim: 8, n_embed: 64}}", r"model\.params\.ddconfig is missing"),
        ("model: {target: x}", r"no model\.params"),
        ("model: [unclosed", "not valid YAML"),
        (yaml.safe_dump({"model": {"params": {"embed_dim": 8, "n_embed": 64, "remap": "u.npy",
                                              "ddconfig": DDCONFIG}}}), r"remap='u\.npy'"),
    ]:
        cfg_file.write_text(text)
        with pytest.raises(TamingConversionError, match=match):
            read_taming_vqgan(ckpt, cfg_file)
    with pytest.raises(TamingConversionError, match="nowhere.yaml: no such"):
        read_taming_vqgan(ckpt, tmp_path / "nowhere.yaml")
