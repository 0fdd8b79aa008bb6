"""llama.cpp beside ours: the peer that CPU users pick instead of a Python sampler, run on the
same weights with the same thread count. This file owns finding a llama.cpp build, converting
a checkpoint to GGUF with llama.cpp's own converter, running its benchmark tools, reading
their output (one result per GGUF type and batch size) and the ratios ours / llama.cpp.

What llama.cpp is asked, per GGUF type (f32, f16, q8_0) and batch size B:

- B = 1, `llama-bench`: the prompt's rate (`-p 16`, from an empty cache) and the decode rate
  after it (`-n 128 -d 16`: 128 tokens with the 16-token prompt already in the cache, as our
  decode steps have it);
- B > 1, `llama-batched-bench -pps`: one 16-token prompt shared by B sequences (as our
  `num_samples=B` shares it), then 128 new tokens each; the rate counts every sequence.

One run of a tool measures once (`-r 1`, after the tool's own warm-up); the repeats are
bench.py's, which interleaves them with its own systems so that a busy spell hurts both.
llama.cpp never samples (its tools decode fixed or random tokens), so against our decode
rate, which includes choosing each token, its figures are a slightly easier bar.

    .venv/bin/python bench.py --quick --peers --llamacpp=~/llama.cpp/build/bin
    .venv/bin/python bench_peers.py --llamacpp=~/llama.cpp/build/bin   # llama.cpp alone

No llama.cpp build is needed to use the project, only for this comparison: HOW_TO_GET says
how to make one. The last line bench_peers.py prints is one JSON object.
"""

import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from nanosample import cli
from nanosample.settings import SettingsError, check, parse_for_main, setting

ROOT = Path(__file__).resolve().parent
LLAMA_TYPES = ("f32", "f16", "q8_0")
# Which of our precisions each llama.cpp type is set against: a ratio per pair, null while
# ours has no system of that precision. f16 meets both of our 16-bit modes.
PAIRS = (("f32", "fp32"), ("f16", "fp16"), ("f16", "bf16"), ("q8_0", "int8"))
# The targets: ours / llama.cpp decode tokens/s, (llama type, our precision, batch).
TARGETS = {("f32", "fp32", 1): 1.0, ("f16", "bf16", 1): 1.0, ("f16", "fp16", 1): 1.0,
           ("q8_0", "int8", 1): 1.0,
           ("f32", "fp32", 8): 1.3}
TOOL_TIMEOUT_S = 1800  # one tool run; batch 64 x 128 tokens takes about a minute on 2 cores

HOW_TO_GET = (
    "get one: git clone https://github.com/ggml-org/llama.cpp && cd llama.cpp && "
    "cmake -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j --target llama-bench "
    "llama-batched-bench, then pass --llamacpp=llama.cpp/build/bin (its "
    "convert_hf_to_gguf.py, found from there, makes the GGUF files)")
LLAMACPP_HELP = (
    "llama.cpp's build/bin folder (holding llama-bench and llama-batched-bench), or a folder "
    "with one in bin/ or build/bin/; None = llama-bench on PATH")
CONVERT_HELP = (
    "llama.cpp's convert_hf_to_gguf.py, or the llama.cpp source folder holding it; None = "
    "look in the folders above the build (llama.cpp/build/bin). Run with this Python, on "
    "Hugging Face GPT-2 folders only")
GGUF_DIR_HELP = (
    "folder of the GGUF files, named <checkpoint folder name>-<type>.gguf (e.g. "
    "gpt2-124M-random-f32.gguf); missing or older ones are converted into it; None = "
    "<cache_dir>/gguf")
TYPES_HELP = "llama.cpp's weight types to run: f32, f16, q8_0"


class PeerError(Exception):
    """llama.cpp failed, or wrote what we cannot read: one line, naming the tool."""


def check_types(name, types):
    """ValueError unless `types` is a non-empty selection of LLAMA_TYPES."""
    check(bool(types), name, "", f"must name at least one of {', '.join(LLAMA_TYPES)}")
    for t in types:
        check(t in LLAMA_TYPES, name, t, f"must be {', '.join(LLAMA_TYPES)}")


def split_words(values):
    """('f32,f16', 'q8_0') -> ('f32', 'f16', 'q8_0'): a list flag given once with commas."""
    return tuple(w.strip() for v in values for w in v.split(",") if w.strip())


# ---------------------------------------------------------------------------------------------
# Finding llama.cpp

@dataclass(frozen=True)
class LlamaCpp:
    """A llama.cpp build: the folder of its tools, and its converter when one was found."""
    bin_dir: Path
    convert: Path | None  # convert_hf_to_gguf.py

    @property
    def bench(self):
        return self.bin_dir / "llama-bench"

    @property
    def batched_bench(self):
        return self.bin_dir / "llama-batched-bench"

    def has_batched_bench(self):
        return _is_program(self.batched_bench)


def _is_program(path):
    return path.is_file() and os.access(path, os.X_OK)


def find_build(where):
    """The folder holding llama-bench: `where` itself, its bin/ or its build/bin/; where=None:
    llama-bench on PATH. SettingsError (one line, saying how to get a build) when none is."""
    if where is None:
        found = shutil.which("llama-bench")
        if found is None:
            raise SettingsError("--peers: no llama.cpp build found (llama-bench is not on PATH; "
                                f"or name one with --llamacpp=DIR); {HOW_TO_GET}")
        return Path(found).resolve().parent  # a link on PATH: the build it points into
    folder = Path(where).expanduser()
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "no such folder"
        raise SettingsError(f"--llamacpp={where}: {what} (give llama.cpp's build/bin folder)")
    for candidate in (folder, folder / "bin", folder / "build" / "bin"):
        if _is_program(candidate / "llama-bench"):
            return candidate.resolve()
    raise SettingsError(f"--llamacpp={where}: no llama-bench in it, its bin/ or its build/bin/ "
                        f"(a build of the target llama-bench); {HOW_TO_GET}")


def find_converter(bin_dir, where):
    """convert_hf_to_gguf.py: `where` (the script or the folder holding it), else the first of
    the three folders above the build that has it (llama.cpp/build/bin -> llama.cpp); None if
    none does. SettingsError when `where` is given and has none."""
    if where is not None:
        path = Path(where).expanduser()
        script = path / "convert_hf_to_gguf.py" if path.is_dir() else path
        if not script.is_file():
            raise SettingsError(f"--llamacpp_convert={where}: no convert_hf_to_gguf.py there "
                                "(it is in the top folder of llama.cpp's source)")
        return script.resolve()
    for folder in list(Path(bin_dir).parents)[:3]:
        if (folder / "convert_hf_to_gguf.py").is_file():
            return folder / "convert_hf_to_gguf.py"
    return None


def find_llamacpp(where, convert=None):
    """The build (find_build) and its converter (find_converter), before any work is done."""
    bin_dir = find_build(where)
    return LlamaCpp(bin_dir, find_converter(bin_dir, convert))


# ---------------------------------------------------------------------------------------------
# The GGUF files

def gguf_paths(checkpoint_dir, gguf_dir, types):
    """{type: where its GGUF is, or goes}: <gguf_dir>/<checkpoint folder name>-<type>.gguf."""
    name = Path(checkpoint_dir).resolve().name
    return {t: Path(gguf_dir) / f"{name}-{t}.gguf" for t in types}


def _weights_mtime(checkpoint_dir):
    times = [p.stat().st_mtime for p in Path(checkpoint_dir).glob("*.safetensors")]
    times += [p.stat().st_mtime for p in Path(checkpoint_dir).glob("*.bin")]
    return max(times, default=0.0)


def gguf_plan(checkpoint_dir, gguf_dir, types, llama, convertible):
    """Which GGUFs are there and which must be converted, checked before any work.

    Returns ({type: path}, [types to convert]). A GGUF older than the checkpoint's weights is
    converted again when it can be (a retrained checkpoint is not compared with its old self).
    SettingsError when a type is missing and cannot be converted: no converter, or the
    checkpoint is not a Hugging Face GPT-2 folder (`convertible`)."""
    paths = gguf_paths(checkpoint_dir, gguf_dir, types)
    can_convert = llama.convert is not None and convertible
    weights_time = _weights_mtime(checkpoint_dir) if Path(checkpoint_dir).is_dir() else 0.0
    to_convert = [t for t, p in paths.items()
                  if not p.is_file() or (can_convert and p.stat().st_mtime < weights_time)]
    missing = [t for t in to_convert if not paths[t].is_file()]
    if missing and not can_convert:
        why = (f"{checkpoint_dir} is not a local Hugging Face GPT-2 folder, which llama.cpp's "
               "converter needs" if llama.convert is not None else
               "no convert_hf_to_gguf.py was found to make it (--llamacpp_convert=LLAMA_CPP_SOURCE)")
        raise SettingsError(f"--gguf_dir={gguf_dir}: no {paths[missing[0]].name}, and {why}; "
                            "or convert it yourself: python convert_hf_to_gguf.py CHECKPOINT "
                            f"--outtype {missing[0]} --outfile {paths[missing[0]]}")
    return paths, to_convert


def convert_to_gguf(converter, checkpoint_dir, out_path, gguf_type, python=sys.executable):
    """Run llama.cpp's converter on a view of a Hugging Face GPT-2 folder; the GGUF appears
    whole at out_path or not at all. PeerError with the converter's last line if it fails.

    The view is a folder of links to the checkpoint's files plus what llama.cpp's GPT-2
    converter reads and a transformers-written folder may lack: `n_ctx` in config.json
    (transformers 5 writes only n_positions) and the tokenizer (vocab.json and merges.txt;
    ours, GPT-2's BPE files, where the folder has none)."""
    checkpoint_dir, out_path = Path(checkpoint_dir).resolve(), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hf-view-", dir=out_path.parent) as view:
        view = Path(view)
        for f in checkpoint_dir.iterdir():
            if f.name != "config.json":
                (view / f.name).symlink_to(f)
        config = json.loads((checkpoint_dir / "config.json").read_text())
        config.setdefault("n_ctx", config.get("n_positions", 1024))
        (view / "config.json").write_text(json.dumps(config, indent=2))
        if not any((view / n).exists() for n in ("tokenizer.json", "vocab.json")):
            bpe = ROOT / "nanosample" / "assets" / "gpt2-bpe"
            (view / "vocab.json").symlink_to(bpe / "encoder.json")
            (view / "merges.txt").symlink_to(bpe / "vocab.bpe")
        tmp = out_path.with_name(f"{out_path.name}.tmp{os.getpid()}")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        done = subprocess.run([python, str(converter), str(view), "--outtype", gguf_type,
                               "--outfile", str(tmp), "--model-name", checkpoint_dir.name],
                              capture_output=True, text=True, env=env)
    if done.returncode != 0 or not tmp.is_file():
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise PeerError(f"{Path(converter).name} --outtype {gguf_type} failed: "
                        f"{_last_line(done.stderr or done.stdout)}")
    os.replace(tmp, out_path)


def _last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return cli.one_line(lines[-1])[:300] if lines else "(no output)"


def prepare_ggufs(llama, checkpoint_dir, paths, to_convert):
    """Convert what gguf_plan said must be; {type: path} of every GGUF, ready."""
    for t in to_convert:
        print(f"llama.cpp: converting {checkpoint_dir} to {paths[t]} ...", flush=True)
        convert_to_gguf(llama.convert, checkpoint_dir, paths[t], t)
    return paths


# ---------------------------------------------------------------------------------------------
# Running llama.cpp's tools and reading what they print

@dataclass
class PeerRun:
    """One measurement of llama.cpp: tokens/s of the prompt and of decoding (all sequences)."""
    prompt_tokens_per_s: float
    decode_tokens_per_s: float
    build: str = ""  # llama.cpp's build number and commit, where the tool says


def llama_bench_args(llama, gguf, threads, prompt_tokens, new_tokens):
    """The two llama-bench runs of batch 1: the prompt from an empty cache; the decode steps
    with the prompt already in the cache (-d: filled before the clock starts)."""
    base = [str(llama.bench), "-m", str(gguf), "-t", str(threads), "-ngl", "0", "-r", "1",
            "-o", "json"]
    return (base + ["-p", str(prompt_tokens), "-n", "0"],
            base + ["-p", "0", "-n", str(new_tokens), "-d", str(prompt_tokens)])


def batched_bench_args(llama, gguf, threads, prompt_tokens, new_tokens, batch):
    """llama-batched-bench for batch > 1: one prompt shared by `batch` sequences (-pps). Each
    sequence gets its own part of the context (-c), prompt and new tokens."""
    return [str(llama.batched_bench), "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
            "-ngl", "0", "-c", str(batch * (prompt_tokens + new_tokens)), "-b", "512",
            "-ub", "512", "-npp", str(prompt_tokens), "-ntg", str(new_tokens),
            "-npl", str(batch), "-pps", "--output-format", "jsonl"]


def parse_llama_bench(text):
    """llama-bench -o json's output (a JSON list, one object per test) as a list of
    {"n_prompt", "n_gen", "n_depth", "tokens_per_s", "threads", "build"}."""
    try:
        tests = json.loads(text)
        return [{"n_prompt": int(t["n_prompt"]), "n_gen": int(t["n_gen"]),
                 "n_depth": int(t.get("n_depth", 0)), "tokens_per_s": float(t["avg_ts"]),
                 "threads": int(t["n_threads"]),
                 "build": f"{t.get('build_number', '?')} ({t.get('build_commit', '?')})"}
                for t in tests]
    except (ValueError, TypeError, KeyError) as e:
        raise PeerError(f"llama-bench: cannot read its JSON output ({cli.one_line(e)[:200]}): "
                        f"{_last_line(text)}") from None


def parse_batched_bench(text):
    """llama-batched-bench --output-format jsonl's result lines (its other lines are logs) as
    a list of {"batch", "prompt_tokens", "new_tokens", "prompt_tokens_per_s",
    "decode_tokens_per_s", "threads", "shared_prompt"}."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            r = json.loads(line)
            rows.append({"batch": int(r["pl"]), "prompt_tokens": int(r["pp"]),
                         "new_tokens": int(r["tg"]), "prompt_tokens_per_s": float(r["speed_pp"]),
                         "decode_tokens_per_s": float(r["speed_tg"]),
                         "threads": int(r["n_threads"]), "shared_prompt": bool(r["is_pp_shared"])})
        except (ValueError, TypeError, KeyError) as e:
            raise PeerError(f"llama-batched-bench: cannot read a result line ({cli.one_line(e)}): "
                            f"{line[:200]}") from None
    return rows


def _run_tool(args):
    """stdout of one tool run; PeerError (its last stderr line) if it fails."""
    name = Path(args[0]).name
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise PeerError(f"{name} ran past {TOOL_TIMEOUT_S} s") from None
    except OSError as e:
        raise PeerError(f"{name} did not start: {e.strerror}") from None
    if done.returncode != 0:
        raise PeerError(f"{name} failed (exit code {done.returncode}): {_last_line(done.stderr)}")
    return done.stdout


def run_peer(llama, gguf, threads, prompt_tokens, new_tokens, batch):
    """One measurement of llama.cpp at this batch size (the tools above): a PeerRun."""
    if batch == 1:
        prompt_args, decode_args = llama_bench_args(llama, gguf, threads, prompt_tokens, new_tokens)
        prompt = _one_test(parse_llama_bench(_run_tool(prompt_args)), prompt_tokens, 0)
        decode = _one_test(parse_llama_bench(_run_tool(decode_args)), 0, new_tokens)
        return PeerRun(prompt["tokens_per_s"], decode["tokens_per_s"], decode["build"])
    rows = parse_batched_bench(_run_tool(
        batched_bench_args(llama, gguf, threads, prompt_tokens, new_tokens, batch)))
    mine = [r for r in rows if (r["batch"], r["prompt_tokens"], r["new_tokens"])
            == (batch, prompt_tokens, new_tokens)]
    if not mine:
        raise PeerError(f"llama-batched-bench printed no result for batch {batch}, "
                        f"{prompt_tokens}-token prompt, {new_tokens} new tokens")
    return PeerRun(mine[0]["prompt_tokens_per_s"], mine[0]["decode_tokens_per_s"])


def _one_test(tests, n_prompt, n_gen):
    mine = [t for t in tests if (t["n_prompt"], t["n_gen"]) == (n_prompt, n_gen)]
    if len(mine) != 1:
        raise PeerError(f"llama-bench printed {len(mine)} results for pp{n_prompt}/tg{n_gen}, "
                        "not one")
    return mine[0]


# ---------------------------------------------------------------------------------------------
# The peer as bench.py runs it: warmed up, measured once per repeat, summarized

class Peers:
    """llama.cpp on one checkpoint's GGUFs, one measurement of every type per `run` call (so
    that bench.py can put the calls between its own systems' runs), medians at the end."""

    def __init__(self, llama, ggufs, threads, prompt_tokens):
        self.llama, self.ggufs, self.threads = llama, dict(ggufs), threads
        self.prompt_tokens = prompt_tokens
        self.runs = {}  # (type, batch, new_tokens) -> [PeerRun]
        self.notes, self.error = [], None

    def runs_batch(self, batch):
        """Whether llama.cpp has a tool for this batch size (llama-batched-bench for B > 1)."""
        if batch == 1 or self.llama.has_batched_bench():
            return True
        note = f"no llama-batched-bench in {self.llama.bin_dir}: llama.cpp skipped at batch {batch}"
        if note not in self.notes:
            self.notes.append(note)
            print(f"note: {note}")
        return False

    def warm_up(self, batches):
        """Every type and tool once on a few tokens: the GGUFs into the page cache, and a
        broken build or file found before the timed runs. PeerError if one fails."""
        for t, gguf in self.ggufs.items():
            for batch in sorted({1 if b == 1 else 2 for b in batches if self.runs_batch(b)}):
                run_peer(self.llama, gguf, self.threads, 4, 4, batch)

    def run(self, batch, new_tokens):
        """One measurement of every type at this setting."""
        for t, gguf in self.ggufs.items():
            run = run_peer(self.llama, gguf, self.threads, self.prompt_tokens, new_tokens, batch)
            self.runs.setdefault((t, batch, new_tokens), []).append(run)

    def results(self):
        """One result per (type, batch, new tokens): medians over the measurements."""
        out = []
        for (t, batch, new_tokens), runs in self.runs.items():
            out.append({
                "type": t, "batch": batch, "new_tokens": new_tokens,
                "prompt_tokens": self.prompt_tokens,
                "tool": "llama-bench" if batch == 1 else "llama-batched-bench -pps",
                "prompt_tokens_per_s": statistics.median(r.prompt_tokens_per_s for r in runs),
                "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in runs),
                "repeats": len(runs)})
        return out

    def section(self, ours):
        """The report's "peers" object; `ours` as peer_ratios takes it."""
        results = self.results()
        builds = sorted({r.build for runs in self.runs.values() for r in runs if r.build})
        return {"llamacpp": {"bin_dir": str(self.llama.bin_dir), "build": builds[0] if builds
                             else None, "threads": self.threads,
                             "gguf": {t: str(p) for t, p in self.ggufs.items()}},
                "results": results, "ratios": peer_ratios(results, ours),
                "notes": self.notes, "error": self.error}


def peer_ratios(results, ours):
    """Ours / llama.cpp for every PAIRS entry and every llama.cpp result of its type.

    results: Peers.results(); ours: {(precision, batch, new_tokens): {"decode_tokens_per_s",
    "prompt_tokens_per_s"}}, absent where ours has no such system or setting (ratio None).
    Decode rates count every sequence on both sides; the prompt's rate is one shared prompt."""
    ratios = []
    for r in results:
        for llama_type, precision in PAIRS:
            if r["type"] != llama_type:
                continue
            mine = ours.get((precision, r["batch"], r["new_tokens"]))

            def ratio(key):
                if mine is None or not mine.get(key) or not r[key]:
                    return None
                return mine[key] / r[key]

            ratios.append({"llamacpp": llama_type, "ours": precision, "batch": r["batch"],
                           "new_tokens": r["new_tokens"],
                           "decode_vs_llamacpp": ratio("decode_tokens_per_s"),
                           "prompt_vs_llamacpp": ratio("prompt_tokens_per_s")})
    return ratios


def peer_targets(section):
    """The issue's targets against llama.cpp, each {"target", "value", "goal", "better",
    "met"} as bench.py's check_targets makes them (value None where not measured)."""
    targets = []
    for (llama_type, precision, batch), goal in TARGETS.items():
        rows = [r for r in section["ratios"]
                if (r["llamacpp"], r["ours"], r["batch"]) == (llama_type, precision, batch)]
        rows.sort(key=lambda r: r["new_tokens"] != 128)  # the figures: 128 new tokens
        value = rows[0]["decode_vs_llamacpp"] if rows else None
        targets.append({"target": f"decode tokens/s vs llama.cpp {llama_type}, ours {precision}, "
                                  f"batch {batch}", "value": value, "goal": goal,
                        "better": "higher", "met": None if value is None else value >= goal})
    return targets


def print_peers(section, with_ours=True):
    """The readable table of a "peers" section: llama.cpp's figures, and ours against them."""
    info = section["llamacpp"]
    print(f"\nllama.cpp{' beside ours' if with_ours else ''} (build {info['build'] or '?'}, "
          f"{info['threads']} threads; tokens/s counting every sequence; llama.cpp does not "
          "sample)")
    print(f"  {'type':<6} {'batch':>5} {'new':>5} {'prompt tok/s':>13} {'decode tok/s':>13} "
          f"{'runs':>5}   {'ours / llama.cpp, decode (prompt)' if with_ours else ''}")
    for r in section["results"]:
        pairs = [x for x in section["ratios"] if (x["llamacpp"], x["batch"], x["new_tokens"])
                 == (r["type"], r["batch"], r["new_tokens"])]
        versus = ", ".join(f"{x['ours']} {_times(x['decode_vs_llamacpp'])} "
                           f"({_times(x['prompt_vs_llamacpp'])})" for x in pairs if with_ours)
        print(f"  {r['type']:<6} {r['batch']:>5} {r['new_tokens']:>5} "
              f"{r['prompt_tokens_per_s']:>13.1f} {r['decode_tokens_per_s']:>13.1f} "
              f"{r['repeats']:>5}   {versus}")
    for note in section["notes"]:
        print(f"  note: {note}")
    if section["error"]:
        print(f"  llama.cpp stopped: {section['error']}")


def print_peer_setting(peers, batch, new_tokens):
    """llama.cpp's lines under bench.py's table of one setting: what it measured so far."""
    for r in peers.results():
        if (r["batch"], r["new_tokens"]) == (batch, new_tokens):
            print(f"  llama.cpp {r['type']:<5} prompt {r['prompt_tokens_per_s']:7.1f} tok/s, "
                  f"decode {r['decode_tokens_per_s']:7.1f} tok/s ({r['repeats']} "
                  f"run{'s' if r['repeats'] != 1 else ''})",
                  flush=True)


def _times(x):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}x"


# ---------------------------------------------------------------------------------------------
# Alone: llama.cpp's figures for bench.py's checkpoint and settings

@dataclass(frozen=True)
class PeerSettings:
    """bench_peers.py's settings: llama.cpp alone on bench.py's checkpoint."""
    llamacpp: str | None = setting(None, LLAMACPP_HELP)
    llamacpp_convert: str | None = setting(None, CONVERT_HELP)
    gguf_dir: str | None = setting(None, GGUF_DIR_HELP)
    types: tuple[str, ...] = setting(LLAMA_TYPES, TYPES_HELP)
    init_from: str | None = setting(None, "a Hugging Face GPT-2 folder; None = bench.py's "
                                          "random GPT-2 124M in --cache_dir")
    cache_dir: str | None = setting(None, "bench.py's cache folder; None = <temp dir>/nanosample-bench")
    batch_sizes: tuple[int, ...] = setting((1, 8), "batch sizes (1: llama-bench; more: "
                                                   "llama-batched-bench, one shared prompt)")
    new_tokens: int = setting(128, "new tokens per sequence")
    prompt_tokens: int = setting(16, "prompt length in tokens")
    repeats: int = setting(3, "measurements per type and batch size (medians are reported)")
    threads: int | None = setting(None, "threads; None = torch's default, as bench.py's")

    def __post_init__(self):
        object.__setattr__(self, "types", split_words(self.types))
        check_types("types", self.types)
        check(bool(self.batch_sizes) and min(self.batch_sizes) >= 1, "batch_sizes",
              self.batch_sizes, "must be integers >= 1")
        for name in ("new_tokens", "prompt_tokens", "repeats"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        check(self.threads is None or self.threads >= 1, "threads", self.threads,
              "must be >= 1, or None")


def main(argv=None):
    """Exit code: 0, 1 (llama.cpp failed), 2 (bad input, or no llama.cpp build) or 130."""
    return cli.run_script(_main, argv)


def _main(argv):
    s, code = parse_for_main(PeerSettings, argv, prog="bench_peers.py",
                             description="llama.cpp's speed on bench.py's checkpoint (the GPT-2 "
                                         "124M shape, random weights) and settings, alone; "
                                         "bench.py --peers runs it beside ours.")
    if s is None:
        return code
    import bench  # the checkpoint bench.py measures; imported here, not at import time

    gguf_dir = s.gguf_dir or str(bench.cache_root(s.cache_dir) / "gguf")
    checkpoint = Path(s.init_from) if s.init_from else bench.cache_root(s.cache_dir) / bench.RANDOM_NAME
    try:
        llama = find_llamacpp(s.llamacpp, s.llamacpp_convert)
        if s.init_from is None:
            bench.check_cache_dir(s.cache_dir)
        paths, to_convert = gguf_plan(checkpoint, gguf_dir, s.types, llama,
                                      s.init_from is None or bench.is_hf_dir(checkpoint))
    except SettingsError as e:
        return cli.report_error(e)
    threads = s.threads
    if threads is None:
        import torch
        threads = torch.get_num_threads()
    try:
        if to_convert and s.init_from is None:
            bench.random_gpt2_dir(s.cache_dir)
        peers = Peers(llama, prepare_ggufs(llama, checkpoint, paths, to_convert), threads,
                      s.prompt_tokens)
        batches = [b for b in s.batch_sizes if peers.runs_batch(b)]
        peers.warm_up(batches)
        for _ in range(s.repeats):
            for b in batches:
                peers.run(b, s.new_tokens)
    except PeerError as e:
        return cli.report_error(f"llama.cpp: {e}", cli.EXIT_FAILED)
    section = peers.section({})
    print_peers(section, with_ours=False)
    print(json.dumps({"bench": "peers", "settings": asdict(s), **section}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
