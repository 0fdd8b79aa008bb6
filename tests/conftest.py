"""Shared test set-up: one intra-op thread for the whole suite.

The tests run tiny models, where thread hand-offs cost more than the arithmetic (a forward of
a 2-layer, 32-wide model takes ~1.5 ms on one thread and far longer on two busy ones).
Subprocesses (the CLI tests) keep their own default.

Also the tiny character model the generate and explain tests share: 30 characters, and a
vocabulary of 32 so that two padding ids (as nanoGPT pads GPT-2's) must never come out; and
`run_python` / `sample_py`, the one way the CLI tests run a script as a user does
(`from conftest import sample_py`).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanosample.model import GPT, GPTConfig
from nanosample.tokenizer import CharTokenizer

torch.set_num_threads(1)

CHARS = list("abcdefghijklmnopqrstuvwxyz .,\n")


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer(CHARS)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=24, vocab_size=32, n_layer=2, n_head=2, n_embd=32)).eval()


def run_generate(model, tokenizer, prompt="the ", **kwargs):
    """{sample: (text, reason, tokens)} of a generate call."""
    from nanosample.generate import generate

    out = {}
    for piece in generate(model, tokenizer, tokenizer.encode(prompt), **kwargs):
        text, reason, tokens = out.get(piece.sample, ("", None, []))
        if piece.token is not None:
            tokens = tokens + [piece.token]
        out[piece.sample] = (text + piece.text, piece.reason if piece.done else reason, tokens)
    return out


REPO = Path(__file__).resolve().parent.parent


def run_python(*args, cwd=REPO, timeout=300):
    """Run `python ARGS...` as a user does; (exit code, stdout, stderr) as text."""
    # one thread: the models are tiny and several runs share two cores; never the network
    env = dict(os.environ, PYTHONIOENCODING="utf-8", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                       encoding="utf-8", env=env, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def sample_py(*args, cwd=REPO, timeout=300):
    """Run sample.py as a user does; (exit code, stdout, stderr)."""
    return run_python(str(REPO / "sample.py"), *args, cwd=cwd, timeout=timeout)
