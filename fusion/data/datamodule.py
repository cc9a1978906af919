"""LightningDataModule: data config -> record sources -> Documents -> DataLoaders."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Subset

from fusion.config import DataConfig, resolve_path
from fusion.data.documents import CaptionDocuments, EditDocuments, collate_documents
from fusion.data.shapes import EDIT_KINDS
from fusion.data.sources import CaptionFolder, EditFolder, ShapesEditSource, ShapesSource
from fusion.data.text import TextTokenizer

SOURCES = ("shapes", "folder")
DOCUMENTS = ("caption", "edit")


def _folder_split(cfg: DataConfig, folder_cls) -> tuple:
    """(train, val) of a user's folder: ``data.val_root``, or the last ``val_share`` of it."""
    if not cfg.root:
        raise ValueError("data.source=folder needs data.root=/path/to/folder")
    kw = dict(size=cfg.image_size, resize=cfg.resize, max_bad_share=cfg.max_bad_share)
    full = folder_cls(resolve_path(cfg.root), **kw)
    if cfg.val_root:
        return full, folder_cls(resolve_path(cfg.val_root), **kw)
    if not 0.0 < cfg.val_share < 1.0:
        raise ValueError(f"data.val_share must be in (0, 1), got {cfg.val_share}")
    n_val = max(1, round(len(full) * cfg.val_share))
    if n_val >= len(full):
        raise ValueError(f"{cfg.root}: {len(full)} good record(s) is too few to hold out "
                         f"{n_val} for validation; add data or set data.val_root")
    return Subset(full, range(len(full) - n_val)), Subset(full, range(len(full) - n_val,
                                                                     len(full)))


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
    raise ValueError(f"unknown data.source {cfg.source!r}; expected one of {SOURCES}")


def build_edit_sources(cfg: DataConfig) -> tuple:
    """(train, val) edit-triplet record sources: ShapesWorld edits of scenes
    0..num_train-1 (held out: the next num_val), or a folder's ``edits.jsonl``."""
    if cfg.source == "shapes":
        kinds = tuple(cfg.edit_kinds) if cfg.edit_kinds else None
        bad = [k for k in kinds or () if k not in EDIT_KINDS]
        if bad:
            raise ValueError(f"unknown data.edit_kinds {bad}; expected some of {EDIT_KINDS}")
        kw = dict(seed=cfg.seed, size=cfg.image_size, kinds=kinds)
        return (ShapesEditSource(cfg.num_train, **kw),
                ShapesEditSource(cfg.num_val, offset=cfg.num_train, **kw))
    if cfg.source == "folder":
        return _folder_split(cfg, EditFolder)
    raise ValueError(f"unknown data.source {cfg.source!r}; expected one of {SOURCES}")


class DocumentDataModule(L.LightningDataModule):
    """Caption/image or editing Documents (``data.documents``) for either family; batches
    are lists of Documents."""

    def __init__(self, cfg: DataConfig, tokenizer: TextTokenizer | None = None):
        super().__init__()
        if cfg.documents not in DOCUMENTS:
            raise ValueError(f"unknown data.documents {cfg.documents!r}; expected one of "
                             f"{DOCUMENTS}")
        self.cfg = cfg
        self.tokenizer = tokenizer or TextTokenizer.from_file(resolve_path(cfg.text_tokenizer))
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.cfg.documents == "edit":
            train, val = build_edit_sources(self.cfg)
            self.train_set = EditDocuments(train, self.tokenizer)
            self.val_set = EditDocuments(val, self.tokenizer)
            return
        train, val = build_caption_sources(self.cfg)
        kw = dict(tokenizer=self.tokenizer, image_first_ratio=self.cfg.image_first_ratio,
                  seed=self.cfg.seed)
        self.train_set = CaptionDocuments(train, **kw)
        self.val_set = CaptionDocuments(val, **kw)

    def held_out(self, n: int) -> list:
        """The first ``n`` records of the validation source (fixed examples for grids)."""
        self.setup()
        source = self.val_set.source
        return [source[i] for i in range(min(n, len(source)))]

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.cfg.batch_size, shuffle=shuffle,
                          num_workers=self.cfg.num_workers, collate_fn=collate_documents,
                          persistent_workers=self.cfg.num_workers > 0, drop_last=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
