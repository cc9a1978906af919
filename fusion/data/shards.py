"""Streamed shards: tar files in the layout img2dataset and webdataset write.

A shard is a tar file. A sample is the set of its members that share a key: an image
(``<key>.jpg``, ``.png``, ``.webp`` ...) and a caption, either ``<key>.txt`` or a field of
``<key>.json`` (``data.caption_key``: ``txt``, or ``json.<field>``, e.g. ``json.caption``).
An edit triplet has ``<key>.source.<ext>`` and ``<key>.target.<ext>`` instead of the image,
and its instruction where the caption would be.
Shards are named by a list, a glob or a brace pattern (``/data/cc/{00000..00099}.tar``).

Reading uses webdataset's tar iterators (members grouped by key, its brace expansion). The
order, the split and the resume position are fusion's own (:class:`ShardStream`), because
webdataset's pipelines neither split evenly nor say where a stream stood when it was stopped:

* **Split.** Each epoch has a seeded shard order. With R ranks and W loader workers there are
  U = R x W readers, and reader u (rank r, worker w: u = r x W + w) takes every U-th shard of
  that order, starting at u. So in one epoch every sample is read exactly once over all ranks
  and workers. There must be at least U shards.
* **Shuffle.** A reader goes through its shards in blocks of ``data.shards_per_block``. It reads
  a block's samples undecoded, shuffles them with a generator seeded by
  (seed, epoch, reader, block), then decodes and yields them. The shuffle buffer is therefore
  one block.
* **Endless.** A training reader goes on to its share of the next epoch when it reaches the end
  of its share, so no rank runs dry before another (ranks hold different numbers of samples).
  Runs end by ``trainer.max_steps`` or the time budget.
* **Resume.** Every yielded sample carries its position (reader's worker, epoch, block, index
  in the shuffled block), and each batch carries the position after its last sample. The
  checkpoint stores each worker's position and which worker gave the last batch
  (fusion.training.callbacks.DataPosition). A resumed reader skips the blocks before its
  position without reading them, re-reads that one block, and skips the samples it had
  already given; the workers' turns continue where they stopped. The resumed run sees the
  batches the uninterrupted one would have seen, in the same order (no sample repeated or
  skipped), and a resume costs at most one block of reading per worker. Saved by another
  layout of readers, the unfinished blocks are carried over to the new readers
  (:meth:`ShardStream.carry_over`): nothing repeated or skipped, in another order.
* **Bad input** is skipped and counted, with one warning line for each kind of problem the
  first time it appears in a reader: an undecodable image, a missing image or caption, a
  truncated shard (the samples before the break are kept), an unreadable shard. When more
  than ``data.max_bad_share`` of the samples read are bad, with at least 100 read, the stream
  raises a :class:`BadDataError` that names examples.
"""

from __future__ import annotations

import copy
import glob
import io
import json
import logging
import random
import tarfile
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import IterableDataset, get_worker_info

from fusion.data.images import fit, to_rgb
from fusion.data.sources import BadDataError, CaptionRecord, EditRecord
from fusion.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# pre-encoded samples (scripts/encode_dataset.py): VAE latents or VQ-GAN codes as .npy
ENCODED_EXTENSIONS = ("latent.npy", "codes.npy")
MIN_SAMPLES_FOR_SHARE = 100  # the bad share is judged from this many samples read on


ENCODING_FILE = "encoding.json"  # next to pre-encoded shards (fusion.training.pre_encode)


def encoding_of(paths: Sequence[str]) -> dict | None:
    """What ``encoding.json`` next to the shards says (the image tokenizer that encoded them,
    its fingerprint, the member and shape), or None for shards of images. Shards from folders
    that disagree (encoded and not, or by two tokenizers) are refused."""
    found = {}
    for folder in sorted({str(Path(p).parent) for p in paths}):
        file = Path(folder) / ENCODING_FILE
        found[folder] = json.loads(file.read_text()) if file.is_file() else None
    kinds = {json.dumps(v, sort_keys=True) for v in found.values()}
    if len(kinds) > 1:
        raise UserError("data.shards mixes folders of different encodings (images, or another "
                        f"image tokenizer): {', '.join(found)}")
    return next(iter(found.values()))


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard paths from a list of entries, or one entry: a path, a glob (``*``, ``?``, ``[``)
    or a brace pattern (``{00000..00099}``, webdataset's expansion). Missing files are named."""
    from webdataset.shardlists import expand_urls

    entries = [spec] if isinstance(spec, str) else list(spec)
    paths: list[str] = []
    for entry in entries:
        if any(c in entry for c in "*?["):
            found = sorted(glob.glob(entry))
            if not found:
                raise UserError(f"data.shards: no file matches {entry!r}")
            paths += found
        else:
            paths += expand_urls(entry)
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise UserError(f"data.shards: {len(missing)} of {len(paths)} shard(s) not found "
                        f"(first: {', '.join(missing[:3])})")
    if not paths:
        raise UserError("data.shards names no shard; give a list, a glob or a brace pattern")
    return paths


@dataclass(frozen=True)
class StreamPosition:
    """Where a reader is: the next sample is ``index`` of ``block`` of ``epoch``."""

    worker: int
    epoch: int
    block: int
    index: int

    def as_list(self) -> list[int]:
        return [self.worker, self.epoch, self.block, self.index]


CARRIED = -1  # StreamPosition.epoch while a reader goes through blocks carried over (below)
CARRIED_UNFINISHED = ("the checkpoint was saved while its readers were still finishing blocks "
                      "carried over from an earlier change of trainer.devices or "
                      "data.num_workers; resume it with the layout it was saved with until "
                      "every reader has moved on (a later checkpoint), then change it")


@dataclass(frozen=True)
class CarriedBlock:
    """A block left unfinished by a run with another layout of readers: block ``block`` of
    reader ``reader`` of ``readers`` in ``epoch``, from its sample ``skip`` on (the ones
    before were trained on). Its shards and its shuffle are the old reader's, so it yields
    exactly the samples that reader had not given yet."""

    epoch: int
    reader: int
    readers: int
    block: int
    skip: int = 0


class PositionedBatch(list):
    """A batch of Documents (a list, as every family takes) that also says where its reader
    is after it (``stream_position``)."""

    stream_position: StreamPosition | None = None


def collate_positioned(items: list[tuple]) -> PositionedBatch:
    batch = PositionedBatch(doc for doc, _ in items)
    batch.stream_position = items[-1][1]
    return batch


def parse_caption_key(caption_key: str) -> tuple[str, str | None]:
    """``txt`` -> (``txt``, None); ``json.caption`` -> (``json``, ``caption``)."""
    ext, _, field = caption_key.partition(".")
    if not ext or (ext == "json") != bool(field):
        raise UserError(f"data.caption_key={caption_key!r}: give a member extension (txt) or "
                        "a field of the json member (json.caption)")
    return ext, field or None


def _ends_whole(fh) -> bool:
    """Whether a tar file ends as a complete one does: in whole 512-byte blocks, the last two
    of them zero (the end-of-archive marker). A file cut at a member boundary reads as a
    shorter archive without any error; this tells it apart."""
    size = fh.seek(0, 2)
    if size < 1024 or size % 512:
        return False
    fh.seek(size - 1024)
    whole = not any(fh.read(1024))
    fh.seek(0)
    return whole


def read_samples(path: str, extensions: Sequence[str] | None = None) -> Iterator[dict]:
    """The samples of one shard, undecoded: ``{"__key__": ..., <extension>: bytes}`` in the
    order they are stored (webdataset's grouping of tar members by key). Raises
    ``tarfile.TarError`` or ``OSError`` where the shard is unreadable, and after the samples
    before the break, ``EOFError`` where it is cut short. ``extensions``: keep only these
    members (e.g. the captions, to read texts without the images' bytes)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with open(path, "rb") as fh:
        whole = _ends_whole(fh)
        select = (None if extensions is None else
                  lambda name: name.rsplit("/", 1)[-1].partition(".")[2] in extensions)
        members = tar_file_iterator(fh, select_files=select)
        yield from group_by_keys({**m, "__url__": path} for m in members)
    if not whole:
        raise EOFError("the file ends before the archive does")


def _sample_key(sample: dict) -> str:
    return f"{sample.get('__url__', '')}:{sample.get('__key__', '?')}"


def _read_text(sample: dict, caption_key: tuple[str, str | None]
               ) -> tuple[str | None, str | None]:
    """(the text of the sample's caption member, None) or (None, the kind of problem)."""
    ext, field = caption_key
    raw = sample.get(ext)
    if raw is None:
        return None, "missing caption"
    try:
        text = json.loads(raw).get(field) if field else raw.decode("utf-8")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None, "unreadable caption"
    if not isinstance(text, str) or not text.strip():
        return None, "missing caption"
    return text.strip(), None


def _decode_image(raw: bytes, size: int, resize: str) -> np.ndarray | None:
    """An image file's bytes -> (size, size, 3) uint8 by the ``resize`` policy; None when the
    bytes are not an image PIL can decode."""
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            return np.asarray(fit(to_rgb(img), size, resize))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def _image_member(sample: dict, prefix: str = "") -> str | None:
    return next((prefix + e for e in IMAGE_EXTENSIONS if prefix + e in sample), None)


def decode_caption_sample(sample: dict, caption_key: tuple[str, str | None], size: int,
                          resize: str) -> tuple[CaptionRecord | None, str | None]:
    """(the record, None) or (None, the kind of problem) for one undecoded sample."""
    key = _sample_key(sample)
    encoded_ext = next((e for e in ENCODED_EXTENSIONS if e in sample), None)
    image_ext = _image_member(sample)
    if image_ext is None and encoded_ext is None:
        return None, "missing image"
    caption, problem = _read_text(sample, caption_key)
    if problem is not None:
        return None, problem
    ext, field = caption_key
    description = None
    if "json" in sample and ext != "json":
        try:
            description = json.loads(sample["json"]).get("description")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            description = None
    elif field:
        description = json.loads(sample[ext]).get("description")
    if encoded_ext is not None:  # a pre-encoded dataset (scripts/encode_dataset.py)
        try:
            encoded = np.load(io.BytesIO(sample[encoded_ext]), allow_pickle=False)
        except (ValueError, OSError, EOFError):
            return None, "unreadable encoded image"
        return CaptionRecord(None, caption, key=key, description=description,
                             encoded=encoded), None
    array = _decode_image(sample[image_ext], size, resize)
    if array is None:
        return None, "undecodable image"
    return CaptionRecord(array, caption, key=key, description=description), None


def decode_edit_sample(sample: dict, caption_key: tuple[str, str | None], size: int,
                       resize: str) -> tuple[EditRecord | None, str | None]:
    """An edit triplet (``<key>.source.<ext>``, ``<key>.target.<ext>``, the instruction as the
    caption member, what scripts/make_shards.py --edits writes): (the record, None) or (None,
    the kind of problem)."""
    members = [_image_member(sample, f"{side}.") for side in ("source", "target")]
    if None in members:
        return None, "missing source or target image"
    instruction, problem = _read_text(sample, caption_key)
    if problem is not None:
        return None, problem.replace("caption", "instruction")
    source, target = (_decode_image(sample[m], size, resize) for m in members)
    if source is None or target is None:
        return None, "undecodable image"
    return EditRecord(source, instruction, target, key=_sample_key(sample)), None


# What a shard's samples hold (data.documents): its decoder
SAMPLE_DECODERS: dict[str, Callable] = {"caption": decode_caption_sample,
                                        "edit": decode_edit_sample}


def sample_decoder(kind: str) -> Callable:
    if kind not in SAMPLE_DECODERS:
        raise UserError(f"shards hold {tuple(SAMPLE_DECODERS)} samples; not {kind!r}")
    return SAMPLE_DECODERS[kind]


class _BadCounter:
    """Bad samples of one reader, by kind: a warning the first time a kind appears, and an
    error when too large a share of what was read is bad."""

    def __init__(self, where: str, max_bad_share: float):
        self.where, self.max_bad_share = where, max_bad_share
        self.by_kind: dict[str, list[str]] = defaultdict(list)
        self.read = 0

    def add(self, kind: str, key: str) -> None:
        if not self.by_kind[kind]:
            log.warning("%s: skipping samples with %s (first: %s); each is counted", self.where,
                        kind, key)
        self.by_kind[kind].append(key)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.by_kind.values())

    def check(self, final: bool = False) -> None:
        """Raise when too many are bad: from MIN_SAMPLES_FOR_SHARE read on, or at the end of a
        finite stream (``final``) whatever was read."""
        enough = self.read >= MIN_SAMPLES_FOR_SHARE or (final and self.read)
        if enough and self.count / self.read > self.max_bad_share:
            first = [f"{k} ({kind})" for kind, keys in self.by_kind.items() for k in keys][:5]
            raise BadDataError(f"{self.where}: {self.count} of {self.read} samples read are bad "
                               f"({self.count / self.read:.0%} > max_bad_share="
                               f"{self.max_bad_share:.0%}); first bad: " + "; ".join(first))


class ShardStream(IterableDataset):
    """Documents streamed from shards: split over ranks and loader workers, shuffled in blocks,
    endless for training, resumable (see the module docstring). Yields
    ``(document, StreamPosition after it)``; batch with :func:`collate_positioned`.

    ``make_document(record) -> Document | None`` turns a decoded record into a Document (None:
    its text does not fit the row; counted as bad). ``kind``: what the samples hold,
    ``caption`` (an image and its caption) or ``edit`` (a triplet: source and target images
    and the instruction in the caption member)."""

    def __init__(self, shards: Sequence[str], make_document: Callable, size: int,
                 resize: str = "center_crop", caption_key: str = "txt", seed: int = 0,
                 shards_per_block: int = 1, max_bad_share: float = 0.1,
                 train: bool = True, where: str = "shards", kind: str = "caption"):
        if shards_per_block < 1:
            raise UserError(f"data.shards_per_block must be 1 or more, got {shards_per_block}")
        self.decode = sample_decoder(kind)
        fit(Image.new("RGB", (2, 2)), 2, resize)  # validates the policy name early
        self.shards, self.make_document = list(shards), make_document
        self.size, self.resize, self.seed = size, resize, seed
        self.caption_key = parse_caption_key(caption_key)
        self.shards_per_block, self.max_bad_share = shards_per_block, max_bad_share
        self.train, self.where = train, where
        self.world, self.rank = 1, 0
        self._resume: dict[int, StreamPosition] = {}
        self._rotation = 0  # worker w plays reader role (w + rotation) % workers
        self._carried: list[CarriedBlock] = []  # all readers', dealt in turn (carry_over)
        self._after_carried = 0  # the epoch every reader starts once its carried blocks end
        self._order: tuple[int, list[str]] | None = None  # (epoch, its shard order)

    def place(self, world: int, rank: int, num_workers: int) -> None:
        """This process's rank among ``world``. Training: every reader (rank x worker) needs
        a shard, or it would have nothing to give, endlessly. Validation: every rank needs one
        (a rank without validation batches would not join the others' metric reduction); a
        worker without a shard just ends at once."""
        workers = max(1, num_workers)
        readers = world * workers if self.train else world
        if len(self.shards) < readers:
            who = (f"{world} rank(s) x {workers} loader worker(s) = {readers} readers"
                   if self.train else f"{world} rank(s)")
            raise UserError(f"{self.where}: {len(self.shards)} shard(s) cannot feed {who}, "
                            "each of which needs a shard; write more, smaller shards "
                            "(scripts/make_shards.py --shard-size) or lower data.num_workers")
        self.world, self.rank = world, rank

    def resume_from(self, positions: dict[int, StreamPosition], next_reader: int = 0) -> None:
        """Each worker's next position (what the checkpoint recorded for this rank), and which
        worker's batch came next. A DataLoader takes batches from its workers in turn,
        starting with worker 0; the workers take over the readers' roles shifted so that the
        first batch comes from ``next_reader``, and the batches follow in the interrupted
        run's order."""
        self._resume, self._rotation = dict(positions), next_reader

    def carry_over(self, saved: list[dict]) -> None:
        """Resume from positions saved by a run with another layout of readers (other ranks
        or loader workers): ``saved`` holds one dict a rank, worker -> position, plus
        ``readers``, as DataPosition records them. What every old reader had not given yet
        in the epochs it had started (the rest of its block, from the sample it stood at, and
        its later blocks) is carried over: each block keeps its old reader's shards and
        shuffle, and the blocks are dealt in turn to this run's readers. Once a reader's
        carried blocks end, it starts the epoch after the last one any old reader had begun,
        split the new way. So no sample is repeated or skipped, in the epochs begun and
        after; only the order within those epochs differs from the interrupted run's."""
        ranks, workers = saved[0]["readers"]
        readers = ranks * workers
        if len(saved) != ranks:
            raise ValueError(f"positions of {len(saved)} rank(s) saved for {ranks}")
        where = {u: StreamPosition(u % workers, 0, 0, 0) for u in range(readers)}
        for rank, mine in enumerate(saved):
            for key, value in mine.items():
                if key.isdigit():
                    where[rank * workers + int(key)] = StreamPosition(*value)
        if any(p.epoch == CARRIED for p in where.values()):
            raise UserError(CARRIED_UNFINISHED)
        first, last = min(p.epoch for p in where.values()), max(p.epoch for p in where.values())
        carried = []
        for epoch in range(first, last + 1):
            for u, p in where.items():
                if p.epoch > epoch:
                    continue
                start, skip = (p.block, p.index) if p.epoch == epoch else (0, 0)
                for b in range(start, len(self._blocks(epoch, u, readers))):
                    carried.append(CarriedBlock(epoch, u, readers, b, skip if b == start else 0))
        self._carried, self._after_carried = carried, last + 1
        self._resume, self._rotation = {}, 0

    def shard_order(self, epoch: int) -> list[str]:
        # kept for the epoch in hand: every block asks for it
        if self._order is None or self._order[0] != epoch:
            order = list(self.shards)
            if self.train:
                random.Random(f"shards/{self.seed}/{epoch}").shuffle(order)
            self._order = (epoch, order)
        return list(self._order[1])

    def reader_shards(self, epoch: int, reader: int, readers: int) -> list[str]:
        return self.shard_order(epoch)[reader::readers]

    def _block(self, shards: Sequence[str], counter: _BadCounter) -> list[dict]:
        samples = []
        for path in shards:
            try:
                for sample in read_samples(path):
                    samples.append(sample)
            except (tarfile.TarError, OSError, EOFError) as err:
                kind = "unreadable shard" if not samples else "truncated shard"
                counter.add(kind, f"{path} ({type(err).__name__}: {err})")
        return samples

    def _blocks(self, epoch: int, reader: int, readers: int) -> list[list[str]]:
        """Reader ``reader``'s shards of ``epoch`` in its blocks of ``shards_per_block``."""
        shards = self.reader_shards(epoch, reader, readers)
        return [shards[i:i + self.shards_per_block]
                for i in range(0, len(shards), self.shards_per_block)]

    def _block_samples(self, epoch: int, reader: int, readers: int, block: int,
                       counter: _BadCounter) -> list[dict]:
        """A block's samples, undecoded, in the order its reader gives them: shuffled by
        (seed, epoch, reader, block) when training."""
        samples = self._block(self._blocks(epoch, reader, readers)[block], counter)
        if self.train:
            random.Random(f"block/{self.seed}/{epoch}/{reader}/{block}").shuffle(samples)
        return samples

    def samples(self, worker: int, num_workers: int,
                start: StreamPosition | None = None) -> Iterator[tuple]:
        """(undecoded sample, the position after it, the reader's bad-sample counter) of one
        reader from ``start`` on (endless when training): first its share of the carried
        blocks (:meth:`carry_over`), then its share of every epoch."""
        readers, reader = self.world * num_workers, self.rank * num_workers + worker
        counter = _BadCounter(self.where, self.max_bad_share)
        carried = self._carried[reader::readers]
        if carried and (start is None or start.epoch == CARRIED):
            first, at = (start.block, start.index) if start else (0, 0)
            for k in range(first, len(carried)):
                c = carried[k]
                block = self._block_samples(c.epoch, c.reader, c.readers, c.block, counter)
                for i in range(max(c.skip, at if k == first else 0), len(block)):
                    yield block[i], StreamPosition(worker, CARRIED, k, i + 1), counter
            start = None
        epoch = start.epoch if start else (self._after_carried if self._carried else 0)
        first_block, first_index = (start.block, start.index) if start else (0, 0)
        while True:
            for b in range(first_block, len(self._blocks(epoch, reader, readers))):
                block = self._block_samples(epoch, reader, readers, b, counter)
                for i in range(first_index, len(block)):
                    yield block[i], StreamPosition(worker, epoch, b, i + 1), counter
                first_index = 0
            first_block = 0
            if not self.train:
                counter.check(final=True)
                return
            epoch += 1

    def first_records(self, n: int) -> list:
        """The first ``n`` good records of one reader going through every shard in order,
        decoded (fixed examples, e.g. the held-out edits of a training run's grids)."""
        out = []
        for sample, _, _ in self._one_reader().samples(0, 1):
            record, _ = self.decode(sample, self.caption_key, self.size, self.resize)
            if record is not None:
                out.append(record)
            if len(out) == n:
                break
        return out

    def _one_reader(self) -> ShardStream:
        alone = copy.copy(self)
        alone.world, alone.rank, alone.train, alone._order = 1, 0, False, None
        return alone

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (worker + self._rotation) % num_workers  # its role (resume_from)
        start = self._resume.get(worker)
        for sample, position, counter in self.samples(worker, num_workers, start):
            counter.read += 1
            record, problem = self.decode(sample, self.caption_key, self.size, self.resize)
            document = self.make_document(record) if record is not None else None
            if record is not None and document is None:
                problem = "text longer than a document holds"
            if problem is not None:
                counter.add(problem, f"{sample.get('__url__')}:{sample.get('__key__')}")
                counter.check()
                continue
            yield document, position


def shard_captions(paths: Sequence[str], caption_key: str = "txt") -> Iterator[str]:
    """Every caption of the shards, without reading a single image (for a text tokenizer).
    Unreadable or empty captions and unreadable or cut-short shards are skipped and counted,
    with one warning line per kind (what the shards held before a break is kept)."""
    ext, field = parse_caption_key(caption_key)
    bad = _BadCounter("shard captions", max_bad_share=1.0)
    for path in paths:
        try:
            for sample in read_samples(path, extensions=(ext,)):
                key = f"{path}:{sample.get('__key__')}"
                try:
                    text = json.loads(sample[ext]).get(field) if field else sample[
                        ext].decode("utf-8")
                except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                    bad.add("unreadable caption", key)
                    continue
                if isinstance(text, str) and text.strip():
                    yield text.strip()
                else:
                    bad.add("missing caption", key)
        except (tarfile.TarError, OSError, EOFError) as err:
            bad.add("unreadable or truncated shard", f"{path} ({type(err).__name__}: {err})")
    if bad.count:
        log.warning("shard captions: skipped %d in all (%s)", bad.count,
                    ", ".join(f"{len(v)} {k}" for k, v in bad.by_kind.items()))


def check_shard(path: str, caption_key: str = "txt", size: int = 64,
                resize: str = "center_crop",
                kind: str = "caption") -> tuple[list[str], dict[str, list[str]]]:
    """Read and decode one whole shard of ``kind`` samples (caption | edit): (the good
    samples' captions or instructions, {problem: keys})."""
    key, decode = parse_caption_key(caption_key), sample_decoder(kind)
    captions: list[str] = []
    problems: dict[str, list[str]] = defaultdict(list)
    try:
        for sample in read_samples(path):
            record, problem = decode(sample, key, size, resize)
            if record is None:
                problems[problem].append(str(sample.get("__key__")))
            else:
                captions.append(getattr(record, "caption", None) or record.instruction)
    except EOFError:
        problems["truncated shard"].append(path)
    except (tarfile.TarError, OSError) as err:
        problems["unreadable shard"].append(f"{path} ({type(err).__name__}: {err})")
    return captions, dict(problems)
