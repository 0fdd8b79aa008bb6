"""`sample.py --compile`: torch.compile on the CPU runs, and its greedy text is eager's.

The loader puts cpu_kernels' routes on the model; under torch.compile they step aside for
F.linear (tracing oneDNN's private op used to end in an InductorError). Compiling takes a
while even for a tiny model (seconds with torch's compile cache warm, a minute or two cold on
two busy cores): marked slow.
"""

import pytest
import torch

import conftest

CHARS = list("abcdefghijklmnopqrstuvwxyz .,\n")


def sample_py(*args):
    return conftest.sample_py(*args, timeout=900)  # compiling takes minutes on a busy machine


@pytest.mark.slow
def test_compile_gives_eager_text(tmp_path):
    from nanosample.loader import save_native
    from nanosample.model import GPT, GPTConfig
    from nanosample.tokenizer import CharTokenizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=len(CHARS), n_layer=1, n_head=2, n_embd=16))
    save_native(model, CharTokenizer(CHARS), tmp_path / "tiny")
    args = [f"--init_from={tmp_path / 'tiny'}", "--start=the king said ", "--temperature=0",
            "--num_samples=3", "--max_new_tokens=12"]
    eager = sample_py(*args)
    compiled = sample_py(*args, "--compile")
    assert eager[0] == 0, eager[2]
    assert compiled[0] == 0 and "Traceback" not in compiled[2], compiled[2][-3000:]
    assert compiled[1] == eager[1]
    assert eager[1].count("the king said ") == 3  # three samples were printed
