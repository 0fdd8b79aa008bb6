"""tokenizer.py: GPT-2 BPE against known ids and transformers' tokenizer; char vocabularies."""

import shutil

import pytest
import torch

from nanosample.tokenizer import (GPT2_BPE_DIR, CharTokenizer, TokenizerError, gpt2_tokenizer,
                       tokenizer_from_config)

TEXT = ("Hello world! It's 2024 — naïve café 日本語 🤖\n\n\tdon't   spaces  here   \n"
        "The quick brown fox jumps over the lazy dog. 3.14159 ¿Qué? <|endoftext|>Next doc")


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode("Hello, world!") == [15496, 11, 995, 0]
    assert gpt2.encode(" the") == [262]
    assert gpt2.decode([15496, 995]) == "Hello world"
    assert (gpt2.name, gpt2.n_vocab, gpt2.eot_id) == ("gpt2", 50257, 50256)


def test_gpt2_ranks_equal_tiktokens_builder_from_the_merges():
    # We rank tokens by their encoder.json id; tiktoken's own builder ranks them by the merges
    # in vocab.bpe (and checks encoder.json against them). Both must give the same 50256 ranks.
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    from nanosample.tokenizer import gpt2_mergeable_ranks
    ours = gpt2_mergeable_ranks((GPT2_BPE_DIR / "encoder.json").read_bytes())
    theirs = data_gym_to_mergeable_bpe_ranks(str(GPT2_BPE_DIR / "vocab.bpe"),
                                             str(GPT2_BPE_DIR / "encoder.json"))
    assert len(ours) == 50256
    assert ours == theirs
    assert ours[b" the"] == 262 and ours[b" "] == 220  # a space is spelled "\u0120", chr(256 + 32)


def test_gpt2_endoftext_text_is_the_special_token(gpt2):
    # as nanoGPT's sample.py: a prompt may hold a document boundary
    assert gpt2.encode("a<|endoftext|>b") == [64, 50256, 65]
    assert gpt2.decode([64, 50256, 65]) == "a<|endoftext|>b"


def test_gpt2_matches_transformers_tokenizer(gpt2, tmp_path):
    transformers = pytest.importorskip("transformers")
    # transformers' own BPE implementation, fed the same shipped files under its file names
    shutil.copy(GPT2_BPE_DIR / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(GPT2_BPE_DIR / "vocab.bpe", tmp_path / "merges.txt")
    reference = transformers.GPT2Tokenizer.from_pretrained(tmp_path)
    text = TEXT.replace("<|endoftext|>", "")  # transformers' slow tokenizer splits it differently
    ids = gpt2.encode(text)
    assert ids == reference.encode(text)
    assert len(ids) > 40
    assert gpt2.decode(ids) == text


def test_gpt2_undecodable_ids_are_skipped(gpt2):
    ids = [15496, 50257, 50303, -1, 995]  # 50257..50303: nanoGPT's padding rows
    assert gpt2.decode(ids) == "Hello world"
    assert gpt2.decode(torch.tensor(ids)) == "Hello world"
    assert gpt2.decode_bytes(ids) == b"Hello world"
    assert gpt2.token_text(50300) == ""


def test_gpt2_bytes_and_partial_utf8(gpt2):
    ids = gpt2.encode("日本語 🤖")
    pieces = [gpt2.decode_bytes([i]) for i in ids]
    assert b"".join(pieces) == "日本語 🤖".encode()
    partial = [i for i, p in zip(ids, pieces) if not _is_utf8(p)]
    assert partial, "this text should split a character across tokens"
    shown = gpt2.token_text(partial[0])
    assert "\\x" in shown and "\ufffd" not in shown
    # a cut inside a character decodes with a replacement character, never raises
    assert "\ufffd" in gpt2.decode(partial[:1])


def _is_utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_gpt2_altered_vocabulary_file_is_refused(tmp_path):
    shutil.copy(GPT2_BPE_DIR / "encoder.json", tmp_path / "encoder.json")
    data = (GPT2_BPE_DIR / "vocab.bpe").read_bytes()
    (tmp_path / "vocab.bpe").write_bytes(data[:-100])
    with pytest.raises(TokenizerError, match="vocab.bpe: sha256") as e:
        gpt2_tokenizer(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "vocab.bpe").unlink()
    with pytest.raises(TokenizerError, match="vocab.bpe: cannot read"):
        gpt2_tokenizer(tmp_path)


def test_char_round_trip_and_errors():
    chars = sorted(set("First Citizen:\nBefore we proceed any further, hear me speak.\n"))
    tok = CharTokenizer(chars)
    text = "Before we speak, hear me.\n"
    ids = tok.encode(text)
    assert ids == [chars.index(c) for c in text]
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode()
    assert (tok.name, tok.n_vocab, tok.eot_id) == ("char", len(chars), None)
    assert tok.decode([0, len(chars), 10_000, -3]) == chars[0]  # out of range: skipped
    assert tok.token_text(ids[0]) == "B"
    with pytest.raises(ValueError, match=r"character 'Z' \(position 3"):
        tok.encode("BeeZ")


def test_char_from_meta_and_config():
    chars = list("\n !abc")
    meta = {"vocab_size": 6, "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    tok = CharTokenizer.from_meta(meta)
    assert tok.chars == chars
    assert CharTokenizer.from_meta({"stoi": meta["stoi"]}).chars == chars
    again = tokenizer_from_config(tok.config())
    assert again.chars == chars and again.encode("a b!") == tok.encode("a b!")
    assert tokenizer_from_config({"kind": "gpt2"}) is gpt2_tokenizer()
    with pytest.raises(TokenizerError, match="ids 0..n-1"):
        CharTokenizer.from_meta({"itos": {0: "a", 2: "b"}})
    with pytest.raises(TokenizerError, match="unknown tokenizer"):
        tokenizer_from_config({"kind": "sentencepiece"})
