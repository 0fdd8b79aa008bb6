"""Shared test set-up: one intra-op thread for the whole suite.

The tests run tiny models, where thread hand-offs cost more than the arithmetic (a forward of
a 2-layer, 32-wide model takes ~1.5 ms on one thread and far longer on two busy ones).
Subprocesses (the CLI tests) keep their own default.
"""

import torch

torch.set_num_threads(1)
