"""Tokenizers: GPT-2's byte-level BPE and nanoGPT's character vocabularies.

The only file that imports tiktoken. GPT-2's BPE is built from the vocabulary files shipped in
assets/gpt2-bpe/ (their sha256 checked on load), so tokenizing never touches the network.

Both tokenizers share one small interface:
    name, n_vocab, eot_id, encode(text), decode(ids), decode_bytes(ids), token_text(id), config()
Ids outside 0..n_vocab-1 (nanoGPT pads GPT-2's 50257 rows to 50304) are never an error when
decoding: they decode to nothing. `config()` is what the native checkpoint format stores, and
`tokenizer_from_config` reads it back.
"""

import functools
import hashlib
import json
import os
import reprlib
import stat
from pathlib import Path

GPT2_BPE_DIR = Path(__file__).resolve().parent / "assets" / "gpt2-bpe"
# sha256 of the files OpenAI published (the same hashes tiktoken checks for its "gpt2" encoding)
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenizer regex, as tiktoken writes it (r50k_base / gpt2)
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_EOT = "<|endoftext|>"
GPT2_EOT_ID = 50256
# encoder.json is 1.0 MB and vocab.bpe 0.46 MB: a larger file is refused before it is read
MAX_VOCAB_FILE_BYTES = 8 * 2**20


class TokenizerError(ValueError):
    """A vocabulary file is missing, altered, or not a vocabulary; the message is one line."""


def _valid_ids(ids, n_vocab):
    """The ids that can be decoded, as Python ints; accepts lists, tuples and tensors."""
    out = []
    for i in ids:
        i = int(i)
        if 0 <= i < n_vocab:
            out.append(i)
    return out


class GPT2Tokenizer:
    """GPT-2's byte-level BPE (50257 ids, <|endoftext|> = 50256), on tiktoken.

    `encode` treats the literal text "<|endoftext|>" as the special token, as nanoGPT's
    sample.py does (allowed_special={"<|endoftext|>"}): a prompt can hold a document boundary.
    """

    name = "gpt2"
    n_vocab = 50257
    eot_id = GPT2_EOT_ID

    def __init__(self, encoding):
        assert encoding.n_vocab == self.n_vocab
        self._enc = encoding

    def encode(self, text):
        return self._enc.encode(text, allowed_special={GPT2_EOT})

    def decode(self, ids):
        # errors="replace": a sequence cut inside a multi-byte character shows U+FFFD, never raises
        return self._enc.decode(_valid_ids(ids, self.n_vocab), errors="replace")

    def decode_bytes(self, ids):
        return self._enc.decode_bytes(_valid_ids(ids, self.n_vocab))

    def token_text(self, id):
        """One token for display: partial UTF-8 bytes appear as escapes, e.g. "\\xe2"."""
        return self.decode_bytes([id]).decode("utf-8", errors="backslashreplace")

    def config(self):
        return {"kind": "gpt2"}

    def __repr__(self):
        return "GPT2Tokenizer()"


def _read_checked(path, expected):
    """The bytes of `path`, whose sha256 must be `expected`."""
    try:
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # a FIFO or device: never read
                raise TokenizerError(f"{path}: not a regular file; restore it from the project")
            data = f.read(MAX_VOCAB_FILE_BYTES + 1)
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read GPT-2's vocabulary file ({e.strerror})") from None
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise TokenizerError(f"{path}: sha256 {got[:12]}... is not GPT-2's {expected[:12]}...; "
                             f"the file is altered or truncated, restore it from the project")
    return data


def _byte_translation():
    """encoder.json spells each byte as one printable character: bytes printable in Latin-1
    (other than space) as themselves, the other 68 as chr(256), chr(257), ... in byte order.
    -> a str.translate table back to chr(byte)."""
    spelled_as_self = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in spelled_as_self]
    return {256 + n: b for n, b in enumerate(others)}


def gpt2_mergeable_ranks(encoder_json):
    """{token bytes: rank} for tiktoken from encoder.json's contents.

    A token's rank is its id: GPT-2's merges (vocab.bpe) create the tokens in the order
    encoder.json numbers them. tiktoken's own builder (`data_gym_to_mergeable_bpe_ranks`)
    derives the ranks from the merges and checks them against encoder.json, which takes 0.4 s
    of a cold start; a test checks that both give the same ranks.
    """
    table = _byte_translation()
    return {token.translate(table).encode("latin-1"): rank
            for token, rank in json.loads(encoder_json).items() if token != GPT2_EOT}


@functools.cache
def gpt2_tokenizer(bpe_dir=GPT2_BPE_DIR):
    """GPT-2's tokenizer from the shipped vocabulary files (built once per process)."""
    import tiktoken

    bpe_dir = Path(bpe_dir)
    # Both files must be OpenAI's; the merges file is checked even though encoder.json is enough
    # to build from: a project shipping altered vocabulary files should not load.
    _read_checked(bpe_dir / "vocab.bpe", GPT2_VOCAB_BPE_SHA256)
    encoder_json = _read_checked(bpe_dir / "encoder.json", GPT2_ENCODER_JSON_SHA256)
    encoding = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR,
                                 mergeable_ranks=gpt2_mergeable_ranks(encoder_json),
                                 special_tokens={GPT2_EOT: GPT2_EOT_ID}, explicit_n_vocab=50257)
    return GPT2Tokenizer(encoding)


class CharTokenizer:
    """A character vocabulary: id i is the character chars[i] (nanoGPT's meta.pkl itos)."""

    name = "char"
    eot_id = None

    def __init__(self, chars):
        chars = list(chars)
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise TokenizerError(f"character vocabulary entry {_short(c)} is not one "
                                     f"character")
            if "\ud800" <= c <= "\udfff":  # half of a UTF-16 pair: it can never be printed
                raise TokenizerError(f"character vocabulary entry {c!r} is a lone surrogate, "
                                     f"not a character")
        if len(set(chars)) != len(chars):
            raise TokenizerError("character vocabulary lists a character twice")
        if not chars:
            raise TokenizerError("character vocabulary is empty")
        self.chars = chars
        self.n_vocab = len(chars)
        self._stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_meta(cls, meta, source="meta.pkl"):
        """From nanoGPT's meta.pkl dict {'vocab_size', 'itos': {id: ch}, 'stoi': {ch: id}}."""
        if not isinstance(meta, dict):
            raise TokenizerError(f"{source}: expected a dict with 'itos', got {type(meta).__name__}")
        itos = meta.get("itos")
        stoi = meta.get("stoi")
        if itos is None and isinstance(stoi, dict):
            if not all(type(i) is int for i in stoi.values()):  # ids, so that they can be keys
                raise TokenizerError(f"{source}: 'stoi' must map characters to the ids 0..n-1")
            itos = {i: c for c, i in stoi.items()}
        if (not isinstance(itos, dict) or not all(type(i) is int for i in itos)
                or sorted(itos) != list(range(len(itos)))):
            raise TokenizerError(f"{source}: 'itos' must map the ids 0..n-1 to characters")
        try:
            return cls(itos[i] for i in range(len(itos)))
        except TokenizerError as e:
            raise TokenizerError(f"{source}: {e}") from None

    def encode(self, text):
        try:
            return [self._stoi[c] for c in text]
        except KeyError:
            pos = next(i for i, c in enumerate(text) if c not in self._stoi)
            raise ValueError(f"character {text[pos]!r} (position {pos} of the text) is not in "
                             f"this model's {self.n_vocab}-character vocabulary") from None

    def decode(self, ids):
        return "".join(self.chars[i] for i in _valid_ids(ids, self.n_vocab))

    def decode_bytes(self, ids):
        return self.decode(ids).encode("utf-8")

    def token_text(self, id):
        return self.decode([id])

    def config(self):
        return {"kind": "char", "chars": list(self.chars)}

    def __repr__(self):
        return f"CharTokenizer({self.n_vocab} characters)"


def tokenizer_from_config(config, source="config.json"):
    """The tokenizer a native checkpoint's "tokenizer" entry describes."""
    kind = config.get("kind") if isinstance(config, dict) else None
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind == "char":
        chars = config.get("chars")
        if not isinstance(chars, (list, str)):
            raise TokenizerError(f"{source}: the char tokenizer's 'chars' must be a list of "
                                 f"characters, got {_short(chars)}")
        try:
            return CharTokenizer(chars)
        except TokenizerError as e:
            raise TokenizerError(f"{source}: {e}") from None
    raise TokenizerError(f"{source}: unknown tokenizer {_short(config)}; expected kind 'gpt2' "
                         f"or 'char'")


def _short(value, limit=60):
    """repr(value) cut to `limit` characters, for a value from a file in a one-line message."""
    try:
        text = reprlib.repr(value)
    except Exception:  # a huge int inside a container
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."
