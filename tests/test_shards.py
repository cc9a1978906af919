"""Streamed tar shards (fusion.data.shards): the split over ranks and workers, seeded
shuffling, exact resume, bad input, and the writer and datamodule around them."""

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from fusion.data.export import write_shards
from fusion.data.shards import (
    ShardStream,
    StreamPosition,
    collate_positioned,
    expand_shards,
)
from fusion.data.sources import BadDataError
from fusion.errors import UserError


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """23 ShapesWorld samples in shards of 5: the last shard holds 3 (sizes do not divide)."""
    out = tmp_path_factory.mktemp("shards")
    counts = write_shards(out, 5, num_images=23, size=32, show_progress=False)
    assert counts == {"samples": 23, "skipped": [], "shards": 5}
    return sorted(str(p) for p in out.glob("*.tar"))


def _keys(stream: ShardStream, worker: int, workers: int, epochs: int = 1) -> list[str]:
    """The sample keys one reader gives over its first ``epochs`` epochs."""
    out = []
    for sample, position, _ in stream.samples(worker, workers):
        if position.epoch >= epochs:
            break
        out.append(sample["__key__"])
    return out


def _stream(paths, **kw) -> ShardStream:
    return ShardStream(paths, make_document=lambda rec: rec.key.rsplit(":", 1)[1], size=16,
                       **kw)


def test_two_ranks_by_two_workers_read_every_sample_exactly_once_an_epoch(shards):
    everything = [f"{i:09d}" for i in range(23)]
    for epoch_count in (1, 2):
        seen = []
        for rank in (0, 1):
            stream = _stream(shards, seed=3)
            stream.place(2, rank, 2)
            for worker in (0, 1):
                seen += _keys(stream, worker, 2, epoch_count)
        assert sorted(seen) == sorted(everything * epoch_count)  # once each, every epoch
    # seeded: the same order again, another seed another order, each epoch its own
    a, b = _stream(shards, seed=3), _stream(shards, seed=4)
    assert _keys(a, 0, 1) == _keys(_stream(shards, seed=3), 0, 1) != _keys(b, 0, 1)
    assert a.shard_order(0) != a.shard_order(1)


def test_more_readers_than_shards_is_refused(shards):
    with pytest.raises(UserError, match="5 shard.*3 rank.*x 2 loader worker.*= 6 readers"):
        _stream(shards).place(3, 0, 2)
    _stream(shards, train=False).place(3, 0, 2)  # validation: a shard per rank is enough


def _batches(stream, n: int, workers: int = 2) -> list:
    loader = DataLoader(stream, batch_size=3, num_workers=workers,
                        collate_fn=collate_positioned)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_an_interrupted_stream_resumes_without_repeating_or_skipping(shards):
    straight = [list(b) for b in _batches(_stream(shards, seed=1, shards_per_block=2), 14)]
    first = _batches(_stream(shards, seed=1, shards_per_block=2), 5)
    positions = {}
    for batch in first:  # what DataPosition keeps: each worker's last position
        positions[batch.stream_position.worker] = batch.stream_position
    resumed = _stream(shards, seed=1, shards_per_block=2)
    resumed.resume_from(positions, next_reader=(first[-1].stream_position.worker + 1) % 2)
    after = [list(b) for b in _batches(resumed, 9)]
    assert [list(b) for b in first] + after == straight  # crosses an epoch boundary: 14 x 3 > 23
    assert isinstance(positions[0], StreamPosition)


def _read(stream: ShardStream, worker: int, workers: int, n: int | None = None,
          start=None, until_epoch: int | None = None) -> tuple[list[str], StreamPosition]:
    """One reader's first ``n`` sample keys (or those before ``until_epoch``), and its
    position after the last."""
    keys, position = [], start
    for sample, where, _ in stream.samples(worker, workers, start):
        if until_epoch is not None and where.epoch >= until_epoch:
            break
        keys.append(sample["__key__"])
        position = where
        if len(keys) == n:
            break
    return keys, position


@pytest.mark.parametrize("per_block", [1, 2])
def test_a_stream_resumes_with_another_layout_repeating_and_skipping_nothing(shards, per_block):
    from fusion.data.shards import CARRIED

    everything = [f"{i:09d}" for i in range(23)]
    # the interrupted run: 2 ranks x 2 workers (shares of 3 to 10 samples an epoch), readers
    # stopped at different places, one of them epochs ahead of another
    taken = {(0, 0): 3, (0, 1): 9, (1, 0): 0, (1, 1): 5}
    consumed, saved = [], [{"readers": [2, 2]}, {"readers": [2, 2]}]
    for (rank, worker), n in taken.items():
        old = _stream(shards, seed=5, shards_per_block=per_block)
        old.place(2, rank, 2)
        keys, position = _read(old, worker, 2, n) if n else ([], None)
        consumed += keys
        if position is not None:
            saved[rank][str(worker)] = position.as_list()
    begun = 1 + max(p[1] for s in saved for k, p in s.items() if k != "readers")
    assert begun >= 2

    def resumed(workers=3):
        stream = _stream(shards, seed=5, shards_per_block=per_block)
        stream.place(1, 0, workers)
        stream.carry_over(saved)
        return stream

    carried, fresh = [], []
    for worker in range(3):
        keys, position = _read(resumed(), worker, 3, until_epoch=0)  # CARRIED is -1
        carried += keys
        fresh += _read(resumed(), worker, 3, start=position, until_epoch=begun + 1)[0]
    # the epochs the old run had begun: every sample exactly once in each, over both runs
    assert sorted(consumed + carried) == sorted(everything * begun)
    # the next epoch is split the new way: every sample once
    assert sorted(fresh) == sorted(everything)
    # interrupted again mid-way through the carried blocks, same layout: the same rest
    whole, _ = _read(resumed(), 1, 3, until_epoch=0)
    head, at = _read(resumed(), 1, 3, n=4)
    assert at.epoch == CARRIED and head + _read(resumed(), 1, 3, start=at, until_epoch=0)[0] == whole
    # but not with yet another layout: where a reader stands in its carried blocks depends on it
    again = [{"readers": [1, 3], "0": at.as_list()}]
    with pytest.raises(UserError, match="still finishing blocks carried over"):
        _stream(shards, seed=5, shards_per_block=per_block).carry_over(again)


def test_the_datamodule_resumes_a_stream_saved_by_another_layout(shards, tokenizer, caplog):
    from omegaconf import OmegaConf

    from fusion.config import DataConfig
    from fusion.data.datamodule import DocumentDataModule

    cfg = DataConfig(source="shards", shards=shards, image_size=32, batch_size=2, num_workers=0)
    dm = DocumentDataModule(OmegaConf.structured(cfg), tokenizer)
    dm.setup()
    streams = [{"0": [0, 0, 1, 2], "1": [1, 0, 0, 3], "readers": [1, 2], "next": 0}]
    mine = dm.resume_at(0, 3, streams)  # saved with 2 workers, resumed with none
    assert "carried over" in caplog.text
    assert mine["readers"] == [1, 1] and mine["carry_from"] == [
        {"0": [0, 0, 1, 2], "1": [1, 0, 0, 3], "readers": [1, 2]}]
    assert len(next(iter(dm.train_dataloader()))) == 2
    # the next checkpoint, with the reader still in its carried blocks, keeps carry_from; a
    # resume with the same layout goes on in them, with another it is refused
    later = [{"0": [0, -1, 1, 1], "readers": [1, 1], "next": 0, "carry_from": mine["carry_from"]}]
    again = DocumentDataModule(OmegaConf.structured(cfg), tokenizer)
    again.setup()
    assert again.resume_at(0, 9, later)["carry_from"] == mine["carry_from"]
    moved = DocumentDataModule(OmegaConf.structured(DataConfig(**{**vars(cfg),
                                                                 "num_workers": 2})), tokenizer)
    moved.setup()
    with pytest.raises(UserError, match="still finishing blocks carried over"):
        moved.resume_at(0, 9, later)


def _tar(path: Path, members: dict[str, bytes], truncate: bool = False) -> str:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return str(path)


def _png(value: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_samples_are_skipped_counted_and_named(tmp_path, caplog):
    good = {}
    for i in range(30):  # a sample's members are adjacent, as in every shard writer's output
        good |= {f"{i:03d}.png": _png(), f"{i:03d}.txt": b"a red circle"}
    bad = {"b01.png": b"not an image", "b01.txt": b"x",  # undecodable image
           "b02.png": _png(),  # no caption
           "b03.txt": b"a caption without its image",
           "b04.png": _png(), "b04.txt": b"   "}  # empty caption
    paths = [_tar(tmp_path / "a.tar", good | bad),
             _tar(tmp_path / "b.tar", good, truncate=True),
             str(tmp_path / "c.tar")]
    (tmp_path / "c.tar").write_bytes(b"\x00garbage")
    stream = _stream(paths, train=False, max_bad_share=0.5)
    with caplog.at_level(logging.WARNING):
        got = [doc for doc, _ in stream]
    assert len(got) >= 30 and all(k.isdigit() for k in got)  # the good ones, b.tar's prefix too
    for kind in ("undecodable image", "missing caption", "missing image", "truncated shard",
                 "unreadable shard"):
        assert sum(kind in r.message for r in caplog.records) == 1, kind  # one line per kind
    broken = {}
    for j in range(40):
        broken |= {f"z{j:02d}.png": b"x", f"z{j:02d}.txt": b"c"}
    strict = _stream([paths[0], _tar(tmp_path / "broken.tar", broken)], train=False)
    with pytest.raises(BadDataError, match=r"samples read are bad .*first bad: .*a.tar:b01"):
        list(strict)


def test_shard_names_lists_globs_and_braces(shards, tmp_path):
    folder = str(Path(shards[0]).parent)
    assert expand_shards(f"{folder}/*.tar") == shards
    assert expand_shards(f"{folder}/{{00000..00004}}.tar") == shards
    assert expand_shards([shards[1], shards[0]]) == [shards[1], shards[0]]
    with pytest.raises(UserError, match="1 of 1 shard.*not found"):
        expand_shards(f"{folder}/09999.tar")
    with pytest.raises(UserError, match="no file matches"):
        expand_shards(str(tmp_path / "none" / "*.tar"))


def test_a_caption_can_come_from_a_json_field(shards):
    got = next(iter(ShardStream(shards, make_document=lambda rec: rec.caption, size=16,
                                caption_key="json.caption", train=False)))
    plain = next(iter(ShardStream(shards, make_document=lambda rec: rec.caption, size=16,
                                  train=False)))
    assert got[0] == plain[0] and got[0].startswith("a ")
    with pytest.raises(UserError, match="caption_key"):
        ShardStream(shards, make_document=str, size=16, caption_key="json")


def _script(name: str):
    import runpy

    return runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / name))["main"]


def test_a_users_folder_becomes_shards_that_check_data_reads(tmp_path, capsys):
    from fusion.data.export import export_shapes

    export_shapes(tmp_path / "folder", 9, num_edits=3, show_progress=False)
    with (tmp_path / "folder" / "captions.jsonl").open("a") as fh:
        fh.write('{"file": "images/missing.png", "caption": "gone"}\n{not json\n')
    make = _script("make_shards.py")
    run = ["--folder", str(tmp_path / "folder"), "--shard-size", "4"]
    assert make([*run, "--out", str(tmp_path / "caps")])["shards"] == 3
    out = capsys.readouterr().out
    assert "wrote 9 samples in 3 shard(s)" in out and "skipped 2 bad row(s)" in out
    make([*run, "--edits", "--out", str(tmp_path / "edits")])
    assert "wrote 3 samples in 1 shard(s)" in capsys.readouterr().out
    names = set(tarfile.open(tmp_path / "edits" / "00000.tar").getnames())
    assert {"000000001.source.png", "000000001.target.png", "000000001.txt"} <= names
    # the image bytes go in unchanged
    first = tarfile.open(tmp_path / "caps" / "00000.tar").extractfile("000000001.png").read()
    assert first == (tmp_path / "folder" / "images" / "0000000.png").read_bytes()
    with pytest.raises(SystemExit):  # a folder that already holds shards: refused
        make([*run, "--out", str(tmp_path / "caps")])
    assert "already holds shards" in capsys.readouterr().err
    check = _script("check_data.py")
    assert check(["--shards", str(tmp_path / "caps" / "*.tar"), "--no-length-check"]) == 0
    out = capsys.readouterr().out
    assert "00002.tar: 1 good, 0 bad" in out and "9 good sample(s), 0 skipped" in out
    assert check(["--shards", str(tmp_path / "edits" / "*.tar"), "--edits"]) == 0
    out = capsys.readouterr().out
    assert "3 good sample(s), 0 skipped" in out and "0 instruction(s) longer" in out
    # caption shards read as triplets: every sample lacks its source and target
    assert check(["--shards", str(tmp_path / "caps" / "*.tar"), "--edits",
                  "--no-length-check"]) == 1
    out = capsys.readouterr().out
    assert "4 missing source or target image" in out and "REFUSED: 9 of 9 samples" in out


def _edit_folder_and_shards(tmp_path: Path, n: int = 8) -> tuple[Path, list[str]]:
    from fusion.data.export import export_shapes

    folder = tmp_path / "folder"
    export_shapes(folder, 0, num_edits=n, size=32, show_progress=False)
    counts = write_shards(tmp_path / "edits", 3, folder=folder, edits=True, show_progress=False)
    assert counts["samples"] == n
    return folder, sorted(str(p) for p in (tmp_path / "edits").glob("*.tar"))


def test_edit_triplet_shards_stream_the_folders_triplets(tmp_path, tokenizer):
    from omegaconf import OmegaConf

    from fusion.config import DataConfig
    from fusion.data.datamodule import DocumentDataModule
    from fusion.data.shards import check_shard
    from fusion.data.sources import EditFolder

    folder, paths = _edit_folder_and_shards(tmp_path)  # 8 triplets: shards of 3, 3 and 2
    cfg = DataConfig(source="shards", shards=paths, documents="edit", image_size=32,
                     batch_size=2, num_workers=0)
    dm = DocumentDataModule(OmegaConf.structured(cfg), tokenizer)
    dm.setup()
    streamed = dm.train_set.first_records(100) + dm.val_set.first_records(100)
    assert [len(streamed), len(dm.val_set.first_records(100))] == [8, 2]  # the last held out
    for got, want in zip(streamed, EditFolder(folder, size=32), strict=True):
        assert got.instruction == want.instruction  # pixels and text come through unchanged
        assert (got.source == want.source).all() and (got.target == want.target).all()
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 2 and all(d.is_edit for d in batch)
    source, text, target = batch[0].segments
    assert source.is_condition and not target.is_condition
    assert tokenizer.decode(text.ids) in {r.instruction for r in streamed}
    # the training grids' held-out examples come from the stream
    assert [r.key for r in dm.held_out(2)] == [r.key for r in streamed[6:]]
    # a triplet without its target, or without an instruction, is skipped and named
    _tar(tmp_path / "bad.tar", {"x.source.png": _png(), "x.txt": b"make it red",
                                "y.source.png": _png(), "y.target.png": _png()})
    assert check_shard(str(tmp_path / "bad.tar"), kind="edit") == (
        [], {"missing source or target image": ["x"], "missing instruction": ["y"]})


def test_a_stream_of_the_wrong_kind_is_refused_naming_it(shards, tokenizer):
    from omegaconf import OmegaConf

    from fusion.config import DataConfig
    from fusion.data.datamodule import DocumentDataModule

    cfg = DataConfig(source="shards", shards=shards, documents="story", image_size=32)
    with pytest.raises(UserError, match="data.documents=story needs data.source=shapes"):
        DocumentDataModule(OmegaConf.structured(cfg), tokenizer).setup()


def test_the_datamodule_streams_batches_that_say_where_they_stand(shards, tokenizer):
    from omegaconf import OmegaConf

    from fusion.config import DataConfig
    from fusion.data.datamodule import DocumentDataModule
    from fusion.data.documents import Document

    cfg = DataConfig(source="shards", shards=shards, image_size=32, batch_size=4,
                     num_workers=0)
    dm = DocumentDataModule(OmegaConf.structured(cfg), tokenizer)
    dm.setup()
    assert dm.streaming and dm.val_set.shards == shards[-1:]  # the last shard held out
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 4 and all(isinstance(d, Document) for d in batch)
    assert batch.stream_position == StreamPosition(0, 0, 0, 4)
    assert sum(len(b) for b in dm.val_dataloader()) == 3  # a finite pass: the 3 of the last
    with pytest.raises(UserError, match="only shard"):
        DocumentDataModule(OmegaConf.structured(DataConfig(source="shards", shards=shards[:1])),
                           tokenizer).setup()


def test_streamed_batches_are_prepared_with_draws_seeded_by_their_position(shards, tokenizer):
    """With a family preparer, a stream's batches come prepared; each batch's draws follow
    its reader position, so two passes (or a resumed one) draw the same, batch by batch."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from fusion.config import DataConfig
    from fusion.data.datamodule import DocumentDataModule

    def prepare(docs, rng):  # a stand-in for a family's BatchPreparer
        return SimpleNamespace(docs=docs, draw=rng.random())

    cfg = DataConfig(source="shards", shards=shards, image_size=32, batch_size=2, num_workers=0)

    def first_batches(n):
        dm = DocumentDataModule(OmegaConf.structured(cfg), tokenizer, prepare=prepare)
        dm.setup()
        loader = iter(dm.train_dataloader())
        return [next(loader) for _ in range(n)]

    one, two = first_batches(3), first_batches(3)
    assert one[0].stream_position == StreamPosition(0, 0, 0, 2)
    assert [b.stream_position for b in one] == [b.stream_position for b in two]
    assert [b.draw for b in one] == [b.draw for b in two]
    assert len({b.draw for b in one}) == 3 and all(len(b.docs) == 2 for b in one)


@pytest.mark.slow
@pytest.mark.parametrize("resume_workers", [2, 1])
def test_a_run_on_shards_killed_with_sigkill_resumes_on_the_same_curve(tmp_path, tiny_vae,
                                                                        resume_workers):
    """scripts/train.py data=shards with two loader workers: kill -9 mid-run, run again,
    and the logged losses equal the uninterrupted run's at every step (same batches, same
    order, across the streams' epoch boundary). Run again with one worker, the unfinished
    blocks are carried over: every step is logged once, in another order of batches."""
    import signal
    import subprocess
    import sys
    import time

    from test_resume import ROOT, _logged_steps, _losses, _wait_for

    write_shards(tmp_path / "shards", 12, num_images=60, show_progress=False)  # 4 + 1 held out
    cmd = [sys.executable, "scripts/train.py", "experiment=transfusion_tiny", "debug=default",
           "data=shards", f"data.shards={tmp_path / 'shards'}/*.tar", "data.num_workers=2",
           "data.batch_size=8", "logger=csv", "trainer.limit_val_batches=0",
           "sampling.prompts=[]", "trainer.log_every_n_steps=1", "trainer.max_steps=9",
           "callbacks.checkpoint_every_n_steps=5", f"image_tokenizer={tiny_vae}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    subprocess.run([*cmd, f"output_dir={straight}"], cwd=ROOT, check=True, capture_output=True)
    proc = subprocess.Popen([*cmd, f"output_dir={resumed}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(resumed / "checkpoints" / "step0000005.ckpt", proc)  # odd: worker 1 next
    while "4" not in _logged_steps(resumed):
        time.sleep(0.02)
    import os

    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run([*cmd, f"output_dir={resumed}",
                           f"data.num_workers={resume_workers}"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout
    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == list(range(9)) == sorted(b)
    if resume_workers == 2:
        assert a == b
    else:
        assert "the unfinished blocks are carried over" in done.stdout + done.stderr
        assert all(a[step] == b[step] for step in range(5))  # trained before the kill


@pytest.mark.slow
def test_an_editing_run_trains_on_triplet_shards(tmp_path):
    """scripts/train.py data=shards data.documents=edit: an editing fine-tune streams its
    triplets, and its grids show the held-out shard's edits."""
    import json
    import subprocess
    import sys

    from test_resume import ROOT

    _, paths = _edit_folder_and_shards(tmp_path, n=24)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "experiment=edit_transfusion_tiny", "debug=default",
         "data=shards", f"data.shards=[{','.join(paths)}]", "data.documents=edit",
         "data.image_size=32", "logger=csv", "trainer.val_check_interval=2",
         "trainer.check_val_every_n_epoch=null", f"output_dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "model" / "config.json").read_text())["documents"] == "edit"
    assert list((out / "samples").glob("*.png"))
    logged = (out / "csv" / "metrics.csv").read_text()
    assert "val/loss" in logged and "train/diffusion_loss" in logged


def test_a_text_tokenizer_trains_on_the_captions_of_shards(shards, tmp_path, caplog):
    from omegaconf import OmegaConf

    from fusion.config import DataConfig
    from fusion.data.corpus import caption_corpus
    from fusion.data.shards import shard_captions

    captions = list(shard_captions(shards))
    assert len(captions) == 23 and all(c.strip() for c in captions)
    broken = tmp_path / "broken.tar"
    with tarfile.open(broken, "w") as tf:
        for name, data in (("a.txt", b"a red circle"), ("b.txt", b"\xff\xfe"), ("c.txt", b" ")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with caplog.at_level(logging.WARNING):
        assert list(shard_captions([str(broken)])) == ["a red circle"]
    assert "skipped 2 in all (1 unreadable caption, 1 missing caption)" in caplog.text
    assert list(shard_captions(shards, "json.caption")) == captions
    corpus = caption_corpus(OmegaConf.structured(DataConfig(source="shards", shards=shards)))
    assert list(corpus) == captions and "5 shard(s)" in corpus.description
