"""Does compiled FlexAttention lower for one attention shape on this CUDA machine?

Inductor (torch 2.11, H200) refuses some query lengths (docs/performance.md, "GPU (partly
measured)"). Run one shape per process, since a failed compile can leave Inductor's state
behind:

    python scripts/probe_flex.py --batch 192 --seq 73 --cache 448 --dtype fp32
    python scripts/probe_flex.py --batch 192 --seq 25 --cache 256 --mha

Keys are a view of the first ``--seq`` slots of a ``--cache``-slot buffer, as in KV-cached
sampling (``--cache`` <= ``--seq``: contiguous keys). The mask is the project's own block mask
for a Chameleon-like row (2 text, an image, the rest text). Prints OK or FAIL with the error.
"""

import argparse

import torch

from fusion.models.attention import _compiled_flex_attention, layout_from_segments


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=192)
    p.add_argument("--seq", type=int, default=73)
    p.add_argument("--cache", type=int, default=0, help="slots of the key buffer (0: contiguous)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--mha", action="store_true", help="4 key/value heads instead of 2 (GQA)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("probe_flex needs CUDA: it tests Inductor's GPU flex kernel")
    if a.seq < 5:
        raise SystemExit(f"--seq must be at least 5, got {a.seq}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    image = min(64, a.seq - 4)
    row = [(0, "text", 2), (0, "image", image), (0, "text", a.seq - 2 - image)]
    layout = layout_from_segments([row] * a.batch, device="cuda")
    kv_heads = 4 if a.mha else 2
    q = torch.randn(a.batch, 4, a.seq, 64, device="cuda", dtype=dtype)
    k_buf = torch.randn(a.batch, kv_heads, max(a.cache, a.seq), 64, device="cuda", dtype=dtype)
    v_buf = torch.randn_like(k_buf)
    keys = f"view of {a.cache}" if a.cache > a.seq else "contiguous"
    name = f"B={a.batch} S={a.seq} keys={keys} {a.dtype} {'mha' if a.mha else 'gqa'}"
    try:
        _compiled_flex_attention()(q, k_buf[:, :, : a.seq], v_buf[:, :, : a.seq],
                                   block_mask=layout.block_mask, enable_gqa=not a.mha)
        torch.cuda.synchronize()
        print("OK  ", name)
    except Exception as err:  # noqa: BLE001 -- report any lowering or runtime failure
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        print("FAIL", name, type(err).__name__, lines[0][:160] if lines else "")


if __name__ == "__main__":
    main()
