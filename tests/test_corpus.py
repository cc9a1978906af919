"""The text tokenizer on any data source: fusion.data.corpus.caption_corpus (texts read without
opening an image), fusion.data.text.train_bpe, and scripts/train_text_tokenizer.py."""

import json
import logging
import runpy
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from fusion.config import DataConfig, compose
from fusion.data.corpus import CORPORA, caption_corpus
from fusion.data.shapes import ShapesWorld
from fusion.data.text import SPECIAL_TOKENS, TextTokenizer, shapes_corpus, train_bpe
from fusion.errors import UserError

# Llama-3's pre-tokenizer split (its tokenizer.json, "pre_tokenizer" -> "Split" -> "pattern")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_text_tokenizer.py"


def _write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_shapes_corpus_is_the_shipped_bpe_corpus_without_rendering():
    world = ShapesWorld(seed=0)
    before = []  # the corpus shapes-bpe was trained on, as it was read (rendering each scene)
    for i in range(40):
        before += [*world.sample(i).captions.values(), world.edit(i).instruction]
    corpus = caption_corpus(DataConfig(source="shapes", num_train=40))
    assert list(corpus) == before == list(shapes_corpus(40))
    assert corpus.description == ("ShapesWorld seed=0, scenes 0..39: captions, descriptions "
                                  "and edit instructions")
    # caption_tags narrows the captions; the description and the instruction always stay
    tagged = list(caption_corpus(DataConfig(num_train=40, caption_tags=["colors"])))
    assert set(tagged) < set(before)
    assert len(tagged) >= 80 and all(t in before for t in tagged)
    # data.documents=story: the stories' texts come after the scenes' own
    plain = list(caption_corpus(DataConfig(num_train=5)))
    stories = list(caption_corpus(DataConfig(num_train=5, documents="story")))
    assert stories[:len(plain)] == plain
    assert stories[len(plain)].startswith(("two photos of", "three photos of"))


def test_folder_texts_come_from_the_indexes_and_no_image_is_opened(tmp_path, caplog):
    # no image exists at all: the texts are read from captions.jsonl and edits.jsonl only
    _write_jsonl(tmp_path / "captions.jsonl",
                 [{"file": "a.png", "caption": " a red circle "}, {"file": "b.png"},
                  {"file": "c.png", "caption": "ünïcödé caption ✓"}, "{not json", ""]
                 + [{"file": f"{i}.png", "caption": f"caption {i}"} for i in range(30)])
    _write_jsonl(tmp_path / "edits.jsonl", [{"source": "a.png", "instruction": "make it blue",
                                             "target": "b.png"}])
    with caplog.at_level(logging.WARNING):
        corpus = caption_corpus(DataConfig(source="folder", root=str(tmp_path)))
        texts = list(corpus)
    assert texts[:2] == ["a red circle", "ünïcödé caption ✓"] and texts[-1] == "make it blue"
    assert len(texts) == 33
    assert "captions of captions.jsonl, instructions of edits.jsonl" in corpus.description
    warnings = [r.getMessage() for r in caplog.records]
    assert any("missing or empty caption" in w and "captions.jsonl:2" in w for w in warnings)
    assert any("malformed JSON line" in w for w in warnings)


def test_a_source_without_texts_is_refused_naming_the_folder(tmp_path):
    cfg = DataConfig(source="folder", root=str(tmp_path))
    with pytest.raises(UserError, match=f"{tmp_path}: no captions.*neither captions.jsonl"):
        caption_corpus(cfg)  # refused before any reading
    _write_jsonl(tmp_path / "captions.jsonl", [{"file": "a.png", "caption": "  "}])
    with pytest.raises(UserError, match=f"{tmp_path}: no captions.*1 line"):
        list(caption_corpus(cfg))
    _write_jsonl(tmp_path / "captions.jsonl",
                 [{"file": "a.png", "caption": "ok"}, {"file": "b.png"}, "{bad"])
    with pytest.raises(UserError, match="2 of 3 lines.*max_bad_share"):
        list(caption_corpus(cfg))
    with pytest.raises(UserError, match="needs data.root"):
        caption_corpus(DataConfig(source="folder"))
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        caption_corpus(DataConfig(source="folder", root=str(tmp_path / "nope")))
    with pytest.raises(UserError, match=f"unknown data.source 'webdataset'.*{sorted(CORPORA)}"):
        caption_corpus(DataConfig(source="webdataset"))
    with pytest.raises(UserError, match="num_train=0"):
        caption_corpus(DataConfig(num_train=0))


def test_train_bpe_checks_the_vocab_size_before_reading_and_refuses_no_texts(tmp_path):
    def untouchable():
        raise AssertionError("read")
        yield ""

    with pytest.raises(UserError, match=r"vocab_size must be >= 270 .*256-byte alphabet"):
        train_bpe(untouchable(), tmp_path, vocab_size=200, show_progress=False)
    with pytest.raises(UserError, match="no texts"):
        train_bpe(iter([]), tmp_path, show_progress=False)
    assert not (tmp_path / "tokenizer.json").exists()


def test_script_trains_on_a_folder_and_defaults_to_the_shipped_bpe(tmp_path, capsys):
    main = runpy.run_path(str(SCRIPT))["main"]  # registers the script's schema
    default = compose("train_text_tokenizer")
    assert (default.out, default.data.source, default.data.num_train, default.vocab_size) == (
        "tokenizers/shapes-bpe", "shapes", 20000, 512)  # the shipped card's corpus and size
    words = ["red", "blue", "green", "circle", "square", "star", "left", "of", "above"]
    rows = [{"file": f"{i}.png", "caption": f"a {words[i % 3]} {words[3 + i % 4]} "
             f"{words[6 + i % 2]} {words[8]} a {words[(i + 1) % 3]} {words[3 + (i + 2) % 3]}"}
            for i in range(300)]
    _write_jsonl(tmp_path / "captions.jsonl", rows)
    cfg = compose("train_text_tokenizer", ["data=folder", f"data.root={tmp_path}",
                                           f"out={tmp_path / 'bpe'}", "vocab_size=300",
                                           "show_progress=false"])
    main(cfg)
    summary = capsys.readouterr().out
    assert f"saved {tmp_path / 'bpe' / 'tokenizer.json'}: vocab 300;" in summary
    assert "300 texts read" in summary and "tokens per text on average" in summary
    tok = TextTokenizer.from_file(tmp_path / "bpe")
    assert [tok.special_ids[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.decode(tok.encode(rows[0]["caption"])) == rows[0]["caption"]
    card = json.loads((tmp_path / "bpe" / "card.json").read_text())
    assert card["texts"] == 300 and card["vocab_size"] == 300 and str(tmp_path) in card["corpus"]


def test_a_pretrained_tokenizer_json_keeps_its_ids_and_gains_fusions_tokens(tmp_path, caplog):
    # A stand-in for a Llama-3 tokenizer.json, built the way that one is: a regex split, then
    # bytes; its own special tokens; a post-processor that adds its own BOS; none of fusion's.
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        ["the quick brown fox jumps over the lazy dog"] * 20 + ["a red circle"] * 20,
        trainers.BpeTrainer(vocab_size=320, special_tokens=["<|begin_of_text|>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                            show_progress=False))
    raw.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      special_tokens=[("<|begin_of_text|>", 0)])])
    raw.save(str(tmp_path / "tokenizer.json"))
    size = raw.get_vocab_size()
    text = "the lazy fox and a red circle"
    with caplog.at_level(logging.WARNING):
        tok = TextTokenizer.from_file(tmp_path / "tokenizer.json")
    assert "lacks 14 of fusion's special tokens" in caplog.text
    assert sorted(tok.special_ids.values()) == list(range(size, size + len(SPECIAL_TOKENS)))
    assert tok.vocab_size == size + len(SPECIAL_TOKENS)
    assert tok.encode(text) == raw.encode(text, add_special_tokens=False).ids  # its own ids
    assert raw.encode(text).ids[0] == 0 and tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.bos_id, *tok.encode(text), tok.eos_id]) == text
    again = TextTokenizer.from_file(tok.save(tmp_path / "with-fusion"))
    assert again.special_ids == tok.special_ids and again.encode(text) == tok.encode(text)
