"""Patchifiers: shapes, exact rearrange inverse, identity of an invertible linear pair,
timestep conditioning, the U-Net's skip plumbing."""

import pytest
import torch

from fusion.models.patchify import (
    LinearPatchifier,
    UNetPatchifier,
    build_patchifier,
    latent_to_patches,
    patches_to_latent,
)

C, S = 4, 8  # 8x8x4 latents: ShapesWorld's f8 VAE at 64 px


def _unet(**kw) -> UNetPatchifier:
    kw = dict(patch_size=2, block_out_channels=(16, 32), norm_num_groups=8) | kw
    return build_patchifier("unet", C, S, 48, **kw)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_rearrange_is_an_exact_inverse(p):
    z = torch.randn(3, C, S, S)
    patches = latent_to_patches(z, p)
    assert patches.shape == (3, (S // p) ** 2, C * p * p)
    assert torch.equal(patches_to_latent(patches, p, (S // p, S // p)), z)
    # row-major token order: token 1 is the patch right of token 0
    assert torch.equal(patches[0, 1], z[0, :, 0:p, p:2 * p].permute(1, 2, 0).flatten())


def test_linear_pair_is_the_identity_when_set_invertible():
    # What "identity" can honestly mean for a learned map: with d_model = C·p·p, proj_out set
    # to the inverse of proj_in and the added embeddings at zero, unpatchify∘patchify = id.
    torch.manual_seed(0)
    p = 2
    d = C * p * p
    lin = LinearPatchifier(C, S, d_model=d, patch_size=p)
    with torch.no_grad():
        lin.pos.row.zero_()
        lin.pos.col.zero_()
        lin.time_embedding.linear_2.weight.zero_()
        lin.time_embedding.linear_2.bias.zero_()
        w = torch.linalg.qr(torch.randn(d, d))[0] * 2.0  # well conditioned
        lin.proj_in.weight.copy_(w)
        lin.proj_in.bias.normal_()
        lin.proj_out.weight.copy_(torch.linalg.pinv(w))
        lin.proj_out.bias.copy_(-torch.linalg.pinv(w) @ lin.proj_in.bias)
    z = torch.randn(2, C, S, S)
    tokens, skips = lin.patchify(z, torch.tensor([3, 700]))
    assert skips == ()
    torch.testing.assert_close(lin.unpatchify(tokens, 0, skips), z, atol=1e-5, rtol=1e-5)


def test_shapes_and_token_counts():
    z, t = torch.randn(2, C, S, S), torch.tensor([0, 999])
    for kind, kw, grid in (("linear", dict(patch_size=2), (4, 4)),
                           ("linear", dict(patch_size=1), (8, 8)),
                           ("unet", dict(patch_size=2, block_out_channels=(16, 32),
                                         norm_num_groups=8), (4, 4)),
                           ("unet", dict(patch_size=4, block_out_channels=(16, 16, 32),
                                         norm_num_groups=8), (2, 2))):
        pf = build_patchifier(kind, C, S, 48, **kw)
        n = grid[0] * grid[1]
        assert pf.grid == grid and pf.tokens_per_image() == n
        assert pf.tokens_per_image((S, S)) == n
        tokens, skips = pf.patchify(z, t)
        assert tokens.shape == (2, n, 48)
        out = pf.unpatchify(torch.randn(2, n, 48), t, skips)
        assert out.shape == z.shape
    with pytest.raises(ValueError, match="built for"):
        pf.tokens_per_image(16)


def test_timestep_conditions_both_kinds():
    torch.manual_seed(0)
    z = torch.randn(2, C, S, S)
    t0, t1 = torch.tensor([10, 10]), torch.tensor([500, 500])
    lin = build_patchifier("linear", C, S, 32, patch_size=2)
    assert not torch.allclose(lin.patchify(z, t0)[0], lin.patchify(z, t1)[0])
    unet = _unet()
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)  # zero-initialised: outputs 0 at first
    (tok0, sk0), (tok1, _) = unet.patchify(z, t0), unet.patchify(z, t1)
    assert not torch.allclose(tok0, tok1)
    h = torch.randn(2, unet.tokens_per_image(), 48)
    # the up path sees t too: same hidden states and skips, different t, different output
    assert not torch.allclose(unet.unpatchify(h, t0, sk0), unet.unpatchify(h, t1, sk0))


def test_outputs_start_at_zero_and_gradients_flow():
    z = torch.randn(2, C, S, S, requires_grad=True)
    for pf in (build_patchifier("linear", C, S, 32), _unet()):
        tokens, skips = pf.patchify(z, torch.tensor([1.0, 2.5]))  # float timesteps are fine
        out = pf.unpatchify(tokens * 2, torch.tensor([1.0, 2.5]), skips)
        assert torch.count_nonzero(out) == 0  # DiT-style zero-initialised output layer
        out.sum().backward()  # the output layer's weight still receives gradient
        last = pf.proj_out if hasattr(pf, "proj_out") else pf.conv_out
        assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0


def test_unet_skips_must_come_from_patchify():
    unet = _unet()
    tokens, skips = unet.patchify(torch.randn(1, C, S, S), 0)
    with pytest.raises(ValueError, match="skip tensors"):
        unet.unpatchify(tokens, 0, skips[:-1])
    with pytest.raises(ValueError, match="skip tensors"):
        unet.unpatchify(tokens, 0, ())


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="unknown patchifier kind 'conv'"):
        build_patchifier("conv", C, S, 32)
    with pytest.raises(ValueError, match="not divisible by patch_size=3"):
        build_patchifier("linear", C, S, 32, patch_size=3)
    with pytest.raises(ValueError, match="power of two"):
        build_patchifier("unet", C, 12, 32, patch_size=3)
    with pytest.raises(ValueError, match="needs 2 U-Net levels"):
        build_patchifier("unet", C, S, 32, patch_size=2, block_out_channels=(32,))
    lin = build_patchifier("linear", C, S, 32)
    with pytest.raises(ValueError, match=r"expected latents \(B, 4, 8, 8\)"):
        lin.patchify(torch.randn(1, C, 16, 16), 0)
    with pytest.raises(ValueError, match="timesteps of shape"):
        lin.patchify(torch.randn(2, C, S, S), torch.zeros(3))
    with pytest.raises(ValueError, match="hidden states"):
        lin.unpatchify(torch.randn(2, 5, 32), 0)


def test_grid_position_table_is_row_plus_column_and_minus_one_is_zero():
    from fusion.models.positions import GridPositionEmbedding

    pos = GridPositionEmbedding((2, 3), 5)
    table = pos.table()
    assert table.shape == (6, 5)
    torch.testing.assert_close(table[4], pos.row[1] + pos.col[1])  # cell 4 = row 1, column 1
    out = pos(torch.tensor([[0, -1, 5]]))
    assert out.shape == (1, 3, 5)
    assert torch.equal(out[0, 1], torch.zeros(5))
    assert torch.equal(out[0, 2], table[5])
    with pytest.raises(ValueError, match="cell 6 is outside the 2x3 grid"):
        pos(torch.tensor([6]))


def test_linear_patchifier_loads_weights_saved_with_the_old_position_names():
    torch.manual_seed(0)
    lin = LinearPatchifier(C, S, d_model=32, patch_size=2)
    old = {("pos_" + k[len("pos."):] if k.startswith("pos.") else k): v
           for k, v in lin.state_dict().items()}
    assert "pos_row" in old and "pos.row" not in old
    fresh = LinearPatchifier(C, S, d_model=32, patch_size=2)
    fresh.load_state_dict(old)  # strict: every key found under its new name
    assert torch.equal(fresh.pos.row, lin.pos.row) and torch.equal(fresh.pos.col, lin.pos.col)
