"""LightningDataModule: data config -> record sources -> Documents -> DataLoaders."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from fusion.config import DataConfig, resolve_path
from fusion.data.documents import (
    CaptionDocuments,
    EditDocuments,
    StoryDocuments,
    StreamCaptionDocument,
    StreamEditDocument,
    TextLimit,
    collate_documents,
)
from fusion.data.shapes import EDIT_KINDS
from fusion.data.shards import (
    CARRIED,
    CARRIED_UNFINISHED,
    ShardStream,
    StreamPosition,
    collate_positioned,
    expand_shards,
)
from fusion.data.sources import (
    CaptionFolder,
    EditFolder,
    ShapesEditSource,
    ShapesSource,
    ShapesStorySource,
)
from fusion.data.text import TextTokenizer
from fusion.distributed import rank_seed_parts
from fusion.errors import UserError

log = logging.getLogger(__name__)

SOURCES = ("shapes", "folder", "shards")
DOCUMENTS = ("caption", "edit", "story")


def _folder_split(cfg: DataConfig, folder_cls) -> tuple:
    """(train, val) of a user's folder: ``data.val_root``, or the last ``val_share`` of it."""
    if not cfg.root:
        raise UserError("data.source=folder needs data.root=/path/to/folder")
    kw = dict(size=cfg.image_size, resize=cfg.resize, max_bad_share=cfg.max_bad_share)
    full = folder_cls(resolve_path(cfg.root), **kw)
    if cfg.val_root:
        return full, folder_cls(resolve_path(cfg.val_root), **kw)
    if not 0.0 < cfg.val_share < 1.0:
        raise UserError(f"data.val_share must be in (0, 1), got {cfg.val_share}")
    n_val = max(1, round(len(full) * cfg.val_share))
    if n_val >= len(full):
        raise UserError(f"{cfg.root}: {len(full)} good record(s) is too few to hold out "
                         f"{n_val} for validation; add data or set data.val_root")
    return Subset(full, range(len(full) - n_val)), Subset(full, range(len(full) - n_val,
                                                                     len(full)))


def shard_split(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(train, val) shard paths: ``data.val_shards``, or the last shard of ``data.shards``."""
    if not cfg.shards:
        raise UserError("data.source=shards needs data.shards=<list, glob or brace pattern>")
    shards = expand_shards(cfg.shards)
    if cfg.val_shards:
        return shards, expand_shards(cfg.val_shards)
    if len(shards) < 2:
        raise UserError(f"{shards[0]} is the only shard: nothing is left for training once one "
                        "is held out; write more shards or set data.val_shards")
    return shards[:-1], shards[-1:]


def build_caption_sources(cfg: DataConfig) -> tuple:
    """(train, val) (image, caption) record sources for a data config."""
    if cfg.source == "shapes":
        tags = tuple(cfg.caption_tags) if cfg.caption_tags else None
        train = ShapesSource(cfg.num_train, seed=cfg.seed, size=cfg.image_size,
                             caption_tags=tags)
        val = ShapesSource(cfg.num_val, seed=cfg.seed, size=cfg.image_size,
                           offset=cfg.num_train, caption_tags=tags)
        return train, val
    if cfg.source == "folder":
        return _folder_split(cfg, CaptionFolder)
    if cfg.source == "shards":
        raise UserError("data.source=shards streams its records: it has no indexed source "
                        "(use DocumentDataModule, or scripts/check_data.py to inspect shards)")
    raise UserError(f"unknown data.source {cfg.source!r}; expected one of {SOURCES}")


def build_edit_sources(cfg: DataConfig) -> tuple:
    """(train, val) edit-triplet record sources: ShapesWorld edits of scenes
    0..num_train-1 (held out: the next num_val), or a folder's ``edits.jsonl``."""
    if cfg.source == "shapes":
        kinds = tuple(cfg.edit_kinds) if cfg.edit_kinds else None
        bad = [k for k in kinds or () if k not in EDIT_KINDS]
        if bad:
            raise UserError(f"unknown data.edit_kinds {bad}; expected some of {EDIT_KINDS}")
        kw = dict(seed=cfg.seed, size=cfg.image_size, kinds=kinds)
        return (ShapesEditSource(cfg.num_train, **kw),
                ShapesEditSource(cfg.num_val, offset=cfg.num_train, **kw))
    if cfg.source == "folder":
        return _folder_split(cfg, EditFolder)
    raise UserError(f"unknown data.source {cfg.source!r}; expected one of {SOURCES}")


def build_story_sources(cfg: DataConfig) -> tuple:
    """(train, val) interleaved story sources: ShapesWorld stories of scenes 0..num_train-1
    (held out: the next num_val). Stories come from ShapesWorld only."""
    if cfg.source != "shapes":
        raise UserError(f"data.documents=story is built from ShapesWorld; data.source="
                        f"{cfg.source} has no stories (pass data.source=shapes)")
    kw = dict(seed=cfg.seed, size=cfg.image_size, images_per_story=tuple(cfg.story_images))
    return (ShapesStorySource(cfg.num_train, **kw),
            ShapesStorySource(cfg.num_val, offset=cfg.num_train, **kw))


# data.documents -> (record sources, Documents class, images per document at most)
_KINDS = {"caption": (build_caption_sources, CaptionDocuments, lambda cfg: 1),
          "edit": (build_edit_sources, EditDocuments, lambda cfg: 2),
          "story": (build_story_sources, StoryDocuments, lambda cfg: max(cfg.story_images))}


class ResumableSampler(Sampler[int]):
    """A seeded random order per epoch, split over data-parallel ranks, that can start part-way
    through an epoch.

    Epoch ``e`` visits the indices in ``torch.randperm(n)`` drawn from a generator seeded by
    (seed, e), so the order depends on nothing but those two numbers. With ``num_replicas``
    ranks, the order is cut to a multiple of ``num_replicas`` (the tail of at most
    ``num_replicas - 1`` indices waits for the next epoch's order) and rank ``r`` takes every
    ``num_replicas``-th index from ``r``: the ranks' samples are disjoint, and the ``k``-th
    batch of every rank together holds exactly the ``k``-th global batch of a single process
    whose batch is the ranks' batches together. Lightning calls :meth:`set_epoch` at every
    epoch start, and a resumed run calls :meth:`resume_at` with the position its checkpoint
    recorded (fusion.training.callbacks.DataPosition), so every rank draws the batches the
    interrupted run would have drawn next."""

    def __init__(self, num_samples: int, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        if num_samples < num_replicas:
            raise UserError(f"{num_samples} training record(s) cannot be split over "
                            f"{num_replicas} ranks: every rank needs at least one")
        self.num_samples, self.seed = num_samples, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, indices) to leave out, once

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, samples_done: int) -> None:
        """The next iteration of epoch ``epoch`` leaves out this rank's first ``samples_done``
        indices (an iteration of any other epoch drops the request)."""
        self.epoch, self._skip = epoch, (epoch, samples_done)

    def order(self, epoch: int) -> list[int]:
        """This rank's indices of epoch ``epoch``, in order."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        full = torch.randperm(self.num_samples, generator=g).tolist()
        return full[: len(self) * self.num_replicas][self.rank::self.num_replicas]

    def next_start(self) -> int:
        """How many of this rank's indices of the current epoch the next iteration leaves
        out (:meth:`resume_at`)."""
        return self._skip[1] if self._skip is not None and self._skip[0] == self.epoch else 0

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, None
        start = skip[1] if skip is not None and skip[0] == self.epoch else 0
        return iter(self.order(self.epoch)[start:])

    def __len__(self) -> int:
        return self.num_samples // self.num_replicas


class RankSlice(Sampler[int]):
    """Rank ``rank``'s share of ``num_samples`` indices in their order (every
    ``num_replicas``-th from ``rank``): data-parallel validation, each record seen once over
    all ranks (no padding repeats, unlike ``DistributedSampler``)."""

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0):
        self.indices = range(rank, num_samples, num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class NumberedBatches(Sampler[list]):
    """Batches of ``sampler``'s indices, each index paired with its batch's key: ``(epoch,
    batch number within the epoch)`` for a :class:`ResumableSampler`, ``(batch number,)``
    otherwise. A loader worker seeds the batch's random draws from the key
    (:class:`PrepareBatches`), so they depend on where the batch is in the run, not on which
    worker builds it, and a resumed run (which starts part-way through an epoch) draws the
    same. Lightning finds ``sampler`` here to call its ``set_epoch``."""

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool):
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last

    def __iter__(self) -> Iterator[list[tuple]]:
        numbered = isinstance(self.sampler, ResumableSampler)
        number = self.sampler.next_start() // self.batch_size if numbered else 0
        batch: list[tuple] = []
        for index in self.sampler:
            key = (self.sampler.epoch, number) if numbered else (number,)
            batch.append((*key, index))
            if len(batch) == self.batch_size:
                yield batch
                batch, number = [], number + 1
        if batch and not self.drop_last:
            yield batch

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


class KeyedRecords(Dataset):
    """``dataset`` read by :class:`NumberedBatches` keys: ``(*key, index) -> (record,
    key)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, key: tuple):
        return self.dataset[key[-1]], key[:-1]

    def __len__(self) -> int:
        return len(self.dataset)


class PrepareBatches:
    """A loader's ``collate_fn`` that turns a batch's documents into the family's
    PreparedBatch (``prepare(documents, rng)``, fusion.models.packing.BatchPreparer) in the
    loader worker. The batch's draws (caption and condition dropout, CM3 spans, clean-image
    choices) come from a ``random.Random`` seeded by ``prefix``, the batch's key (its
    :class:`NumberedBatches` key, or for a stream the reader position after it) and the rank
    (no part on rank 0, so one process draws the same whatever launched it)."""

    def __init__(self, prepare: Callable, prefix: tuple, rank: int = 0):
        self.prepare, self.prefix = prepare, prefix
        self.rank_tag = rank_seed_parts(rank)

    def __call__(self, items: list[tuple]):
        key = items[-1][1]
        parts = key.as_list() if isinstance(key, StreamPosition) else list(key)
        rng = random.Random("/".join(map(str, (*self.prefix, *parts, *self.rank_tag))))
        batch = self.prepare([doc for doc, _ in items], rng)
        if isinstance(key, StreamPosition):
            batch.stream_position = key
        return batch


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """``data.batch_size`` is the global batch (what one optimizer step sees, before gradient
    accumulation); each of ``world_size`` data-parallel ranks loads its equal share."""
    if batch_size % world_size:
        raise UserError(f"data.batch_size={batch_size} is the global batch and must split "
                        f"evenly over {world_size} ranks; pick a multiple of {world_size}")
    return batch_size // world_size


def trainer_ranks(datamodule: L.LightningDataModule) -> tuple[int, int]:
    """(world size, global rank) of the Trainer ``datamodule`` serves; (1, 0) alone."""
    trainer = getattr(datamodule, "trainer", None)
    return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)


def positioned_sampler(sampler: ResumableSampler | None, n_records: int, cfg: DataConfig,
                       world: int, rank: int,
                       resume: tuple[int, int] | None) -> ResumableSampler:
    """The training sampler of a datamodule (``sampler``, or a new one over ``n_records`` the
    first time), started after ``resume = (epoch, batches)`` when a checkpoint gave one
    (DataPosition). Refuses data too small for one batch per rank (drop_last would leave
    none)."""
    share = per_rank_batch(cfg.batch_size, world)
    sampler = sampler or ResumableSampler(n_records, cfg.seed, world, rank)
    if resume is not None:
        epoch, batches = resume
        sampler.resume_at(epoch, batches * share)
    if len(sampler) < share:
        raise UserError(f"{n_records} training record(s) give each of {world} rank(s) "
                        f"{len(sampler)}, fewer than its share of data.batch_size="
                        f"{cfg.batch_size} ({share}); lower the batch or add data")
    return sampler


class DocumentDataModule(L.LightningDataModule):
    """Caption/image, editing or story Documents (``data.documents``) for either family; batches
    are lists of Documents.

    ``text_budget(n_images)`` -> the most text tokens a document with that many images can
    hold (the family loss's ``text_budget``): when given, every record is checked against it
    as the data opens (fusion.data.documents.fitting_records).

    ``prepare(documents, rng) -> PreparedBatch`` (the family loss's ``preparer(model)``):
    when given, the loader workers pack each batch and make its random draws
    (:class:`PrepareBatches`), and batches are PreparedBatches; the training process is left
    with the encoder, the noise and the model. Without it batches are lists of Documents."""

    def __init__(self, cfg: DataConfig, tokenizer: TextTokenizer | None = None,
                 text_budget: Callable[[int], int] | None = None,
                 prepare: Callable | None = None):
        super().__init__()
        if cfg.num_workers > 0 and cfg.prefetch_factor < 1:
            raise UserError(f"data.prefetch_factor must be 1 or more, got {cfg.prefetch_factor}")
        self.prepare = prepare
        if cfg.documents not in DOCUMENTS:
            raise UserError(f"unknown data.documents {cfg.documents!r}; expected one of "
                             f"{DOCUMENTS}")
        self.cfg = cfg
        self.tokenizer = tokenizer or TextTokenizer.from_file(resolve_path(cfg.text_tokenizer))
        self.text_budget = text_budget
        self.train_set = self.val_set = None
        self.train_sampler: ResumableSampler | None = None
        self._resume: tuple[int, int] | None = None  # (epoch, batches) not yet applied

    def _limit(self, n_images: int) -> TextLimit | None:
        if self.text_budget is None:
            return None
        return TextLimit(self.text_budget(n_images), self.cfg.truncate_captions)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.cfg.source == "shards":
            self._setup_streams()
            return
        build_sources, documents, images = _KINDS[self.cfg.documents]
        train, val = build_sources(self.cfg)
        kw = dict(tokenizer=self.tokenizer, limit=self._limit(images(self.cfg)),
                  max_bad_share=self.cfg.max_bad_share)
        if documents is not EditDocuments:
            kw.update(image_first_ratio=self.cfg.image_first_ratio, seed=self.cfg.seed)
        self.train_set = documents(train, where="training data", **kw)
        self.val_set = documents(val, where="validation data", **kw)

    def _setup_streams(self) -> None:
        cfg = self.cfg
        if cfg.documents not in ("caption", "edit"):
            raise UserError(f"data.source=shards holds image-caption samples or edit "
                            f"triplets; data.documents={cfg.documents} needs data.source=shapes "
                            "or folder")
        train, val = shard_split(cfg)
        if cfg.documents == "edit":
            make = StreamEditDocument(self.tokenizer, self._limit(2))
        else:
            make = StreamCaptionDocument(self.tokenizer, self._limit(1), cfg.image_first_ratio,
                                         cfg.seed)
        kw = dict(make_document=make, size=cfg.image_size, resize=cfg.resize,
                  caption_key=cfg.caption_key, seed=cfg.seed, kind=cfg.documents,
                  shards_per_block=cfg.shards_per_block, max_bad_share=cfg.max_bad_share)
        self.train_set = ShardStream(train, train=True, where="training shards", **kw)
        self.val_set = ShardStream(val, train=False, where="validation shards", **kw)

    @property
    def streaming(self) -> bool:
        """Whether the data is a stream (shards) rather than indexed records."""
        return isinstance(self.train_set, ShardStream)

    def resume_at(self, epoch: int, batches: int, streams: list | None = None) -> dict | None:
        """Start the training data after ``batches`` batches of ``epoch`` (a checkpoint's
        fusion.training.callbacks.DataPosition), before any loader exists. Streams: every
        loader worker of this rank starts at its recorded position (``streams``: one dict a
        rank, worker -> position, plus the ``readers`` layout and the ``next`` worker);
        returns this rank's dict. Saved by another layout of readers (other ranks or
        ``data.num_workers``), the stream carries the unfinished blocks over
        (ShardStream.carry_over); the returned dict then holds ``carry_from``, the positions
        the carried blocks come from, which later checkpoints keep until every reader is
        past them."""
        if not self.streaming:
            self._resume = (epoch, batches)
            return None
        world, rank = self._ranks()
        layout = [world, max(1, self.cfg.num_workers)]
        first = streams[0] if streams and streams[0] else {}
        saved = first.get("readers")
        if saved is None and batches == 0:
            return None  # saved before a batch was trained: the stream starts at its start
        if saved is None:
            raise UserError("the checkpoint holds no shard positions for its streamed data")
        positions = [StreamPosition(*v) for s in streams for k, v in s.items() if k.isdigit()]
        carry_from = first.get("carry_from")
        past_carried = (len(positions) == saved[0] * saved[1]
                        and all(p.epoch != CARRIED for p in positions))
        if carry_from and past_carried:
            carry_from = None  # every reader has finished its carried blocks
        if saved == layout and len(streams) == world:
            if carry_from:  # blocks carried over by an earlier change of layout still run
                self.train_set.carry_over(carry_from)
            mine = dict(streams[rank])
            self.train_set.resume_from({int(k): StreamPosition(*v) for k, v in mine.items()
                                        if k.isdigit()}, next_reader=int(mine["next"]))
        else:
            if carry_from:  # a reader still in them: its place in them depends on the layout
                raise UserError(CARRIED_UNFINISHED)
            log.warning("the checkpoint's shard positions are of %d rank(s) x %d loader "
                        "worker(s); this run has %d x %d: the unfinished blocks are carried "
                        "over, so no sample is repeated or skipped, in a new order",
                        saved[0], saved[1], *layout)
            carry_from = [{k: v for k, v in s.items() if k.isdigit() or k == "readers"}
                          for s in streams]
            self.train_set.carry_over(carry_from)
            mine = {"readers": layout, "next": 0}
        mine.pop("carry_from", None)
        if carry_from and rank == 0:  # one copy, in rank 0's part of the checkpoint
            mine["carry_from"] = carry_from
        return mine

    def _stream_loader(self, stream: ShardStream) -> DataLoader:
        world, rank = self._ranks()
        stream.place(world, rank, self.cfg.num_workers)
        collate = (PrepareBatches(self.prepare, self._prefix(stream is self.train_set), rank)
                   if self.prepare is not None else collate_positioned)
        return DataLoader(stream, batch_size=per_rank_batch(self.cfg.batch_size, world),
                          collate_fn=collate, **self._loader_options())

    def _prefix(self, train: bool) -> tuple:
        """Seed parts of a batch's draws before its key: the run's seed, or validation's."""
        return (self.cfg.seed,) if train else ("val",)

    def _loader_options(self) -> dict:
        """Workers, prefetch and pinning, the same for every loader."""
        workers = self.cfg.num_workers
        trainer = getattr(self, "trainer", None)
        on_cuda = trainer is not None and trainer.strategy.root_device.type == "cuda"
        out = dict(num_workers=workers, persistent_workers=workers > 0,
                   pin_memory=self.prepare is not None and self.cfg.pin_memory and on_cuda)
        if workers > 0:
            out["prefetch_factor"] = self.cfg.prefetch_factor
        return out

    def held_out(self, n: int) -> list:
        """The first ``n`` records of the validation source (fixed examples for grids)."""
        self.setup()
        if self.streaming:
            return self.val_set.first_records(n)
        source, kept = self.val_set.source, self.val_set.indices
        return [source[i] for i in kept[:n]]

    def _ranks(self) -> tuple[int, int]:
        return trainer_ranks(self)

    def _loader(self, dataset, sampler: Sampler, drop_last: bool) -> DataLoader:
        # Its own generator: creating an iterator draws worker seeds from it, not from the
        # global torch RNG that the model's dropout uses, so validation and resumes leave the
        # training stream alone.
        world, rank = self._ranks()
        batch = per_rank_batch(self.cfg.batch_size, world)
        generator = torch.Generator().manual_seed(self.cfg.seed)
        if self.prepare is None:
            return DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=drop_last,
                              collate_fn=collate_documents, generator=generator,
                              **self._loader_options())
        return DataLoader(KeyedRecords(dataset),
                          batch_sampler=NumberedBatches(sampler, batch, drop_last),
                          collate_fn=PrepareBatches(self.prepare,
                                                    self._prefix(dataset is self.train_set),
                                                    rank),
                          generator=generator, **self._loader_options())

    def train_dataloader(self) -> DataLoader:
        # The Trainer runs with use_distributed_sampler=False (fusion.training.factory): the
        # split over ranks is this sampler's, so that a resume can position it exactly.
        if self.streaming:
            return self._stream_loader(self.train_set)
        world, rank = self._ranks()
        self.train_sampler = positioned_sampler(self.train_sampler, len(self.train_set),
                                                self.cfg, world, rank, self._resume)
        self._resume = None
        return self._loader(self.train_set, self.train_sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        if self.streaming:
            return self._stream_loader(self.val_set)
        world, rank = self._ranks()
        if len(self.val_set) < world:
            raise UserError(f"{len(self.val_set)} validation record(s) cannot be split over "
                            f"{world} ranks: every rank needs at least one")
        return self._loader(self.val_set, RankSlice(len(self.val_set), world, rank),
                            drop_last=False)
