"""Speed benchmark: our `generate` against Hugging Face transformers' `generate` on the same
weights, with a plain loop without a KV cache (nanoGPT's method) as the floor.

What one run measures, interleaved so that a busy spell on a shared machine hurts every
system alike (each repeat runs every system once, in rotating order):

- per (batch size, sampler, new tokens): prefill (the prompt, up to the first token) and
  decode (every later token) timed apart, after a warm-up; medians over the repeats of
  tokens/s, ms per decode step, and the ratio against transformers in the same run;
- the sampler's share of our decode step (`sampling.sample_step` timed inside `generate`);
- for runs longer than 128 tokens, our decode rate over the whole run against its first 128
  tokens (whether the cost per token stays flat, measured within one run);
- cold start: a fresh process per system, from its launch to the first generated token
  (imports, tokenizer, loading, prefill), and its peak memory (RSS high-water mark);
- the machine's read bandwidth (a sum over 512 MiB) and the batch-1 bound it implies:
  the bytes of weights one decode step streams, divided by that bandwidth.
- with `--systems=ours,compiled` (compiled is not in the default run): ours under
  torch.compile beside eager, its tokens/s and the time its first calls took (compiling).
- with `--peers`: llama.cpp on the same weights (GGUF f32, f16, q8_0, converted by its own
  convert_hf_to_gguf.py into the cache folder), with our thread count, its runs interleaved
  with ours in the repeats of each (batch size, new tokens): `llama-bench` at batch 1 (the
  prompt's tokens/s, and decode tokens/s after it), `llama-batched-bench -pps` above (one
  prompt shared by B sequences, as our num_samples=B). The report's "peers" holds its figures
  and the ratios ours / llama.cpp (fp32 against f32, fp16 and bf16 against f16, int8 against
  q8_0; null where ours has no such system). The build is --llamacpp=DIR (its build/bin
  folder) or llama-bench on PATH; without one, --peers stops before any work (exit code 2)
  with one line saying how to build it. See bench_peers.py, which also runs alone.

The settings are the same for every system: a 16-token prompt, `top_k` = temperature 0.8 and
top-k 200 (nanoGPT's defaults) or `top_p` = temperature 1 and top-p 0.9 (top-k off); every
sample is exactly `new_tokens` long (ours: stop_at_eot=False; transformers: min_new_tokens =
max_new_tokens, use_cache=True). By default the model is GPT-2 124M's shape with random
weights, written once by transformers (`GPT2LMHeadModel(GPT2Config()).save_pretrained`) into
a cache folder under the system's temp dir and reused; --init_from loads any checkpoint ours
can (transformers is then given the same weights when the folder is in its format).

    .venv/bin/python bench.py            # ~10-15 min on 2 cores: batch 1, 8 and 64, both samplers
    .venv/bin/python bench.py --quick    # ~1 min: batch 1, 128 tokens, one repeat
    .venv/bin/python bench.py --full     # the whole matrix: long (an hour or more)
    .venv/bin/python bench.py --load_test   # ~8 min: the thread policy, alone and beside 2 busy ones
    .venv/bin/python bench.py --quick --peers --llamacpp=~/llama.cpp/build/bin  # + llama.cpp

--load_test measures sample.py's thread policy (nanosample/threads.py) instead of the systems:
our decode tokens/s at batch 1 under the automatic policy, 1 thread and torch's default, each
in its own process (the OpenMP wait policy is set before torch loads), interleaved, on the
shipped model and on GPT-2 124M's shape, first with nothing started beside them, then beside
--competitors busy processes that it starts and kills; ratios auto/1 thread and auto/default.

The last line printed is one JSON object with every number.
"""

import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import bench_peers
from nanosample import cli
from nanosample.cli import peak_rss_mb
from nanosample.settings import SettingsError, parse_for_main, setting

ROOT = Path(__file__).resolve().parent
SAMPLERS = {  # name -> (our SamplingParams fields, transformers' generate kwargs)
    "top_k": (dict(temperature=0.8, top_k=200), dict(temperature=0.8, top_k=200)),
    "top_p": (dict(temperature=1.0, top_p=0.9), dict(temperature=1.0, top_k=0, top_p=0.9)),
}
SYSTEMS = ("ours", "hf", "nocache", "compiled", "fp16", "bf16", "int8")
SYSTEM_NAMES = {"ours": "ours (KV cache)", "hf": "transformers", "nocache": "no cache (floor)",
                "compiled": "ours, compiled", "fp16": "ours, fp16 weights",
                "bf16": "ours, bf16 weights", "int8": "ours, int8 weights"}
REDUCED = ("fp16", "bf16", "int8")  # ours with --quantize=<mode>: its own copy of the model
FIDELITY_STEPS = 256  # greedy steps over which a reduced-precision model is compared with fp32
FIDELITY_GOALS = {"fp16": 0.99, "bf16": 0.99, "int8": 0.97}  # greedy agreement, shipped model
PEAKED_LN_F_SCALE = 4.0  # random GPT-2's logits times this: peaked rows, like a trained model's
# The default run: (batch size, new tokens) pairs, each with both samplers.
DEFAULT_PLAN = ((1, 128), (8, 128), (1, 512), (64, 128))
FULL_PLAN = tuple((b, n) for b in (1, 8, 64) for n in (128, 512))
QUICK_PLAN = ((1, 128),)
EARLY_STEPS = 128  # a long run's decode rate is compared with its first this many steps
# Our system for each precision that bench_peers.PAIRS sets against a llama.cpp type; a
# precision without one here (or not run) gets a null ratio.
PRECISION_SYSTEMS = {"fp32": "ours", "fp16": "fp16", "bf16": "bf16", "int8": "int8"}
RANDOM_NAME = "gpt2-124M-random"  # the random checkpoint's folder in the cache
# 16 GPT-2 tokens, encoded by each system's own tokenizer
COLD_PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs far away"


HELP = ("Speed benchmark: our generate vs transformers' generate (same weights, same settings) "
        "vs a no-cache loop. The default run (batch 1 x 128 and 512 tokens, batch 8 and 64 x 128 "
        "tokens, top_k and top_p, 3 repeats, 3 cold starts) takes ~10-15 minutes on 2 cores; "
        "--quick ~1 minute; --full (the whole matrix) an hour or more. The last line is "
        "one JSON object.")


@dataclass(frozen=True)
class BenchSettings:
    """bench.py's settings. Default run: (batch, new tokens) in (1,128), (8,128), (1,512),
    (64,128), both samplers, all systems, ~10-15 minutes on 2 cores."""
    init_from: str | None = setting(None,
        "checkpoint to benchmark (anything --init_from of sample.py accepts); None = GPT-2 124M's "
        "shape with random weights, written by transformers into --cache_dir and reused")
    cache_dir: str | None = setting(None, "where the random checkpoint is kept; None = "
                                          "<temp dir>/nanosample-bench")
    quick: bool = setting(False, "a ~1-minute run: batch 1, 128 tokens, both samplers, one "
                                 "repeat, no no-cache floor, one cold start each")
    full: bool = setting(False, "the whole matrix: batch 1, 8, 64 x 128 and 512 tokens "
                                "(long: an hour or more on 2 cores; add --nocache_max_tokens=1024 "
                                "for the no-cache floor at batch 8 and at 512 tokens)")
    batch_sizes: tuple[int, ...] | None = setting(None,
        "batch sizes to run (with --new_tokens: their grid); None = the plan above")
    new_tokens: tuple[int, ...] | None = setting(None,
        "new tokens per sample (with --batch_sizes: their grid); None = the plan above")
    samplers: tuple[str, ...] = setting(("top_k", "top_p"),
        "top_k (temperature 0.8, top-k 200) and/or top_p (temperature 1, top-p 0.9)")
    systems: tuple[str, ...] = setting(SYSTEMS[:3],
        "which of ours, hf (transformers), nocache, compiled, fp16, bf16, int8 to run "
        "(compiled: ours under torch.compile, its compile time and tokens/s beside eager's; "
        "fp16/bf16/int8: ours with --quantize=<mode>, with their fidelity to fp32 measured "
        "on the shipped model and on the benchmarked model; none of these four run by default)")
    repeats: int = setting(3, "timed runs per system and setting (medians are reported)")
    seconds_per_setting: float = setting(120.0,
        "start no repeat of a setting that would end after this many seconds of it (the "
        "first always runs): batch 64 gets one repeat on 2 cores")
    nocache_max_tokens: int = setting(128,
        "run the no-cache floor (once per setting) only where batch x new tokens <= this: its "
        "cost grows with the square of the length (batch 1 x 512 tokens: ~5 min on 2 cores)")
    prompt_tokens: int = setting(16, "prompt length in tokens")
    cold_starts: int = setting(3, "fresh processes per system for cold start and peak memory "
                                  "(batch 1, 128 tokens, top_k); 0 = skip")
    threads: int | None = setting(None, "torch threads for every system; None = torch's default "
                                        "(not the automatic policy of sample.py: every system "
                                        "gets the same count; --load_test measures the policy)")
    load_test: bool = setting(False,
        "instead of the systems: our decode tokens/s (batch 1, top_k) under three thread "
        "policies, sample.py's automatic one, 1 thread and torch's default, each in its own "
        "process, interleaved, on the shipped model and GPT-2 124M's shape (or --init_from), "
        "first with nothing started beside them, then beside --competitors busy processes")
    competitors: int = setting(2, "busy processes (Python spin loops, one core each) that "
                                  "--load_test starts beside us, and kills at the end")
    seed: int = setting(1337, "random seed of the samplers")
    peers: bool = setting(False,
        "run llama.cpp beside ours on the same weights (its runs interleaved with ours; "
        "needs a llama.cpp build: see --llamacpp; without one, exit code 2 and how to get it)")
    llamacpp: str | None = setting(None, "with --peers: " + bench_peers.LLAMACPP_HELP)
    llamacpp_convert: str | None = setting(None, "with --peers: " + bench_peers.CONVERT_HELP)
    gguf_dir: str | None = setting(None, "with --peers: " + bench_peers.GGUF_DIR_HELP)
    peer_types: tuple[str, ...] = setting(bench_peers.LLAMA_TYPES,
                                          "with --peers: " + bench_peers.TYPES_HELP)

    def __post_init__(self):
        for name in ("samplers", "systems", "peer_types"):  # --systems=ours,hf works as well
            object.__setattr__(self, name, bench_peers.split_words(getattr(self, name)))
        bench_peers.check_types("peer_types", self.peer_types)
        for name in ("samplers", "systems"):
            if not getattr(self, name):  # --systems= names none
                raise ValueError(f"{name}=: must name at least one of "
                                 f"{', '.join(SAMPLERS if name == 'samplers' else SYSTEMS)}")
        for name in self.samplers:
            if name not in SAMPLERS:
                raise ValueError(f"samplers={name}: must be top_k or top_p")
        for name in self.systems:
            if name not in SYSTEMS:
                raise ValueError(f"systems={name}: must be one of {', '.join(SYSTEMS)}")
        for name in ("batch_sizes", "new_tokens"):
            values = getattr(self, name)
            if values is not None and (not values or min(values) < 1):
                raise ValueError(f"{name}={values}: must be integers >= 1")
        if self.repeats < 1:
            raise ValueError(f"repeats={self.repeats}: must be >= 1")
        if not 1 <= self.prompt_tokens <= 512:
            raise ValueError(f"prompt_tokens={self.prompt_tokens}: must be 1 to 512")
        if self.cold_starts < 0:
            raise ValueError(f"cold_starts={self.cold_starts}: must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads}: must be >= 1, or None")
        if self.competitors < 1:
            raise ValueError(f"competitors={self.competitors}: must be an integer >= 1")
        if self.load_test and self.threads is not None:
            raise ValueError(f"threads={self.threads}: --load_test compares its own thread "
                             f"counts (automatic, 1, torch's default); leave --threads out")
        if self.quick and self.full:
            raise ValueError("quick=True: cannot be combined with --full")

    def plan(self):
        """[(batch size, new tokens)] to run."""
        if self.batch_sizes or self.new_tokens:
            return [(b, n) for b in (self.batch_sizes or (1,)) for n in (self.new_tokens or (128,))]
        return list(QUICK_PLAN if self.quick else FULL_PLAN if self.full else DEFAULT_PLAN)


def effective(s):
    """--quick's reductions applied."""
    if s.quick:
        return replace(s, repeats=1, cold_starts=min(s.cold_starts, 1),
                       systems=tuple(x for x in s.systems if x != "nocache"))
    return s


# ---------------------------------------------------------------------------------------------
# The checkpoint

def cache_root(cache_dir):
    """--cache_dir, or its default: <temp dir>/nanosample-bench."""
    return Path(cache_dir or Path(tempfile.gettempdir()) / "nanosample-bench")


def random_gpt2_dir(cache_dir):
    """A random GPT-2 124M written by transformers' save_pretrained, made once and reused."""
    directory = cache_root(cache_dir) / RANDOM_NAME
    if not (directory / "model.safetensors").is_file():
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
        print(f"writing a random GPT-2 124M to {directory} (once) ...", flush=True)
        torch.manual_seed(0)
        tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
        GPT2LMHeadModel(GPT2Config()).save_pretrained(tmp)
        os.replace(tmp, directory)  # whole or not at all, should two runs race
    return directory


def is_hf_dir(path):
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        values = json.loads(cli.read_user_text(str(config), str(config), what="a config.json"))
    except (SettingsError, ValueError, RecursionError):
        return False  # not one transformers could read either
    return isinstance(values, dict) and values.get("model_type") == "gpt2"


def check_cache_dir(cache_dir):
    """--cache_dir: where the random checkpoint is written; checked before any work."""
    directory = cache_root(cache_dir)
    if not (directory / RANDOM_NAME / "model.safetensors").is_file():
        cli.check_writable_dir(str(directory), f"--cache_dir={cache_dir}" if cache_dir
                               else f"the cache directory {directory} (set --cache_dir)")


# ---------------------------------------------------------------------------------------------
# One timed run of each system

@dataclass
class Run:
    prefill_s: float    # from the call to the first token of every sample
    decode_s: float     # the remaining new_tokens - 1 steps
    sampler_s: float = math.nan  # time inside sampling.sample_step (ours only)
    sampler_calls: int = 0
    step_times: tuple = ()  # when each step's first token arrived (ours only)


class _TimedSampler:
    """sampling.sample_step, adding up the time spent choosing tokens; generate() takes it as
    its `sampler`."""

    def __init__(self, sample_step):
        self.sample_step = sample_step
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        result = self.sample_step(*args, **kwargs)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return result


def run_ours(model, tokenizer, prompt, sampler, batch, new_tokens, seed):
    from nanosample.generate import generate
    from nanosample.sampling import SamplingParams, sample_step

    params = SamplingParams(**SAMPLERS[sampler][0])
    timed = _TimedSampler(sample_step)
    t0 = time.perf_counter()
    count, step_times = 0, []
    for piece in generate(model, tokenizer, prompt, params, num_samples=batch,
                          max_new_tokens=new_tokens, seed=seed, stop_at_eot=False, sampler=timed):
        if count % batch == 0:  # every row yields one piece per step, in row order
            step_times.append(time.perf_counter())
        count += piece.token is not None
    end = time.perf_counter()
    assert count == batch * new_tokens, (count, batch, new_tokens)
    first = step_times[0]
    return Run(first - t0, end - first, timed.seconds, timed.calls, tuple(step_times))


class _StepTimes:
    """A transformers streamer that only notes when each step's tokens arrive."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def run_hf(hf_model, prompt, sampler, batch, new_tokens, seed):
    import torch

    torch.manual_seed(seed)
    ids = torch.tensor([prompt])
    streamer = _StepTimes()
    t0 = time.perf_counter()
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                            num_return_sequences=batch, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, pad_token_id=50256, use_cache=True,
                            streamer=streamer, **SAMPLERS[sampler][1])
    end = time.perf_counter()
    assert out.shape == (batch, len(prompt) + new_tokens), out.shape
    # put() is called once with the prompt, then once per generated token
    assert len(streamer.times) == new_tokens + 1, len(streamer.times)
    return Run(streamer.times[1] - t0, end - streamer.times[1])


def run_nocache(model, tokenizer, prompt, sampler, batch, new_tokens, seed):
    """nanoGPT's generate: no KV cache, the whole (cropped) sequence through the model every
    step, the last position's logits sampled (with our sampler, so only the cache differs)."""
    import torch
    from nanosample.generate import sample_generator
    from nanosample.sampling import BatchParams, SamplingParams, sample_step

    params = BatchParams([SamplingParams(**SAMPLERS[sampler][0])] * batch, model.config.vocab_size)
    generators = [sample_generator(seed, i) for i in range(batch)]
    block_size = model.config.block_size
    idx = torch.tensor([prompt] * batch)                                  # (B, T)
    t0 = time.perf_counter()
    first = None
    with torch.no_grad():
        for _ in range(new_tokens):
            context = idx if idx.shape[1] <= block_size else idx[:, -block_size:]
            logits = model(context, last_only=True)[:, -1]                # (B, V)
            tokens = sample_step(logits, params, generators, tokenizer.n_vocab).tokens
            idx = torch.cat([idx, tokens[:, None]], dim=1)
            if first is None:
                first = time.perf_counter()
    return Run(first - t0, time.perf_counter() - first)


# ---------------------------------------------------------------------------------------------
# Fidelity of the reduced-precision products (--quantize): how far from float32 they draw

def greedy_fidelity(reference, reduced, prompt, steps=FIDELITY_STEPS):
    """The two models side by side along the float32 model's greedy path from `prompt`.

    At each of `steps` positions both models see the same tokens (the reference's greedy
    choices). Returns: `agreement`, the share of positions where the reduced model's most
    probable token is the reference's; `kl`, the mean KL(reference || reduced) of the
    next-token distributions (temperature 1, nats); `identical_tokens`, how many tokens the
    two models' own greedy texts share before they first differ (the first disagreement);
    `top1_prob`, the reference's mean top probability (how peaked its rows are).
    """
    import torch
    from nanosample.model import KVCache

    assert len(prompt) + steps - 1 <= reference.config.block_size
    caches = [KVCache(m.config, 1, max_len=len(prompt) + steps - 1) for m in (reference, reduced)]
    ids = torch.tensor([prompt])                                             # (1, T)
    agree, kl, top1, first_disagreement = 0, 0.0, 0.0, None
    with torch.no_grad():
        logits = [m(ids, cache=c, last_only=True)[0, -1] for m, c in zip((reference, reduced), caches)]
        for step in range(steps):
            ref_logp, red_logp = (torch.log_softmax(x.double(), dim=-1) for x in logits)  # (V,)
            token = int(ref_logp.argmax())
            if int(red_logp.argmax()) == token:
                agree += 1
            elif first_disagreement is None:
                first_disagreement = step
            kl += float((ref_logp.exp() * (ref_logp - red_logp)).sum())
            top1 += float(ref_logp.max().exp())
            if step < steps - 1:
                fed = torch.tensor([[token]])                                # (1, 1)
                logits = [m(fed, cache=c, last_only=True)[0, -1]
                          for m, c in zip((reference, reduced), caches)]
    return {"agreement": agree / steps, "kl": kl / steps, "top1_prob": top1 / steps,
            "identical_tokens": steps if first_disagreement is None else first_disagreement}


def fidelity_report(modes, directory, peaked, steps=FIDELITY_STEPS):
    """greedy_fidelity of each mode against float32, averaged over a few prompts, on the
    shipped model and on the benchmarked one (`peaked`: its final LayerNorm scaled by
    PEAKED_LN_F_SCALE, for random weights, whose own rows are near-flat)."""
    import torch
    from nanosample.loader import load_model

    def load(path, mode):
        loaded = load_model(str(path), quantize=mode)
        if peaked and path == directory:
            ln_f = loaded.model.transformer.ln_f
            ln_f.weight = torch.nn.Parameter(ln_f.weight * PEAKED_LN_F_SCALE)  # a copy: the
            # loaded weight may be a view of the file
        return loaded

    report = {}
    for name, path in (("shipped", ROOT / "checkpoints" / "shakespeare_char"),
                       ("benchmarked", directory)):
        loaded = load(path, "none")
        reference, tokenizer = loaded.model, loaded.tokenizer
        n = tokenizer.n_vocab
        # several prompts, each short enough that prompt + FIDELITY_STEPS fits the context
        length = 1 if reference.config.block_size < steps + 15 else 16
        prompts = [[(7 * i + 464 + 1000 * p) % n for i in range(length)] for p in range(4)]
        if length == 1:  # a character model: a newline and three capitals start a line
            prompts = [tokenizer.encode(c) for c in ("\n", "R", "T", "W")]
        report[name] = {}
        for mode in modes:
            reduced = load(path, mode).model
            runs = [greedy_fidelity(reference, reduced, p, steps) for p in prompts]
            report[name][mode] = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
            report[name][mode]["prompts"] = len(prompts)
    return report


def print_fidelity(fidelity, peaked, steps=FIDELITY_STEPS):
    print(f"\nreduced precision against float32, greedy, {steps} tokens, mean of 4 prompts")
    for name, modes in fidelity.items():
        what = (f"GPT-2 124M shape, random weights, final LayerNorm x{PEAKED_LN_F_SCALE:g} (peaked)"
                if name == "benchmarked" and peaked else name)
        print(f"  {name} model ({what})")
        for mode, f in modes.items():
            print(f"    {mode}: same top token {100 * f['agreement']:.1f}%, mean KL "
                  f"{f['kl']:.2e} nats, identical greedy text for {f['identical_tokens']:.0f} "
                  f"tokens (fp32's mean top probability {f['top1_prob']:.2f})")


# ---------------------------------------------------------------------------------------------
# Cold start and peak memory: one fresh process per measurement

def cold_child(which, directory, threads, new_tokens):
    """Runs in a fresh interpreter: import, tokenizer, load, generate; prints one JSON line."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    if which == "ours":
        from nanosample.generate import generate
        from nanosample.loader import load_model
        from nanosample.sampling import SamplingParams
        loaded = load_model(directory)
        prompt = loaded.tokenizer.encode(COLD_PROMPT)
        params = SamplingParams(**SAMPLERS["top_k"][0])
        pieces = generate(loaded.model, loaded.tokenizer, prompt, params,
                          max_new_tokens=new_tokens, stop_at_eot=False)
        next(pieces)
        first = time.monotonic()
        for _ in pieces:
            pass
    else:
        from transformers import GPT2LMHeadModel, GPT2TokenizerFast
        bpe = ROOT / "nanosample" / "assets" / "gpt2-bpe"
        tokenizer = GPT2TokenizerFast(vocab=str(bpe / "encoder.json"),  # the same BPE files
                                      merges=str(bpe / "vocab.bpe"))
        model = GPT2LMHeadModel.from_pretrained(directory).eval()
        ids = torch.tensor([tokenizer.encode(COLD_PROMPT)])
        prompt = ids[0].tolist()
        streamer = _StepTimes()
        torch.manual_seed(0)
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=50256,
                       use_cache=True, streamer=streamer, **SAMPLERS["top_k"][1])
        first = streamer.times[1] - time.perf_counter() + time.monotonic()
    print(json.dumps({"first_token_monotonic": first, "peak_rss_mb": peak_rss_mb(),
                      "prompt_tokens": len(prompt)}))


def cold_start(which, directory, threads, new_tokens=128):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, str(Path(__file__).resolve()), "--child", which, str(directory),
            str(threads or 0), str(new_tokens)]
    launched = time.monotonic()
    out = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"cold start of {which} failed:\n{out.stderr[-2000:]}")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return {"first_token_s": report["first_token_monotonic"] - launched,
            "peak_rss_mb": report["peak_rss_mb"], "prompt_tokens": report["prompt_tokens"]}


# ---------------------------------------------------------------------------------------------
# The machine

def read_bandwidth_gbs(threads):
    """GB/s of a sum over 512 MiB of float32 (larger than any cache), median of 5."""
    import torch
    data = torch.ones(128 * 2**20)
    data.sum()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - t)
    return data.numel() * data.element_size() / statistics.median(times) / 1e9


def weight_bytes_per_step(model):
    """Bytes of parameters a decode step reads: all of them once (the tied wte/lm_head once),
    except the position table, of which one row is read."""
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    wpe = model.transformer.wpe.weight
    return total - wpe.numel() * wpe.element_size()


def machine_line(threads):
    import torch
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import transformers
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({threads} threads), "
            f"transformers {transformers.__version__}, Python {sys.version.split()[0]}")


# ---------------------------------------------------------------------------------------------
# The run

def median(xs):
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def summarize(runs, batch, new_tokens):
    """Medians of a list of Run: tokens/s overall and in decode, ms per decode step."""
    total = [r.prefill_s + r.decode_s for r in runs]
    steps = max(new_tokens - 1, 1)
    out = {
        "repeats": len(runs),
        "prefill_ms": 1e3 * median([r.prefill_s for r in runs]),
        "decode_ms_per_step": 1e3 * median([r.decode_s / steps for r in runs]),
        "tokens_per_s": median([batch * new_tokens / t for t in total]),
        "decode_tokens_per_s": median([batch * steps / r.decode_s for r in runs]),
    }
    if runs and runs[0].sampler_calls:
        out["sampler_ms_per_step"] = 1e3 * median([r.sampler_s / r.sampler_calls for r in runs])
        out["sampler_share"] = out["sampler_ms_per_step"] / out["decode_ms_per_step"]
    if runs and len(runs[0].step_times) > EARLY_STEPS:
        # The decode rate over the whole run against its first EARLY_STEPS steps: whether the
        # cost per token stays flat, measured within one run, so a machine that slows down
        # between two runs cannot fake or hide it.
        def flatness(r):
            t = r.step_times
            whole = (len(t) - 1) / (t[-1] - t[0])
            early = (EARLY_STEPS - 1) / (t[EARLY_STEPS - 1] - t[0])
            return whole / early
        out["late_vs_early_rate"] = median([flatness(r) for r in runs])
    return out


def main(argv=None):
    """Exit code: 0, 1 (failed midway), 2 (bad input) or 130 (interrupted), as cli.py says."""
    return cli.run_script(_main, argv)


def _main(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:  # bench.py's own cold-start processes, not for users
        return _child_main(argv[1:])
    if argv[:1] == ["--load_worker"]:  # --load_test's decoding processes, not for users
        return load_worker(*argv[1:])
    parsed, code = parse_for_main(BenchSettings, argv, prog="bench.py", description=HELP)
    if parsed is None:
        return code
    s = effective(parsed)
    if s.load_test:
        return load_test(s)
    try:
        if s.init_from is None:
            check_cache_dir(s.cache_dir)
        peer_plan = _peer_plan(s)
    except SettingsError as e:
        return cli.report_error(e)

    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    from nanosample.loader import CheckpointError, load_model
    if s.threads:
        torch.set_num_threads(s.threads)
    t_start = time.perf_counter()
    try:
        directory = Path(s.init_from) if s.init_from else random_gpt2_dir(s.cache_dir)
        loaded = load_model(str(directory))
    except CheckpointError as e:
        message = str(e)
        return cli.report_error("--" + message if message.startswith("init_from=") else message)
    except OSError as e:  # writing the random checkpoint: a full disk
        return cli.report_error(f"--cache_dir: cannot write the random checkpoint "
                                f"({e.strerror})", cli.EXIT_FAILED)

    peers = None
    if peer_plan is not None:  # llama.cpp, with the same threads as ours
        llama, paths, to_convert = peer_plan
        try:
            ggufs = bench_peers.prepare_ggufs(llama, directory, paths, to_convert)
        except bench_peers.PeerError as e:
            return cli.report_error(f"--peers: {e}", cli.EXIT_FAILED)
        peers = bench_peers.Peers(llama, ggufs, torch.get_num_threads(), s.prompt_tokens)

    bench = _Systems(s, loaded, directory, peers)
    report = {"bench": "generate", **_machine_report(bench, torch.get_num_threads())}
    bench.warm_up()
    results = [bench.time_setting(batch, new_tokens, sampler)
               for batch, new_tokens in s.plan() for sampler in s.samplers]
    fidelity = {}
    if bench.reduced:
        fidelity = fidelity_report(list(bench.reduced), directory, peaked=s.init_from is None)
        print_fidelity(fidelity, peaked=s.init_from is None)
    cold = _cold_starts(s, bench.systems, directory)
    report["load_average_start_end"] = [report.pop("load_at_start"), os.getloadavg()]
    report.update(prompt_tokens=s.prompt_tokens, settings=asdict(s), results=results, cold=cold,
                  compile_s=bench.compile_s, fidelity=fidelity)
    report["targets"] = check_targets(results, cold, fidelity)
    report["peers"] = None
    if peers is not None:
        sampler = s.samplers[0]  # llama.cpp does not sample; ours with the first sampler
        report["peers"] = {**peers.section(ours_for_peers(results, sampler, s.prompt_tokens)),
                           "ours_sampler": sampler}
        report["targets"] += bench_peers.peer_targets(report["peers"])
    report["seconds"] = time.perf_counter() - t_start
    print_summary(report)
    print(json.dumps(report, default=_json_default))
    return 0


def _peer_plan(s):
    """With --peers: (the llama.cpp build, {type: GGUF path}, [types to convert]), found before
    any work; SettingsError (exit code 2) when there is no build, or a GGUF can be neither
    found nor made. None without --peers."""
    if not s.peers:
        return None
    llama = bench_peers.find_llamacpp(s.llamacpp, s.llamacpp_convert)
    checkpoint = Path(s.init_from) if s.init_from else cache_root(s.cache_dir) / RANDOM_NAME
    gguf_dir = Path(s.gguf_dir) if s.gguf_dir else cache_root(s.cache_dir) / "gguf"
    convertible = s.init_from is None or is_hf_dir(checkpoint)
    paths, to_convert = bench_peers.gguf_plan(checkpoint, gguf_dir, s.peer_types, llama,
                                              convertible)
    if to_convert:
        cli.check_writable_dir(str(gguf_dir), f"--gguf_dir={s.gguf_dir}" if s.gguf_dir
                               else f"the GGUF folder {gguf_dir} (set --gguf_dir)")
    return llama, paths, to_convert


def ours_for_peers(results, sampler, prompt_tokens):
    """{(precision, batch, new tokens): our decode and prompt tokens/s}, as
    bench_peers.peer_ratios takes them, from the rows of one sampler. Our prompt's rate is
    the prefill's (the prompt through the model, and the first token chosen)."""
    ours = {}
    for r in results:
        if r["sampler"] != sampler:
            continue
        for precision, system in PRECISION_SYSTEMS.items():
            m = r["systems"].get(system)
            if m is not None:
                ours[(precision, r["batch"], r["new_tokens"])] = {
                    "decode_tokens_per_s": m["decode_tokens_per_s"],
                    "prompt_tokens_per_s": prompt_tokens / (m["prefill_ms"] / 1e3)}
    return ours


def _child_main(args):
    """bench.py --child WHICH DIR THREADS NEW_TOKENS: one cold start, measured in this process."""
    try:
        which, directory, threads, new_tokens = args
        if which not in ("ours", "hf"):
            raise ValueError
        threads, new_tokens = int(threads), int(new_tokens)
    except ValueError:
        return cli.report_error("--child: bench.py's cold-start process, started by "
                                "bench.py itself with WHICH (ours|hf) DIR THREADS NEW_TOKENS")
    cold_child(which, directory, threads, new_tokens)
    return 0


def _machine_report(bench, threads):
    """Print what the run is measured on (machine, load, model, read bandwidth); return it."""
    model = bench.model
    machine = machine_line(threads)
    print(f"machine: {machine}")
    load_at_start = os.getloadavg()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in load_at_start)}")
    print(f"model: {bench.loaded.source}, {model.num_params() / 1e6:.1f}M parameters")
    bandwidth = read_bandwidth_gbs(threads)
    step_bytes = weight_bytes_per_step(model)
    bound = bandwidth * 1e9 / step_bytes
    print(f"read bandwidth: {bandwidth:.1f} GB/s (sum over 512 MiB); a decode step reads "
          f"{step_bytes / 1e6:.1f} MB of weights, so batch 1 can do at most {bound:.0f} tokens/s")
    return {"machine": machine, "load_at_start": load_at_start, "threads": threads,
            "model": bench.loaded.source,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "bandwidth_gbs": bandwidth, "weight_mb_per_step": step_bytes / 1e6,
            "batch1_bound_tokens_per_s": bound}


class _Systems:
    """The systems under test on one loaded model: ours, transformers (hf), the no-cache floor
    and ours compiled, and llama.cpp (bench_peers.Peers) with --peers; warmed up once, then
    timed setting by setting, interleaved."""

    def __init__(self, s, loaded, directory, peers=None):
        import torch
        import transformers
        from nanosample.loader import load_model
        from nanosample.quantize import check_available

        self.s, self.loaded, self.model, self.tokenizer = s, loaded, loaded.model, loaded.tokenizer
        self.peers = peers
        self.systems, self.hf_model = list(s.systems), None
        if "hf" in self.systems:
            if is_hf_dir(directory):
                self.hf_model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
            else:
                print(f"note: {directory} is not a Hugging Face GPT-2 folder; transformers skipped")
                self.systems.remove("hf")
        self.compiled = torch.compile(self.model) if "compiled" in self.systems else None
        self.reduced = {}  # mode -> ours with --quantize=mode, loaded from the same files
        for mode in REDUCED:
            if mode in self.systems:
                why_not = check_available(mode)
                if why_not:
                    print(f"note: {mode} weights skipped: {why_not}")
                    self.systems.remove(mode)
                else:
                    self.reduced[mode] = load_model(str(directory), quantize=mode).model
        self.compile_s = {}
        self.prompt = [(7 * i + 464) % self.tokenizer.n_vocab for i in range(s.prompt_tokens)]
        if s.prompt_tokens + max(n for _, n in s.plan()) > self.model.config.block_size:
            print("note: prompt + new tokens exceed block_size; ours re-prefills past it, "
                  "transformers cannot generate past it")

    def run_once(self, system, batch, sampler, new_tokens):
        import torch

        args = (self.prompt, sampler, batch, new_tokens, self.s.seed)
        with torch.no_grad():
            if system == "ours":
                return run_ours(self.model, self.tokenizer, *args)
            if system == "hf":
                return run_hf(self.hf_model, *args)
            if system == "compiled":
                return run_ours(self.compiled, self.tokenizer, *args)
            if system in self.reduced:
                return run_ours(self.reduced[system], self.tokenizer, *args)
            return run_nocache(self.model, self.tokenizer, *args)

    def runs_here(self, system, batch, new_tokens):
        return system != "nocache" or batch * new_tokens <= self.s.nocache_max_tokens

    def warm_up(self):
        """Every system once per batch size (allocator, thread pools, lazy imports). The
        compiled model's first calls compile it: twice, with caches of two lengths, so that
        every size it sees later is already a dynamic dimension (no recompiles while timed)."""
        plan = self.s.plan()
        for batch in sorted({b for b, _ in plan}):
            for system in self.systems:
                if any(self.runs_here(system, b, n) for b, n in plan if b == batch):
                    t = time.perf_counter()
                    for new_tokens in ((4, 8) if system == "compiled" else (4,)):
                        self.run_once(system, batch, self.s.samplers[0], new_tokens)
                    if system == "compiled":
                        self.compile_s[batch] = time.perf_counter() - t
                        print(f"torch.compile, batch {batch}: the first calls (compiling, 12 "
                              f"tokens) took {self.compile_s[batch]:.1f} s", flush=True)
        if self.peers is not None:
            try:
                self.peers.warm_up([b for b, _ in plan])
            except bench_peers.PeerError as e:
                self._stop_peers(e)

    def _stop_peers(self, error):
        """A llama.cpp run failed: the benchmark goes on without it, and says so."""
        self.peers.error = str(error)
        print(f"note: llama.cpp stopped ({error}); going on without it", flush=True)

    def peers_here(self, batch, sampler):
        """llama.cpp runs with the first sampler's setting only: it does not sample."""
        return (self.peers is not None and self.peers.error is None
                and sampler == self.s.samplers[0] and self.peers.runs_batch(batch))

    def time_setting(self, batch, new_tokens, sampler):
        """Repeats of every system, rotating who goes first; the printed and returned row."""
        here = [x for x in self.systems if self.runs_here(x, batch, new_tokens)]
        runs = {x: [] for x in here}
        if self.peers_here(batch, sampler):
            here.append("llamacpp")  # in the rotation, its figures kept by self.peers
        started = time.perf_counter()
        floor_s = 0.0  # the no-cache floor runs once and does not count against the budget
        for rep in range(self.s.repeats):
            for system in here[rep % len(here):] + here[:rep % len(here)]:
                if system == "llamacpp":
                    if self.peers.error is None:
                        try:
                            self.peers.run(batch, new_tokens)
                        except bench_peers.PeerError as e:
                            self._stop_peers(e)
                    continue
                if system == "nocache" and runs[system]:
                    continue  # the floor: one run is plenty, and it is slow
                t = time.perf_counter()
                runs[system].append(self.run_once(system, batch, sampler, new_tokens))
                if system == "nocache":
                    floor_s = time.perf_counter() - t
            spent = time.perf_counter() - started - floor_s
            if spent * (rep + 2) / (rep + 1) > self.s.seconds_per_setting:
                break  # another repeat would end past this setting's time
        row = {"batch": batch, "sampler": sampler, "new_tokens": new_tokens,
               "systems": {x: summarize(r, batch, new_tokens) for x, r in runs.items()}}
        _add_ratios(row["systems"])
        print_setting(row)
        if "llamacpp" in here:
            bench_peers.print_peer_setting(self.peers, batch, new_tokens)
        return row


def _add_ratios(systems):
    """Each system's tokens/s against transformers', the compiled model's against eager's and
    each reduced-precision model's against float32's (ours)."""
    if "hf" in systems:
        hf = systems["hf"]
        for m in systems.values():
            m["vs_hf"] = m["tokens_per_s"] / hf["tokens_per_s"]
            m["decode_vs_hf"] = m["decode_tokens_per_s"] / hf["decode_tokens_per_s"]
    if "compiled" in systems and "ours" in systems:
        eager, m = systems["ours"], systems["compiled"]
        m["vs_eager"] = m["tokens_per_s"] / eager["tokens_per_s"]
        m["decode_vs_eager"] = m["decode_tokens_per_s"] / eager["decode_tokens_per_s"]
    for mode in REDUCED:
        if mode in systems and "ours" in systems:
            fp32, m = systems["ours"], systems[mode]
            m["vs_fp32"] = m["tokens_per_s"] / fp32["tokens_per_s"]
            m["decode_vs_fp32"] = m["decode_tokens_per_s"] / fp32["decode_tokens_per_s"]


def _cold_starts(s, systems, directory):
    """Time to first token and peak RSS of ours and transformers, each in fresh processes."""
    cold = {x: [] for x in ("ours", "hf") if x in systems} if s.cold_starts else {}
    for _ in range(s.cold_starts):
        for x in cold:
            cold[x].append(cold_start(x, directory, s.threads))
    return {x: {"first_token_s": median([c["first_token_s"] for c in cs]),
                "peak_rss_mb": max(c["peak_rss_mb"] for c in cs),
                "runs": len(cs)} for x, cs in cold.items()}


def _json_default(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)


# ---------------------------------------------------------------------------------------------
# --load_test: the thread policy beside busy processes

LOAD_POLICIES = ("auto", "one", "default")  # threads.ThreadPolicy; 1 thread; torch's default
LOAD_TOKENS = {"shakespeare_char": 2000}    # new tokens per timed run at most; other models: 256
LOAD_RUN_S = 10.0  # and a run stops after this many seconds (a collapsed policy can take minutes)
# Each competitor is one always-runnable thread, like a compile job or another Python program.
# Not a torch loop: that would bring its own thread pool and its own collapse, and its demand
# would change with ours. It spins while bench.py is its parent, so a bench.py killed with
# SIGKILL (no finally) still leaves nothing running: the orphan sees its parent change and ends.
COMPETITOR = "import os, sys\nparent = int(sys.argv[1])\nwhile os.getppid() == parent:\n    pass\n"


def load_test(s):
    """--load_test: each model's decode tokens/s under the three policies, quiet then beside
    s.competitors spin loops; prints a table per model and one JSON line; exit code."""
    try:
        models = [s.init_from] if s.init_from else ["shakespeare_char",
                                                     str(random_gpt2_dir(s.cache_dir))]
    except OSError as e:
        return cli.report_error(f"--cache_dir: cannot write the random checkpoint ({e.strerror})",
                                cli.EXIT_FAILED)
    t_start = time.perf_counter()
    report = {"bench": "load_test", "competitors": s.competitors,
              "machine": machine_line("auto, 1 or default"), "repeats": s.repeats, "models": []}
    load_start = os.getloadavg()
    print(f"machine: {report['machine']}\nload average at start: "
          f"{' '.join(f'{x:.2f}' for x in load_start)}")
    for model in models:
        tokens = s.new_tokens[0] if s.new_tokens else LOAD_TOKENS.get(model, 256)
        workers = {p: _LoadWorker(model, p, tokens, s.seed) for p in LOAD_POLICIES}
        try:
            row = {"model": model, "new_tokens": tokens}
            print(f"\n{model}: no competitors", flush=True)
            row["quiet"] = _load_phase(workers, s.repeats)
            with _competitors(s.competitors):
                print(f"{model}: {s.competitors} competitors", flush=True)
                row["loaded"] = _load_phase(workers, s.repeats)
        finally:
            for w in workers.values():
                w.close()
        row["params"] = workers["auto"].params
        print_load_row(row, s.competitors)
        report["models"].append(row)
    report["load_average_start_end"] = [load_start, os.getloadavg()]
    report["targets"] = load_targets(report["models"])
    report["seconds"] = time.perf_counter() - t_start
    print("\nthe thread-policy targets")
    for t in report["targets"]:
        mark = "met" if t["met"] else "NOT met"
        print(f"  {t['target']:<66} {t['value']:7.3f} (goal >= {t['goal']})  {mark}")
    print(json.dumps(report, default=_json_default))
    return 0


def _load_phase(workers, repeats):
    """Each policy `repeats` times, rotating who goes first; medians and the ratios."""
    names = list(workers)
    runs = {p: [] for p in names}
    for rep in range(repeats):
        for p in names[rep % len(names):] + names[:rep % len(names)]:
            runs[p].append(workers[p].run())
            r = runs[p][-1]
            print(f"  {p:<8} {r['decode_tokens_per_s']:8.1f} tokens/s on "
                  f"{','.join(map(str, r['threads']))} thread(s), {r['procs_running']} tasks "
                  f"runnable at the start", flush=True)
    out = {p: {"decode_tokens_per_s": median([r["decode_tokens_per_s"] for r in rs]),
               "threads": sorted({t for r in rs for t in r["threads"]}),
               "runs": [round(r["decode_tokens_per_s"], 2) for r in rs],
               "procs_running": [r["procs_running"] for r in rs]} for p, rs in runs.items()}
    auto = out["auto"]["decode_tokens_per_s"]
    out["auto_vs_one"] = auto / out["one"]["decode_tokens_per_s"]
    out["auto_vs_default"] = auto / out["default"]["decode_tokens_per_s"]
    return out


@contextlib.contextmanager
def _competitors(n):
    """n busy processes for the length of the block; killed however the block ends."""
    procs = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", COMPETITOR, str(os.getpid())],
                                          stdin=subprocess.DEVNULL))
        time.sleep(0.5)  # running before the first timed run starts
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


class _LoadWorker:
    """One policy's decoding process (bench.py --load_worker), kept for the whole test: it
    loads the model once, then answers each `run` line with one JSON line."""

    def __init__(self, model, policy, new_tokens, seed):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
            env.pop(name, None)  # each policy sets its own; today's default is torch's own
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--load_worker", model, policy,
             str(new_tokens), str(seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.params = self._read()["params"]  # the model is loaded

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a --load_test worker ended (exit code {self.proc.wait()})")
        return json.loads(line)

    def run(self):
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # the worker's signal to end
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def load_worker(model, policy, new_tokens, seed):
    """bench.py --load_worker MODEL POLICY NEW_TOKENS SEED: one policy's process. Prints
    {"params"} once loaded, then one line per `run` on stdin; ends when stdin closes."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is bench.py's to handle: it ends us
    from nanosample import threads
    if policy == "auto":
        threads.set_wait_policy()  # as sample.py does: before torch is imported
        thread_policy = threads.ThreadPolicy(None)
    import torch
    from nanosample.generate import generate
    from nanosample.loader import load_model
    from nanosample.sampling import SamplingParams

    loaded = load_model(model)
    if policy == "auto":
        thread_policy.apply(loaded.model.num_params(), 1)
    elif policy == "one":
        torch.set_num_threads(1)
    prompt = [(7 * i + 1) % loaded.tokenizer.n_vocab for i in range(16)]
    params = SamplingParams(**SAMPLERS["top_k"][0])
    new_tokens, seed = int(new_tokens), int(seed)
    parent = os.getppid()

    def decode(n, seconds=LOAD_RUN_S):
        """Decode tokens/s after the first token, over n new tokens or `seconds`, whichever
        ends first, and the thread counts used."""
        used, first, count = set(), None, 0
        with torch.no_grad():
            for piece in generate(loaded.model, loaded.tokenizer, prompt, params,
                                  max_new_tokens=n, seed=seed, stop_at_eot=False):
                if policy == "auto":
                    thread_policy.check()  # as sample.py's loop does
                used.add(torch.get_num_threads())
                if first is None:
                    first = time.perf_counter()
                count += 1
                if os.getppid() != parent:
                    sys.exit(1)  # bench.py was killed: stop now, not at the end of the run
                if time.perf_counter() - first > seconds:
                    break
        return (count - 1) / (time.perf_counter() - first), sorted(used)

    decode(8)  # warm-up: the allocator, the thread pool
    print(json.dumps({"params": loaded.model.num_params()}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        procs = _procs_running()
        rate, used = decode(new_tokens)
        print(json.dumps({"decode_tokens_per_s": rate, "threads": used,
                          "procs_running": procs}), flush=True)
    return 0


def _procs_running():
    """Runnable tasks on the machine now (/proc/loadavg), for the report; None if unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(open("/proc/loadavg").read().split()[3].split("/")[0])
    return None


def load_targets(rows):
    targets = []
    for row in rows:
        name = Path(row["model"]).name
        targets.append({"target": f"{name}: auto vs 1 thread beside the competitors",
                        "value": row["loaded"]["auto_vs_one"], "goal": 1.0})
        targets.append({"target": f"{name}: auto vs torch's default, no competitors",
                        "value": row["quiet"]["auto_vs_default"], "goal": 0.97})
    for t in targets:
        t["met"] = t["value"] >= t["goal"]
    return targets


def print_load_row(row, competitors):
    print(f"\n{row['model']} ({row['params'] / 1e6:.1f}M parameters), batch 1, top_k, "
          f"{row['new_tokens']} new tokens: decode tokens/s, median")
    print(f"  {'policy':<16} {'no competitors':>15} {'threads':>8} "
          f"{f'{competitors} competitors':>15} {'threads':>8}")
    names = {"auto": "auto (policy)", "one": "1 thread", "default": "torch's default"}
    for p in LOAD_POLICIES:
        q, b = row["quiet"][p], row["loaded"][p]
        print(f"  {names[p]:<16} {q['decode_tokens_per_s']:>15.1f} "
              f"{','.join(map(str, q['threads'])):>8} {b['decode_tokens_per_s']:>15.1f} "
              f"{','.join(map(str, b['threads'])):>8}")
    print(f"  auto vs 1 thread: {row['quiet']['auto_vs_one']:.2f}x quiet, "
          f"{row['loaded']['auto_vs_one']:.2f}x loaded; auto vs torch's default: "
          f"{row['quiet']['auto_vs_default']:.2f}x quiet, "
          f"{row['loaded']['auto_vs_default']:.2f}x loaded", flush=True)


# ---------------------------------------------------------------------------------------------
# Printing, and the speed targets

def print_setting(row):
    print(f"\nbatch {row['batch']}, {row['sampler']} ({describe(row['sampler'])}), "
          f"{row['new_tokens']} new tokens")
    header = (f"  {'system':<18} {'tokens/s':>9} {'vs hf':>6} {'decode tok/s':>13} {'vs hf':>6} "
              f"{'ms/step':>8} {'prefill ms':>11} {'sampler':>8} {'runs':>5}")
    print(header)
    for x, m in row["systems"].items():
        share = f"{100 * m['sampler_share']:.1f}%" if "sampler_share" in m else ""
        print(f"  {SYSTEM_NAMES[x]:<18} {m['tokens_per_s']:>9.1f} {_ratio(m, 'vs_hf'):>6} "
              f"{m['decode_tokens_per_s']:>13.1f} {_ratio(m, 'decode_vs_hf'):>6} "
              f"{m['decode_ms_per_step']:>8.2f} {m['prefill_ms']:>11.1f} {share:>8} "
              f"{m['repeats']:>5}", flush=True)
    compiled = row["systems"].get("compiled", {})
    if "vs_eager" in compiled:
        print(f"  compiled vs eager: {compiled['vs_eager']:.2f}x tokens/s, "
              f"{compiled['decode_vs_eager']:.2f}x decode tokens/s")
    for mode in REDUCED:
        m = row["systems"].get(mode, {})
        if "vs_fp32" in m:
            print(f"  {mode} weights vs float32: {m['vs_fp32']:.2f}x tokens/s, "
                  f"{m['decode_vs_fp32']:.2f}x decode tokens/s")
    ours = row["systems"].get("ours", {})
    if "late_vs_early_rate" in ours:
        print(f"  ours: decode tokens/s over all {row['new_tokens']} tokens = "
              f"{ours['late_vs_early_rate']:.3f}x that over the first {EARLY_STEPS}")


def describe(sampler):
    ours = SAMPLERS[sampler][0]
    return ", ".join(f"{k} {v}" for k, v in ours.items())


def _ratio(m, key):
    return f"{m[key]:.2f}x" if key in m else "-"


def check_targets(results, cold, fidelity=None):
    """The speed targets, each {"target", "value", "met"} (value None where not measured)."""
    targets = []

    def add(name, value, goal, better="higher"):
        met = None if value is None else (value >= goal if better == "higher" else value <= goal)
        targets.append({"target": name, "value": value, "goal": goal, "better": better,
                        "met": met})

    for batch in (1, 8):
        for sampler, goal in (("top_k", 2.0), ("top_p", 2.5)):
            rows = [r for r in results if r["batch"] == batch and r["sampler"] == sampler
                    and "hf" in r["systems"]]
            for r in rows:
                add(f"tokens/s vs transformers, batch {batch}, {sampler}, {r['new_tokens']} tokens",
                    r["systems"]["ours"].get("vs_hf"), goal)
    for r in results:
        ours = r["systems"].get("ours", {})
        if "sampler_share" in ours:
            add(f"sampler share of a decode step, batch {r['batch']}, {r['sampler']}, "
                f"{r['new_tokens']} tokens", ours["sampler_share"], 0.05, "lower")
    for r in results:
        ours = r["systems"].get("ours", {})
        if "late_vs_early_rate" in ours:
            add(f"{r['new_tokens']}-token decode tokens/s vs its first {EARLY_STEPS} tokens, "
                f"batch {r['batch']}, {r['sampler']}", ours["late_vs_early_rate"], 0.95)
    for mode, f in (fidelity or {}).get("shipped", {}).items():
        add(f"greedy agreement with fp32 over {FIDELITY_STEPS} tokens, shipped model, {mode}",
            f["agreement"], FIDELITY_GOALS[mode])
    if "ours" in cold and "hf" in cold:
        add("cold start to first token vs transformers",
            cold["ours"]["first_token_s"] / cold["hf"]["first_token_s"], 0.5, "lower")
        add("peak memory vs transformers", cold["ours"]["peak_rss_mb"] / cold["hf"]["peak_rss_mb"],
            1.0, "lower")
    return targets


def print_summary(report):
    cold = report["cold"]
    if cold:
        print("\ncold start (fresh process: imports, tokenizer, load, prefill, first token) and "
              "peak RSS, batch 1, 128 tokens, top_k")
        for x, c in cold.items():
            print(f"  {SYSTEM_NAMES[x]:<18} first token {c['first_token_s']:6.2f} s   "
                  f"peak RSS {c['peak_rss_mb']:7.0f} MiB   ({c['runs']} runs)")
    if report["peers"] is not None:
        bench_peers.print_peers(report["peers"])
    print("\nthe speed targets")
    for t in report["targets"]:
        mark = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        op = ">=" if t["better"] == "higher" else "<="
        print(f"  {t['target']:<66} {value:>7} (goal {op} {t['goal']})  {mark}")
    la = report["load_average_start_end"]
    print(f"\nload average: start {la[0][0]:.2f}, end {la[1][0]:.2f} (1 min); "
          f"{report['seconds'] / 60:.1f} minutes")


if __name__ == "__main__":
    sys.exit(main())
