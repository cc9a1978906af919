"""Stage 1.5: run the frozen image tokenizer once over a dataset and keep what it gives.

Training reads each image's latents (VAE, float32 ``latent.npy``, exactly what the diffusion
loss consumes) or codes (VQ-GAN, ``codes.npy`` as int16, or int32 above 32,767 codes) from the
encoded shards and never runs the tokenizer's encoder (fusion.data.documents.encode_images).
The folder also gets ``encoding.json``, which holds the tokenizer's fingerprint (the one model
folders record). A training run whose ``image_tokenizer`` has another fingerprint is refused,
with both named (:func:`check_encoded_data`): latents of one VAE are noise to another.
Sampling and evaluation still decode with the tokenizer.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fusion.config import resolve_path
from fusion.data.images import to_tensor
from fusion.data.shards import ENCODING_FILE, ShardStream, encoding_of, expand_shards
from fusion.data.sources import CaptionFolder
from fusion.errors import UserError
from fusion.families import load_image_tokenizer
from fusion.families.folders import image_tokenizer_fingerprint


def _records(shards: str | None, folder: str | None, size: int, resize: str,
             caption_key: str, max_bad_share: float):
    """The (image, caption) records of shards (bad samples skipped and counted, as training
    skips them) or of a users' folder, in order."""
    if folder is not None:
        source = CaptionFolder(resolve_path(folder), size=size, resize=resize,
                               max_bad_share=max_bad_share)
        return len(source), (source[i] for i in range(len(source)))
    stream = ShardStream(expand_shards(shards), make_document=lambda rec: rec, size=size,
                         resize=resize, caption_key=caption_key, train=False,
                         max_bad_share=max_bad_share, where="shards to encode")
    if encoding_of(stream.shards) is not None:
        raise UserError(f"{stream.shards[0]} ... are encoded already; encode the images' shards")
    return None, (record for record, _ in stream)


def _array_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@torch.no_grad()
def encode_dataset(out_dir: str | Path, image_tokenizer: str, shards: str | None = None,
                   folder: str | None = None, size: int = 64, resize: str = "center_crop",
                   caption_key: str = "txt", shard_size: int = 1000, batch_size: int = 64,
                   device: str = "cpu", max_bad_share: float = 0.1,
                   show_progress: bool = True) -> dict:
    """Encode every image of ``shards`` or ``folder`` with ``image_tokenizer`` and write shards
    of ``shard_size`` samples to ``out_dir`` (caption, description, latents or codes) with
    ``encoding.json``. Returns what encoding.json holds."""
    import webdataset as wds

    if (shards is None) == (folder is None):
        raise UserError("give shards or a folder to encode, one of them")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):
        raise UserError(f"{out} already holds shards; write to an empty folder")
    tokenizer = load_image_tokenizer(image_tokenizer).to(device).eval()
    total, records = _records(shards, folder, size, resize, caption_key, max_bad_share)
    written, member, shape, dtype = 0, None, None, None

    def flush(batch, sink) -> None:
        nonlocal written, member, shape, dtype
        encoded = tokenizer.encode(torch.stack([to_tensor(r.image) for r in batch]).to(device))
        encoded = encoded.cpu()
        if encoded.is_floating_point():
            arrays, member = encoded.float().numpy(), "latent.npy"
        else:  # codes: the smallest integer type that holds the codebook
            big = int(encoded.max()) > np.iinfo(np.int16).max
            arrays, member = encoded.numpy().astype(np.int32 if big else np.int16), "codes.npy"
        shape, dtype = list(arrays.shape[1:]), str(arrays.dtype)
        for record, array in zip(batch, arrays, strict=True):
            sink.write({"__key__": f"{written:09d}", "txt": record.caption,
                        "json": json.dumps({"caption": record.caption,
                                            "description": record.description,
                                            "source": record.key}),
                        member: _array_bytes(array)})
            written += 1

    bar = tqdm(total=total, desc="encoding", unit="img", disable=not show_progress)
    with wds.ShardWriter(str(out / "%05d.tar"), maxcount=shard_size, verbose=0) as sink:
        batch = []
        for record in records:
            batch.append(record)
            if len(batch) == batch_size:
                flush(batch, sink)
                bar.update(len(batch))
                batch = []
        if batch:
            flush(batch, sink)
            bar.update(len(batch))
    bar.close()
    if not written:
        raise UserError(f"nothing to encode in {shards or folder}")
    info = {"image_tokenizer": str(image_tokenizer),
            "image_tokenizer_sha256": image_tokenizer_fingerprint(image_tokenizer),
            "member": member, "shape": shape, "dtype": dtype, "image_size": size,
            "resize": resize, "samples": written, "source": str(shards or folder)}
    (out / ENCODING_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def check_encoded_data(data_cfg, image_tokenizer: str) -> dict | None:
    """Refuse pre-encoded shards (``data.shards`` with an ``encoding.json``) made by another
    image tokenizer than the model's or at another image size, naming both; returns the
    encoding (None for images)."""
    if data_cfg.source != "shards":
        return None
    shards = expand_shards(data_cfg.shards)
    if data_cfg.val_shards:
        shards += expand_shards(data_cfg.val_shards)
    info = encoding_of(shards)
    if info is None:
        return None
    ours = image_tokenizer_fingerprint(image_tokenizer)
    if info.get("image_tokenizer_sha256") != ours:
        raise UserError(f"the shards were encoded by the image tokenizer "
                        f"{info.get('image_tokenizer')} (sha256 "
                        f"{str(info.get('image_tokenizer_sha256'))[:12]}...), but the model's "
                        f"is {image_tokenizer} (sha256 {str(ours)[:12]}...): encode them again "
                        "with scripts/encode_dataset.py --image-tokenizer "
                        f"{image_tokenizer}, or train with the tokenizer that made them")
    if info.get("image_size") != data_cfg.image_size:
        raise UserError(f"the shards were encoded at {info.get('image_size')} px; "
                        f"data.image_size={data_cfg.image_size}")
    return info
