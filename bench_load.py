"""Loading benchmark: time and peak memory of loading a 124M GPT-2 checkpoint, ours vs transformers.

Writes GPT2LMHeadModel(GPT2Config()) with random weights to a temporary directory with
save_pretrained (or uses --dir), then loads it in fresh interpreters, --repeats times each:
  ours:          loader.load_model(dir)   (meta-device model, memory-mapped safetensors)
  transformers:  GPT2LMHeadModel.from_pretrained(dir)
Each child reports the seconds spent importing, loading, and running a first forward pass of
8 tokens (where a lazily memory-mapped weight is read for the first time), and peak RSS
(VmHWM) after the imports, after loading, and after one forward pass (which touches every
weight, so pages a memory map has not read yet are counted too). The fp32 weights alone are
475 MiB, so a loader holding two copies at once shows ~950 MiB above the after-import RSS.
The checkpoint was just written, so every run reads it from the page cache, not the disk.
Prints a table, then one JSON line.

    .venv/bin/python bench_load.py [--repeats 3] [--dir DIR] [--dtype float32]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from nanosample.cli import peak_rss_mb

LOADERS = ("ours", "transformers")


def child(which, directory, dtype_name):
    """Runs in a fresh interpreter: load once, print one JSON line of measurements."""
    t0 = time.perf_counter()
    import torch
    dtype = getattr(torch, dtype_name)
    if which == "ours":
        from nanosample.loader import load_model
        from nanosample.tokenizer import gpt2_tokenizer
        t_tok = time.perf_counter()
        gpt2_tokenizer()  # built once per process; timed apart so both columns load only weights
        tokenizer_s = time.perf_counter() - t_tok
    else:
        from transformers import GPT2LMHeadModel
        tokenizer_s = 0.0
    import_s = time.perf_counter() - t0 - tokenizer_s
    rss_imports = peak_rss_mb()

    t1 = time.perf_counter()
    if which == "ours":
        model = load_model(directory, dtype=dtype).model
    else:
        model = GPT2LMHeadModel.from_pretrained(directory, dtype=dtype).eval()
    load_s = time.perf_counter() - t1
    rss_loaded = peak_rss_mb()

    idx = torch.randint(0, 50257, (1, 8))
    t2 = time.perf_counter()
    with torch.no_grad():
        model(idx)
    first_forward_s = time.perf_counter() - t2
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"loader": which, "import_s": import_s, "tokenizer_s": tokenizer_s,
                      "load_s": load_s, "first_forward_s": first_forward_s, "rss_after_imports_mb": rss_imports,
                      "peak_rss_load_mb": rss_loaded, "peak_rss_forward_mb": peak_rss_mb(),
                      "params": params}))


def write_checkpoint(directory):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(directory)


def run_child(which, directory, dtype_name):
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": here, "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", which,
                          "--dir", directory, "--dtype", dtype_name],
                         env=env, capture_output=True, text=True, cwd=here)
    if out.returncode != 0:
        raise RuntimeError(f"{which} child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per loader")
    p.add_argument("--dir", help="an existing Hugging Face GPT-2 directory (default: write one)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--child", choices=LOADERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.dir, args.dtype)
        return 0
    if args.repeats < 1:
        p.error(f"--repeats={args.repeats}: must be >= 1")

    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        directory = args.dir
        if directory is None:
            directory = tmp
            t = time.perf_counter()
            write_checkpoint(directory)
            print(f"wrote a random 124M GPT-2 to {directory} in {time.perf_counter() - t:.1f} s")
        size_mb = sum(os.path.getsize(os.path.join(directory, f))
                      for f in os.listdir(directory)) / 2**20
        runs = {w: [] for w in LOADERS}
        for _ in range(args.repeats):  # interleaved, so a busy spell hurts both alike
            for which in LOADERS:
                runs[which].append(run_child(which, directory, args.dtype))

    summary = {}
    for which, rs in runs.items():
        summary[which] = {
            "load_s": statistics.median(r["load_s"] for r in rs),
            "import_s": statistics.median(r["import_s"] for r in rs),
            "first_forward_s": statistics.median(r["first_forward_s"] for r in rs),
            "rss_after_imports_mb": max(r["rss_after_imports_mb"] for r in rs),
            "peak_rss_load_mb": max(r["peak_rss_load_mb"] for r in rs),
            "peak_rss_forward_mb": max(r["peak_rss_forward_mb"] for r in rs),
            "params": rs[0]["params"],
        }
        summary[which]["load_rss_delta_mb"] = (summary[which]["peak_rss_load_mb"]
                                               - summary[which]["rss_after_imports_mb"])
    tok_s = statistics.median(r["tokenizer_s"] for r in runs["ours"])

    print(f"checkpoint: {size_mb:.0f} MiB on disk, dtype {args.dtype}, "
          f"median of {args.repeats} fresh processes (peak RSS: max)")
    header = (f"{'loader':<13} {'import s':>9} {'load s':>8} {'1st fwd s':>10} {'RSS imports':>12} "
              f"{'peak load':>10} {'load delta':>11} {'peak fwd':>9}  (MiB)")
    print(header)
    print("-" * len(header))
    for which, s in summary.items():
        print(f"{which:<13} {s['import_s']:>9.2f} {s['load_s']:>8.2f} {s['first_forward_s']:>10.2f} "
              f"{s['rss_after_imports_mb']:>12.0f} {s['peak_rss_load_mb']:>10.0f} "
              f"{s['load_rss_delta_mb']:>11.0f} {s['peak_rss_forward_mb']:>9.0f}")
    print(f"(ours also builds the GPT-2 tokenizer once per process: {tok_s:.2f} s, not in 'load s')")
    print(json.dumps({"bench": "load", "dtype": args.dtype, "repeats": args.repeats,
                      "checkpoint_mib": round(size_mb, 1), **{
                          w: {k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()}
                          for w, s in summary.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
