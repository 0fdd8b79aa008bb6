"""Tiny Shakespeare, the corpus nanoGPT's character model trains on: downloaded once from its
usual public address into a cache, its sha256 checked. Used by train.py and evaluate.py."""

import hashlib
import os
import urllib.request
from pathlib import Path

from nanosample import cli
from nanosample.settings import SettingsError

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def default_cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nanosample"


def download_tiny_shakespeare(cache_dir=None):
    """Path of tiny Shakespeare in the cache, downloading it the first time."""
    path = Path(cache_dir or default_cache_dir()) / "tinyshakespeare" / "input.txt"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {TINY_SHAKESPEARE_URL} to {path}", flush=True)
    try:
        with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=60) as response:
            data = response.read()
    except OSError as e:  # URLError, timeouts, refused connections
        raise ValueError(f"could not download tiny Shakespeare from {TINY_SHAKESPEARE_URL} ({e}); "
                         f"download it yourself and pass --data=PATH") from None
    got = hashlib.sha256(data).hexdigest()
    if got != TINY_SHAKESPEARE_SHA256:
        raise ValueError(f"{TINY_SHAKESPEARE_URL}: the download's sha256 {got[:12]}... is not "
                         f"tiny Shakespeare's {TINY_SHAKESPEARE_SHA256[:12]}...; pass --data=PATH")
    tmp = path.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(path)  # never leave a half-written cache file behind
    return path


def read_corpus(data):
    """(text, path) of the corpus --data names, or of tiny Shakespeare (downloaded once) when
    `data` is empty: a regular UTF-8 file of at most cli.CORPUS_LIMIT bytes. Every mistake, a
    failed download included, is a SettingsError naming --data."""
    if data:
        path = data
    else:
        try:
            path = str(download_tiny_shakespeare())
        except ValueError as e:
            raise SettingsError(f"--data: {e}") from None
    text = cli.read_user_text(path, f"--data={path}", what="a text corpus", limit=cli.CORPUS_LIMIT)
    return text, Path(path)
