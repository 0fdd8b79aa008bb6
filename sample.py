"""Sample text from a GPT-2-family model: nanoGPT's sample.py, with its flags and its output.

    python sample.py                                   # the shipped Shakespeare model
    python sample.py --init_from=gpt2 --start="Hello" --num_samples=3 --max_new_tokens=50
    python sample.py configs/greedy.toml --max_new_tokens=40

This script wires the parts together and owns printing, exit codes and the command line's
edge: settings (settings.py) -> prompt -> model (loader.py) -> pieces (generate.py) -> stdout.

Which model, as in nanoGPT: --init_from if given; else the out_dir given by a flag or a config
file (init_from=resume); else the shipped model. One stderr line names what was loaded. nanoGPT's
own config files work as config files (their training settings are listed once as ignored),
and configs/nanogpt.toml makes the text nanoGPT's, byte for byte (--draw=multinomial
--context=crop).

Output, as nanoGPT prints it: each sample's text, prompt included, then a line
`---------------`. One sample streams as it is generated; several are printed in order as
they finish, with a progress bar on stderr when stderr is a terminal. The last line on stderr
gives the speed.

Exit codes (nanosample/cli.py): a user's mistake (a flag, config file, prompt, checkpoint, an
output path that cannot be written, a batch that cannot fit in memory) is one line
`error: ...` on stderr and exit code 2, before the model runs; a failure midway (a full disk,
the model producing NaN logits) is one `error:` line and exit code 1, and the samples printed
before it are whole; Ctrl-C is exit code 130.

Choices:
- An empty prompt starts from <|endoftext|> for GPT-2 models, as unconditional generation
  does; a character vocabulary has no such token, so it starts from a newline (nanoGPT's
  default prompt). Either way nothing is printed for the prompt.
- A prompt longer than the model's context (block_size) is an error, not silently cropped.
- --explain_file, --plot and --html never replace an existing file unless --overwrite is
  given, and are written beside their path and renamed into place at the end: two runs never
  interleave. A run that fails or is interrupted keeps the JSON Lines trace of the steps it
  finished (whole lines); a half-drawn plot or page is never left.
- Samples run at most DEFAULT_BATCH at a time unless --batch_size says otherwise (sample i is
  the same text however the samples are batched), and a batch whose KV cache cannot fit in
  the memory left is refused before it is allocated.
"""

import importlib
import os
import sys
import time

from nanosample import cli, threads
from nanosample.device import check_quantize, resolve_device
from nanosample.settings import (HelpRequested, SampleSettings, SettingsError, name_the_source,
                                 read_settings)

SEPARATOR = "---------------"
DEFAULT_BATCH = 64  # samples per forward batch when --batch_size is None
DESCRIPTION = ("Sample text from a GPT-2-family model: the shipped character-level Shakespeare "
               "model, pretrained GPT-2, a nanoGPT out_dir or a Hugging Face directory. "
               "nanoGPT's sample.py flags keep their names and meanings.")


def main(argv=None):
    """Exit code: 0, 1 (failed midway), 2 (bad input) or 130 (interrupted), as cli.py says."""
    return cli.run_script(sample, argv, interrupted="interrupted; the samples printed so far "
                                                    "are whole")


def sample(argv):
    outputs = {}  # --explain_file and --plot, whose temporary files must not outlive the run
    threads.set_wait_policy()  # before torch is imported, or it does nothing (threads.py)
    try:
        try:
            parsed = read_settings(SampleSettings, argv, prog="sample.py",
                                   description=DESCRIPTION)
            settings = parsed.settings
            init_from = model_to_load(parsed)
            prompt, prompt_flag = read_prompt(settings.start)
            for stop in settings.stop:
                cli.check_text_arg(stop, "--stop")
            outputs = check_output_paths(settings)
            explain = import_explain(settings)
        except HelpRequested as h:
            print(h.text)
            return 0
        except SettingsError as e:
            return cli.report_error(e)
        return load_and_run(parsed, init_from, prompt, prompt_flag, outputs, explain)
    finally:
        for output in outputs.values():  # what was not put in place (an error, Ctrl-C)
            output.discard()


def load_and_run(parsed, init_from, prompt, prompt_flag, outputs, explain):
    """Load the model, check what needs it, generate; the exit code."""
    settings = parsed.settings
    policy = threads.ThreadPolicy(settings.threads)  # before torch loads: it watches the load
    from nanosample import loader  # the model code loads only once the settings are known to be good

    try:
        device, dtype = resolve_device(settings.device, settings.dtype)
        check_quantize(settings.quantize, device, dtype,
                       parsed.sources.get("quantize", "--quantize"))
        check_cuda_graph(parsed, device)
        loaded = loader.load_model(init_from, out_dir=settings.out_dir,
                                   device=device, dtype=dtype, quantize=settings.quantize)
        prompt_ids = encode_prompt(prompt, prompt_flag, loaded.tokenizer,
                                   loaded.model.config.block_size)
        params = sampler_params_for(settings, loaded.tokenizer)
        batch_size = batch_size_for(settings, loaded.model, len(prompt_ids), device)
        trace = explain.open_trace(settings, loaded.tokenizer, prompt_ids, outputs) \
            if explain else None
    except loader.CheckpointError as e:
        return cli.report_error(cli.checkpoint_message(e))
    except SettingsError as e:
        return cli.report_error(e)

    if parsed.ignored:  # after every check, so that a mistake is still one line
        note_ignored(parsed.ignored)
    if device == "cpu" or settings.threads is not None:
        policy.apply(loaded.info["parameters"], batch_size)
    print(describe_loaded(loaded, policy), file=sys.stderr)
    model = loaded.model
    if settings.compile:
        import torch
        model = torch.compile(model)
    cli.check_interrupted()
    failed = False
    try:
        return run(settings, model, loaded.tokenizer, prompt, prompt_ids, params, trace,
                   batch_size, policy)
    except cli.RunError as e:  # an output could not be written
        failed = True
        return cli.report_error(e, cli.EXIT_FAILED)
    except (ValueError, RuntimeError, MemoryError) as e:
        # The model or torch failing midway: NaN logits from broken weights, out of memory, a
        # --compile backend that cannot build. One line; the samples printed so far are whole.
        failed = True
        return cli.report_error(f"generation failed: {cli.failure(e)}", cli.EXIT_FAILED)
    finally:
        if trace is not None:
            try:
                trace.close()  # the trace of every finished step, and the plot
            except cli.RunError as e:
                if not failed:
                    return cli.report_error(e, cli.EXIT_FAILED)


# ---------------------------------------------------------------------------------------------
# The edge: everything checked before the model loads, or right after

def model_to_load(parsed):
    """init_from as nanoGPT means it: without it, an out_dir set by a flag or a config file
    loads that out_dir's ckpt.pt (init_from='resume', nanoGPT's default); with neither, the
    shipped model. An out_dir without ckpt.pt is an error naming where it was set, never
    another model."""
    settings, sources = parsed.settings, parsed.sources
    init_from = settings.init_from
    if "init_from" not in sources and "out_dir" in sources:
        init_from = "resume"
    if init_from != "resume":
        return init_from
    out_dir = settings.out_dir
    if "out_dir" in sources:
        where = sources["out_dir"]
        where = f"--out_dir={out_dir}" if where.startswith("--") else f"{where}: out_dir={out_dir!r}"
    else:  # nanoGPT's default out_dir, by --init_from=resume or a training config without one
        where = sources["init_from"]
        where = ("--init_from=resume" if where.startswith("--") else where) + \
            f": out_dir={out_dir!r} (the default)"
    if not os.path.isdir(out_dir):
        raise SettingsError(f"{where}: no such directory; out_dir is the folder where nanoGPT's "
                            f"train.py saved ckpt.pt")
    if not os.path.isfile(os.path.join(out_dir, "ckpt.pt")):
        raise SettingsError(f"{where}: no ckpt.pt in it; out_dir is the folder where nanoGPT's "
                            f"train.py saved ckpt.pt")
    return init_from


def check_cuda_graph(parsed, device):
    """--cuda_graph=true on a device without CUDA is an error naming where it was set (auto
    is off there)."""
    if parsed.settings.cuda_graph and not device.startswith("cuda"):
        where = name_the_source("cuda_graph=true",
                                {"cuda_graph": parsed.sources.get("cuda_graph", "--cuda_graph")})
        raise SettingsError(f"{where}: CUDA graphs need a CUDA device, and this run is on "
                            f"{device} (--device={parsed.settings.device}); leave it unset "
                            f"(None: on wherever CUDA is)")


def note_ignored(ignored):
    """One stderr line listing the nanoGPT training settings the config files held."""
    files = ", ".join(dict.fromkeys(ignored.values()))
    print(f"note: ignored nanoGPT training settings (from {files}): {', '.join(ignored)}",
          file=sys.stderr)


def describe_loaded(loaded, policy=None):
    """The one stderr line naming what was loaded: source, size, vocabulary, context, dtype,
    device, and the CPU threads chosen (threads.ThreadPolicy) when they were."""
    model, tokenizer = loaded.model, loaded.tokenizer
    n = loaded.info["parameters"]
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"
    vocab = f"vocabulary {tokenizer.n_vocab}"
    if model.config.vocab_size != tokenizer.n_vocab:
        vocab += f" (padded to {model.config.vocab_size})"
    if "meta_pkl" in loaded.info:
        vocab += f" from {loaded.info['meta_pkl']}"
    weight = model.transformer.wte.weight
    dtype = str(weight.dtype).removeprefix("torch.")
    if "quantize" in loaded.info:
        dtype += f" ({loaded.info['quantize']} weights in the matrix products)"
    threads = f", {policy.describe()}" if policy is not None and policy.describe() else ""
    return (f"loaded {loaded.source}: {size} parameters, {vocab}, block_size "
            f"{model.config.block_size}, {dtype} on {weight.device}{threads}")


def read_prompt(start):
    """--start's text, and the flag to name in errors. FILE:path reads a UTF-8 file (a
    regular file of at most cli.CONFIG_LIMIT bytes)."""
    if not start.startswith("FILE:"):
        return cli.check_text_arg(start, "--start"), "--start"
    path = start[len("FILE:"):]
    flag = f"--start=FILE:{path}"
    if not path:
        raise SettingsError("--start=FILE:: needs a file path after FILE:")
    text = cli.read_user_text(path, flag, what="a prompt file")
    return text.removeprefix("\ufeff"), flag  # a byte-order mark is not part of the prompt


def check_output_paths(settings):
    """--explain_file, --plot and --html as cli.OutputFile, {flag name: OutputFile}: a file path in a
    directory that takes new files (tried now, before the model loads), and never someone's
    existing file by accident."""
    paths = [(flag, path) for flag, path in (("explain_file", settings.explain_file),
                                             ("plot", settings.plot),
                                             ("html", settings.html)) if path is not None]
    for i, (flag, path) in enumerate(paths):
        for earlier, other in paths[:i]:
            if os.path.abspath(path) == os.path.abspath(other):
                raise SettingsError(f"--{flag}={path}: the same file as --{earlier}")
    outputs = {}
    try:
        for flag, path in paths:
            outputs[flag] = cli.OutputFile(path, f"--{flag}={path}", overwrite=settings.overwrite)
    except SettingsError:
        for output in outputs.values():
            output.discard()
        raise
    return outputs


def batch_size_for(settings, model, prompt_tokens, device):
    """Samples per forward batch: --batch_size, or at most DEFAULT_BATCH; a SettingsError when
    the batch's KV cache and sampler rows cannot fit in the memory left (before allocating)."""
    config = model.config
    batch = min(settings.batch_size or DEFAULT_BATCH, settings.num_samples)
    positions = min(config.block_size, prompt_tokens + settings.max_new_tokens)
    need = cli.generation_bytes(config.n_layer, config.n_embd, config.vocab_size, batch,
                                positions, model.transformer.wte.weight.element_size())
    free = cli.available_memory_bytes(device)
    if free is not None and need > free * 0.8:
        flag = f"--batch_size={settings.batch_size}" if settings.batch_size else \
            f"--num_samples={settings.num_samples}"
        fits = max(1, int(batch * free * 0.8 / need))
        raise SettingsError(f"{flag}: a batch of {batch} samples needs about {cli.gib(need)} "
                            f"(KV cache of {positions} positions and the sampler's rows), more "
                            f"than the {cli.gib(free * 0.8)} this run may use; use "
                            f"--batch_size={fits} or less")
    return batch


def import_explain(settings):
    """Explain mode (the per-step table, trace file and plot) lives in explain.py, imported only when asked for.

    The contract explain.py provides: `open_trace(settings, tokenizer, prompt_ids, outputs)`
    returns the `trace` callable that generate() calls with each step's TraceStep, with a
    `close()` that finishes its outputs (table, JSON Lines file, plot, page; `outputs` are
    the OutputFiles of check_output_paths); it raises SettingsError for a user's mistake.
    """
    if not settings.explaining:
        return None
    flag = "--explain" if settings.explain else \
        "--explain_file" if settings.explain_file is not None else \
        "--plot" if settings.plot is not None else "--html"
    try:
        explain = importlib.import_module("nanosample.explain")
    except ModuleNotFoundError as e:
        if e.name != "nanosample.explain":
            raise  # explain.py is there but something it needs is not: a real problem
        raise SettingsError(f"{flag}: explain mode is not available in this version "
                            f"(explain.py is missing)") from None
    return explain


def encode_prompt(prompt, flag, tokenizer, block_size):
    """The prompt's token ids; the empty prompt starts from <|endoftext|> or a newline."""
    if prompt == "":
        if tokenizer.eot_id is not None:
            return [tokenizer.eot_id]
        prompt = "\n"
    try:
        ids = tokenizer.encode(prompt)
    except ValueError as e:  # a character outside a character vocabulary
        raise SettingsError(f"{flag}: {e}") from None
    if len(ids) > block_size:
        raise SettingsError(f"{flag}: the prompt is {len(ids)} tokens, longer than this model's "
                            f"context of {block_size} tokens (block_size); shorten it")
    return ids


def sampler_params_for(settings, tokenizer):
    """The validated SamplingParams, with --ban and --logit_bias ids checked against the vocabulary."""
    from nanosample.sampler_settings import check_token_ids

    params = settings.sampling_params()
    if len({i for i in params.banned_ids if i < tokenizer.n_vocab}) == tokenizer.n_vocab:
        raise SettingsError(f"--ban: every one of this model's {tokenizer.n_vocab} tokens is banned")
    try:
        check_token_ids(params, tokenizer.n_vocab)
    except ValueError as e:  # "ban=60000: ...": the error names the flag
        raise SettingsError(f"--{e}") from None
    return params


# ---------------------------------------------------------------------------------------------
# Generating and printing

class SamplePrinter:
    """Writes samples in order: prompt + text, a newline, then SEPARATOR.

    With `stream`, the lowest-numbered unfinished sample is written as its pieces arrive and
    the others are held until their turn; without it, each sample is written when it and all
    before it are finished.
    """

    def __init__(self, out, prompt, num_samples, stream):
        self.out, self.prompt, self.stream = out, prompt, stream
        self.num_samples = num_samples
        # Only the samples not yet printed are held: --num_samples may be huge.
        self.texts = {}        # sample -> its pieces so far
        self.done = set()      # finished samples not printed yet
        self.current = 0       # the next sample to write
        self.written = None    # how many of current's pieces are written; None: not begun

    def add(self, piece):
        self.texts.setdefault(piece.sample, []).append(piece.text)
        if piece.done:
            self.done.add(piece.sample)
        self._write_ready()

    def finish(self):
        self.done.update(range(self.current, self.num_samples))
        self._write_ready()

    def _write_ready(self):
        while self.current < self.num_samples:
            i = self.current
            if not (self.stream or i in self.done):
                return
            texts = self.texts.get(i, [])
            if self.written is None:
                self.out.write(self.prompt)
                self.written = 0
            self.out.write("".join(texts[self.written:]))
            self.written = len(texts)
            if i not in self.done:
                self.out.flush()
                return
            self.out.write("\n" + SEPARATOR + "\n")
            self.out.flush()
            self.texts.pop(i, None)  # printed: let it go
            self.done.discard(i)
            self.current, self.written = i + 1, None


def run(settings, model, tokenizer, prompt, prompt_ids, params, trace, batch_size=None,
        policy=None):
    from nanosample import generate
    from tqdm import tqdm

    n, max_new = settings.num_samples, settings.max_new_tokens
    # The --explain tables go to stderr step by step; streamed text on the same terminal
    # would be cut into them, so explain mode prints each sample whole by default.
    stream = (n == 1 and not settings.explain) if settings.stream is None else settings.stream
    printer = SamplePrinter(sys.stdout, prompt, n, stream)
    # The bar is for batch runs (streamed text is its own progress); tqdm hides it when
    # stderr is not a terminal (disable=None).
    bar = tqdm(total=n * max_new, unit="tok", file=sys.stderr, leave=False,
               disable=True if stream else None)
    counted = {}  # tokens of each unfinished sample seen so far
    tokens = 0
    t0 = time.perf_counter()
    pieces = generate.generate(
        model, tokenizer, prompt_ids, params, num_samples=n, max_new_tokens=max_new,
        seed=settings.seed, batch_size=batch_size or settings.batch_size, stop=settings.stop,
        stop_at_eot=settings.stop_at_eot, trace=trace, draw=settings.draw,
        context=settings.context,
        decode_step={None: "auto", True: "graph", False: "eager"}[settings.cuda_graph])
    try:
        for piece in pieces:
            if policy is not None:
                policy.check()  # the load changed: another thread count (cheap; every 2 s)
            if piece.token is not None:
                tokens += 1
                counted[piece.sample] = counted.get(piece.sample, 0) + 1
                bar.update(1)
            if not piece.done:
                printer.add(piece)
                continue
            bar.update(max_new - counted.pop(piece.sample, 0))  # a sample that stopped early
            # A finished sample may be printed now: lift the bar off the terminal meanwhile.
            with tqdm.external_write_mode(file=sys.stdout):
                printer.add(piece)
        printer.finish()
        if trace is not None:
            trace.close()  # the plot is drawn now: a failure there comes before the speed line
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    rate = tokens / seconds if seconds > 0 else float("inf")
    print(f"generated {tokens} tokens in {seconds:.2f} s ({rate:.1f} tokens/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
