import pytest
from omegaconf import OmegaConf

from fusion.config import DataConfig
from fusion.data.datamodule import DocumentDataModule, build_caption_sources
from fusion.data.export import export_shapes


def test_shapes_datamodule_batches_documents(tokenizer):
    cfg = OmegaConf.structured(DataConfig(num_train=20, num_val=6, batch_size=4))
    dm = DocumentDataModule(cfg, tokenizer)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 4 and all(d.images for d in batch)
    assert len(dm.val_set) == 6
    # held-out scenes are disjoint from the training scenes
    assert dm.val_set.source.offset == 20


def test_folder_split_and_errors(tmp_path, tokenizer):
    export_shapes(tmp_path, 20, show_progress=False)
    cfg = OmegaConf.structured(DataConfig(source="folder", root=str(tmp_path), val_share=0.1))
    train, val = build_caption_sources(cfg)
    assert (len(train), len(val)) == (18, 2)
    with pytest.raises(ValueError, match="needs data.root"):
        build_caption_sources(OmegaConf.structured(DataConfig(source="folder")))
    with pytest.raises(ValueError, match="unknown data.source 'hub'"):
        build_caption_sources(OmegaConf.structured(DataConfig(source="hub")))
