"""The GPT-2 model, where nanoGPT keeps it: the code is nanosample/model.py.

It lives in the package so that the installed loader can import it; this file keeps
`from model import GPT, GPTConfig` working from the repository root, as in nanoGPT.
"""

from nanosample.model import GPT, GPTConfig, KVCache  # noqa: F401
