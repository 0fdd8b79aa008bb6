"""Time one sampler step on each path, to choose where each runs: python bench_sampler.py

The sampler has a readable path (sampling.py: every filter on the whole vocabulary, one sort)
and an exact fast path (fast_sampling.py: windows and buckets). `sampling.use_fast_path` picks
by vocabulary size; this script measures both on random logits (standard normal times 3,
the spread of a trained model's logits; `--spread=0.55` gives the near-flat rows of a random
GPT-2, where top-p 0.9 keeps most of the vocabulary) for each vocabulary size and batch size, with the
bench's two samplers, and prints the fastest of the timed steps (on a shared machine the
fastest is the step nothing else interrupted) and which path is faster. The last line is one
JSON object with every figure.
"""

import json
import math
import sys
import time

from dataclasses import dataclass

import torch

from nanosample.sampling import BatchParams, SamplingParams, sample_step
from nanosample.settings import check, parse_for_main, setting

SAMPLERS = {"top_k 200": dict(temperature=0.8, top_k=200), "top_p 0.9": dict(top_p=0.9)}


@dataclass(frozen=True)
class BenchSamplerSettings:
    vocab: tuple[int, ...] = setting((65, 256, 512, 1024, 2048, 4096, 50257), "vocabulary sizes")
    batch: tuple[int, ...] = setting((1, 8, 64), "batch sizes")
    steps: int = setting(30, "timed steps per figure (after 3 warm-up steps)")
    threads: int = setting(0, "torch threads; 0 = torch's default")
    spread: float = setting(3.0, "standard deviation of the random logits (3: a trained model's; "
                                 "0.55: a random GPT-2's near-flat rows)")

    def __post_init__(self):
        check(math.isfinite(self.spread) and self.spread > 0, "spread", self.spread,
              "a finite number > 0")


def time_step(logits, params, fast, steps):
    """Seconds of one sample_step on these logits, one path: the fastest of `steps`."""
    generators = [torch.Generator().manual_seed(i) for i in range(len(params))]
    V = logits.shape[-1]
    times = []
    for i in range(steps + 3):
        t = time.perf_counter()
        sample_step(logits, params, generators, V, candidates=False, fast=fast)
        times.append(time.perf_counter() - t)
    return min(times[3:])


def main(argv=None):
    settings, code = parse_for_main(BenchSamplerSettings, argv, "bench_sampler.py", __doc__)
    if settings is None:
        return code
    if settings.threads:
        torch.set_num_threads(settings.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per step, the fastest of "
          f"{settings.steps}; logits N(0, {settings.spread}^2)")
    print(f"{'sampler':10} {'vocab':>6} {'batch':>5} {'readable':>9} {'fast':>9}  faster")
    results = []
    for name, values in SAMPLERS.items():
        for V in settings.vocab:
            for B in settings.batch:
                seeded = torch.Generator().manual_seed(V + B)
                logits = torch.randn(B, V, generator=seeded) * settings.spread
                params = BatchParams([SamplingParams(**values)] * B, V)
                readable = time_step(logits, params, False, settings.steps)
                fast = time_step(logits, params, True, settings.steps)
                faster = "readable" if readable <= fast else "fast"
                print(f"{name:10} {V:6} {B:5} {readable * 1e3:9.3f} {fast * 1e3:9.3f}  {faster}",
                      flush=True)
                results.append(dict(sampler=name, vocab=V, batch=B, readable_ms=readable * 1e3,
                                    fast_ms=fast * 1e3))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
