"""Shared test set-up: one intra-op thread for the whole suite.

The tests run tiny models, where thread hand-offs cost more than the arithmetic (a forward of
a 2-layer, 32-wide model takes ~1.5 ms on one thread and far longer on two busy ones).
Subprocesses (the CLI tests) keep their own default.

Also the tiny character model the generate and explain tests share: 30 characters, and a
vocabulary of 32 so that two padding ids (as nanoGPT pads GPT-2's) must never come out.
"""

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
