"""bench_peers.py, the llama.cpp runner behind `bench.py --peers`, without llama.cpp: reading
its tools' real output, finding a build, the GGUF plan and the converter's view, the ratios
and targets, and the scripts' edge (a fake build whose tools print that real output).

The fixtures are output of llama.cpp commit 0c1e570 (the llama-cpp-python 0.3.36 sdist's
vendor/llama.cpp), built on this project's 2-core machine and run on the random GPT-2 124M
GGUF (f32), 2 threads, beside other helpers' busy processes (hence the low rates: llama.cpp's
threads spin at barriers); llama-bench's objects keep the fields we read and a few more, as
printed.
"""

import json
import os
import stat
import sys
from pathlib import Path

import pytest

import bench
import bench_peers
from bench_peers import LlamaCpp, PeerError
from conftest import run_python
from nanosample.settings import SettingsError

# `llama-bench -m gpt2-124M-random-f32.gguf -t 2 -ngl 0 -r 1 -o json -p 16 -n 0` (stdout)
LLAMA_BENCH_PROMPT = """[
  {
    "build_commit": "0c1e570",
    "build_number": 1,
    "cpu_info": "AMD EPYC",
    "backends": "CPU",
    "model_type": "gpt2 0.1B all F32",
    "n_threads": 2,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": 0,
    "flash_attn": -1,
    "n_prompt": 16,
    "n_gen": 0,
    "n_depth": 0,
    "test_time": "2026-12-02T10:56:34Z",
    "avg_ns": 1211896799,
    "stddev_ns": 0,
    "avg_ts": 13.202444,
    "stddev_ts": 0.000000,
    "samples_ns": [ 1211896799 ],
    "samples_ts": [ 13.2024 ]
  }
]
"""
# the same with `-p 0 -n 128 -d 16`
LLAMA_BENCH_DECODE = """[
  {
    "build_commit": "0c1e570",
    "build_number": 1,
    "cpu_info": "AMD EPYC",
    "backends": "CPU",
    "model_type": "gpt2 0.1B all F32",
    "n_threads": 2,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": 0,
    "flash_attn": -1,
    "n_prompt": 0,
    "n_gen": 128,
    "n_depth": 16,
    "test_time": "2026-12-02T10:56:37Z",
    "avg_ns": 49159794966,
    "stddev_ns": 0,
    "avg_ts": 2.603754,
    "stddev_ts": 0.000000,
    "samples_ns": [ 49159794966 ],
    "samples_ts": [ 2.60375 ]
  }
]
"""
# `llama-batched-bench -m ... -t 2 -tb 2 -ngl 0 -c 1152 -b 512 -ub 512 -npp 16 -ntg 128 -npl 8
# -pps --output-format jsonl`: stdout (its logs go to stderr)
BATCHED_BENCH = """{"n_kv_max": 2048, "n_batch": 512, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 1, "n_gpu_layers": 0, "n_threads": 2, "n_threads_batch": 2, "pp": 16, "tg": 128, "pl": 8, "n_kv": 1152, "t_pp": 0.411546, "speed_pp": 38.877792, "t_tg": 185.920563, "speed_tg": 5.507729, "t": 186.332108, "speed": 5.581432}

"""


# ---------------------------------------------------------------------------------------------
# Reading the tools' output

def test_llama_bench_json_is_read():
    prompt, = bench_peers.parse_llama_bench(LLAMA_BENCH_PROMPT)
    decode, = bench_peers.parse_llama_bench(LLAMA_BENCH_DECODE)
    assert (prompt["n_prompt"], prompt["n_gen"], prompt["n_depth"]) == (16, 0, 0)
    assert (decode["n_prompt"], decode["n_gen"], decode["n_depth"]) == (0, 128, 16)
    assert prompt["tokens_per_s"] == 13.202444
    assert decode["tokens_per_s"] == 2.603754
    assert prompt["threads"] == decode["threads"] == 2
    assert decode["build"] == "1 (0c1e570)"


def test_batched_bench_jsonl_is_read_and_other_lines_skipped():
    log = "0.00.311.937 W llama_context: n_ctx is not divisible by n_seq_max\n"
    row, = bench_peers.parse_batched_bench(log + BATCHED_BENCH)
    assert row == {"batch": 8, "prompt_tokens": 16, "new_tokens": 128, "threads": 2,
                   "shared_prompt": True, "prompt_tokens_per_s": 38.877792,
                   "decode_tokens_per_s": 5.507729}


@pytest.mark.parametrize("parse, text, message", [
    (bench_peers.parse_llama_bench, "error: failed to load model", "cannot read its JSON"),
    (bench_peers.parse_llama_bench, '[{"n_prompt": 16}]', "cannot read its JSON"),
    (bench_peers.parse_batched_bench, '{"pl": 8, "pp": 16}', "cannot read a result line"),
])
def test_unreadable_output_is_a_peer_error(parse, text, message):
    with pytest.raises(PeerError, match=message):
        parse(text)


# ---------------------------------------------------------------------------------------------
# Finding a build and its converter

def make_program(path, text="#!/bin/sh\nexit 0\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_no_build_on_path_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SettingsError) as e:
        bench_peers.find_build(None)
    message = str(e.value)
    assert message.startswith("--peers: no llama.cpp build found (llama-bench is not on PATH")
    assert "cmake" in message and "--target llama-bench llama-batched-bench" in message
    assert "\n" not in message


def test_the_build_is_found_on_path_through_a_link(tmp_path, monkeypatch):
    real = make_program(tmp_path / "llama.cpp" / "build" / "bin" / "llama-bench")
    (tmp_path / "path").mkdir()
    (tmp_path / "path" / "llama-bench").symlink_to(real)
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    assert bench_peers.find_build(None) == real.parent.resolve()


@pytest.mark.parametrize("given", [".", "llama.cpp", "llama.cpp/build", "llama.cpp/build/bin"])
def test_the_build_is_found_from_the_folder_or_above_it(tmp_path, given):
    (tmp_path / "llama-bench").write_text("not a program")  # not executable: not a build
    real = make_program(tmp_path / "llama.cpp" / "build" / "bin" / "llama-bench")
    if given == ".":
        with pytest.raises(SettingsError, match="no llama-bench in it, its bin/ or its build/bin/"):
            bench_peers.find_build(str(tmp_path))
    else:
        assert bench_peers.find_build(str(tmp_path / given)) == real.parent.resolve()


def test_a_file_or_a_missing_folder_is_not_a_build(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(SettingsError, match=r"^--llamacpp=.*/f: is not a folder"):
        bench_peers.find_build(str(tmp_path / "f"))
    with pytest.raises(SettingsError, match=r"^--llamacpp=.*/nope: no such folder"):
        bench_peers.find_build(str(tmp_path / "nope"))


def test_the_converter_is_found_above_the_build_or_where_named(tmp_path):
    bin_dir = make_program(tmp_path / "llama.cpp" / "build" / "bin" / "llama-bench").parent
    assert bench_peers.find_converter(bin_dir, None) is None
    script = tmp_path / "llama.cpp" / "convert_hf_to_gguf.py"
    script.write_text("")
    assert bench_peers.find_converter(bin_dir, None) == script
    assert bench_peers.find_converter(bin_dir, str(tmp_path / "llama.cpp")) == script.resolve()
    with pytest.raises(SettingsError, match="^--llamacpp_convert=.*: no convert_hf_to_gguf.py"):
        bench_peers.find_converter(bin_dir, str(tmp_path))


# ---------------------------------------------------------------------------------------------
# The GGUF files

def test_gguf_plan_uses_what_is_there_and_converts_what_is_missing_or_older(tmp_path):
    checkpoint = tmp_path / "gpt2-124M-random"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_text("weights")
    os.utime(checkpoint / "model.safetensors", (1000, 1000))
    ggufs = tmp_path / "gguf"
    ggufs.mkdir()
    (ggufs / "gpt2-124M-random-f32.gguf").write_text("")   # newer than the weights
    (ggufs / "gpt2-124M-random-f16.gguf").write_text("")
    os.utime(ggufs / "gpt2-124M-random-f16.gguf", (500, 500))  # older: made from old weights
    with_converter = LlamaCpp(tmp_path, tmp_path / "convert_hf_to_gguf.py")
    paths, to_convert = bench_peers.gguf_plan(checkpoint, ggufs, ("f32", "f16", "q8_0"),
                                              with_converter, convertible=True)
    assert paths == {t: ggufs / f"gpt2-124M-random-{t}.gguf" for t in ("f32", "f16", "q8_0")}
    assert to_convert == ["f16", "q8_0"]

    # without a converter, what is there is used as it is; what is missing stops the run
    without = LlamaCpp(tmp_path, None)
    assert bench_peers.gguf_plan(checkpoint, ggufs, ("f32", "f16"), without, True)[1] == []
    with pytest.raises(SettingsError, match=r"no gpt2-124M-random-q8_0.gguf, and no "
                                            r"convert_hf_to_gguf.py was found"):
        bench_peers.gguf_plan(checkpoint, ggufs, ("f32", "q8_0"), without, True)
    with pytest.raises(SettingsError, match="random is not a local Hugging Face GPT-2 folder"):
        bench_peers.gguf_plan(checkpoint, ggufs, ("q8_0",), with_converter, convertible=False)


FAKE_CONVERTER = """
import json, sys
from pathlib import Path
view, outfile = Path(sys.argv[1]), sys.argv[sys.argv.index("--outfile") + 1]
config = json.loads((view / "config.json").read_text())
if "--fail" in (view / "model.safetensors").read_text():
    sys.exit("ValueError: cannot convert this one")
assert config["n_ctx"] == config["n_positions"] == 1024, config
vocab = json.loads((view / "vocab.json").read_text())
assert vocab["Hello"] == 15496 and (view / "merges.txt").read_text().startswith("#version")
Path(outfile).write_text(sys.argv[sys.argv.index("--outtype") + 1])
"""


def test_the_converter_sees_n_ctx_and_gpt2s_tokenizer_and_writes_whole(tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 1024}))
    (checkpoint / "model.safetensors").write_text("weights")
    converter = tmp_path / "convert_hf_to_gguf.py"
    converter.write_text(FAKE_CONVERTER)
    out = tmp_path / "gguf" / "ckpt-q8_0.gguf"
    bench_peers.convert_to_gguf(converter, checkpoint, out, "q8_0")
    assert out.read_text() == "q8_0"
    assert sorted(p.name for p in out.parent.iterdir()) == ["ckpt-q8_0.gguf"]  # no view left
    assert json.loads((checkpoint / "config.json").read_text()) == {
        "model_type": "gpt2", "n_positions": 1024}  # the checkpoint itself is not changed

    (checkpoint / "model.safetensors").write_text("--fail")
    with pytest.raises(PeerError, match="^convert_hf_to_gguf.py --outtype f16 failed: "
                                        "ValueError: cannot convert this one$"):
        bench_peers.convert_to_gguf(converter, checkpoint, tmp_path / "gguf" / "x.gguf", "f16")
    assert sorted(p.name for p in out.parent.iterdir()) == ["ckpt-q8_0.gguf"]


# ---------------------------------------------------------------------------------------------
# Ratios and targets

RESULTS = [  # as Peers.results() makes them
    {"type": "f32", "batch": 1, "new_tokens": 128, "prompt_tokens_per_s": 400.0,
     "decode_tokens_per_s": 50.0},
    {"type": "f16", "batch": 1, "new_tokens": 128, "prompt_tokens_per_s": 500.0,
     "decode_tokens_per_s": 100.0},
    {"type": "f32", "batch": 8, "new_tokens": 128, "prompt_tokens_per_s": 390.0,
     "decode_tokens_per_s": 160.0},
]


def test_ratios_pair_each_type_with_our_precisions_and_are_null_where_ours_is_missing():
    ours = {("fp32", 1, 128): {"decode_tokens_per_s": 45.0, "prompt_tokens_per_s": 380.0},
            ("fp32", 8, 128): {"decode_tokens_per_s": 208.0, "prompt_tokens_per_s": 195.0},
            ("bf16", 1, 128): {"decode_tokens_per_s": 110.0, "prompt_tokens_per_s": 600.0}}
    got = {(r["llamacpp"], r["ours"], r["batch"]): (r["decode_vs_llamacpp"], r["prompt_vs_llamacpp"])
           for r in bench_peers.peer_ratios(RESULTS, ours)}
    assert got == {("f32", "fp32", 1): (pytest.approx(0.9), pytest.approx(0.95)),
                   ("f16", "fp16", 1): (None, None),
                   ("f16", "bf16", 1): (pytest.approx(1.1), pytest.approx(1.2)),
                   ("f32", "fp32", 8): (pytest.approx(1.3), pytest.approx(0.5))}

    targets = {t["target"]: (t["value"], t["met"]) for t in
               bench_peers.peer_targets({"ratios": bench_peers.peer_ratios(RESULTS, ours)})}
    assert targets == {
        "decode tokens/s vs llama.cpp f32, ours fp32, batch 1": (pytest.approx(0.9), False),
        "decode tokens/s vs llama.cpp f16, ours bf16, batch 1": (pytest.approx(1.1), True),
        "decode tokens/s vs llama.cpp f16, ours fp16, batch 1": (None, None),
        "decode tokens/s vs llama.cpp q8_0, ours int8, batch 1": (None, None),
        "decode tokens/s vs llama.cpp f32, ours fp32, batch 8": (pytest.approx(1.3), True)}


def test_bench_gives_the_ratios_its_first_samplers_rows():
    row = {"ours": {"decode_tokens_per_s": 45.0, "prefill_ms": 40.0}, "hf": {}}
    results = [{"batch": 1, "new_tokens": 128, "sampler": "top_k", "systems": row},
               {"batch": 1, "new_tokens": 128, "sampler": "top_p",
                "systems": {"ours": {"decode_tokens_per_s": 1.0, "prefill_ms": 1.0}}}]
    assert bench.ours_for_peers(results, "top_k", 16) == {
        ("fp32", 1, 128): {"decode_tokens_per_s": 45.0, "prompt_tokens_per_s": 400.0}}


# ---------------------------------------------------------------------------------------------
# The scripts' edge, with a fake build printing the real output above

FAKE_TOOL = """#!{python}
import json, sys
args = sys.argv[1:]
with open({log!r}, "a") as log:
    log.write(" ".join(["{name}"] + args) + "\\n")
value = lambda flag: int(args[args.index(flag) + 1])
if "{name}" == "llama-bench":
    test, = json.loads({prompt!r} if value("-n") == 0 else {decode!r})
    test.update(n_prompt=value("-p"), n_gen=value("-n"), n_depth=value("-d") if "-d" in args else 0)
    print(json.dumps([test], indent=2))
else:
    for line in {batched!r}.splitlines():
        if line.startswith("{{"):
            r = json.loads(line)
            r.update(pp=value("-npp"), tg=value("-ntg"), pl=value("-npl"))
            line = json.dumps(r)
        print(line)
"""


@pytest.fixture
def fake_build(tmp_path):
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "llama.cpp" / "build" / "bin"
    for name in ("llama-bench", "llama-batched-bench"):
        make_program(bin_dir / name, FAKE_TOOL.format(
            python=sys.executable, log=str(log), name=name, prompt=LLAMA_BENCH_PROMPT,
            decode=LLAMA_BENCH_DECODE, batched=BATCHED_BENCH))
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    for t in ("f32", "q8_0"):
        (gguf / f"gpt2-124M-random-{t}.gguf").write_text("")
    return tmp_path, log


def test_bench_peers_alone_runs_the_tools_with_our_settings(fake_build):
    tmp, log = fake_build
    code, out, err = run_python("bench_peers.py", f"--llamacpp={tmp / 'llama.cpp'}",
                                f"--gguf_dir={tmp / 'gguf'}", f"--cache_dir={tmp / 'cache'}",
                                "--types=f32,q8_0", "--batch_sizes=1,8", "--repeats=2",
                                "--threads=2")
    assert code == 0, err
    report = json.loads(out.splitlines()[-1])
    got = {(r["type"], r["batch"]): (r["prompt_tokens_per_s"], r["decode_tokens_per_s"],
                                      r["repeats"]) for r in report["results"]}
    prompt, decode = json.loads(LLAMA_BENCH_PROMPT)[0], json.loads(LLAMA_BENCH_DECODE)[0]
    batched = json.loads([x for x in BATCHED_BENCH.splitlines() if x.startswith("{")][0])
    for t in ("f32", "q8_0"):
        assert got[(t, 1)] == (pytest.approx(prompt["avg_ts"]), pytest.approx(decode["avg_ts"]), 2)
        assert got[(t, 8)] == (pytest.approx(batched["speed_pp"]),
                               pytest.approx(batched["speed_tg"]), 2)
    calls = log.read_text().splitlines()
    # per type: a warm-up of each tool, then per repeat llama-bench twice and batched-bench once
    assert len(calls) == 2 * (3 + 2 * 3)
    assert f"llama-bench -m {tmp / 'gguf' / 'gpt2-124M-random-f32.gguf'} -t 2 -ngl 0 -r 1 -o json " \
           "-p 0 -n 128 -d 16" in calls
    assert any(c.startswith("llama-batched-bench") and " -t 2 -tb 2 " in c and
               c.endswith("-c 1152 -b 512 -ub 512 -npp 16 -ntg 128 -npl 8 -pps --output-format jsonl")
               for c in calls)


def test_a_failing_tool_is_one_line_and_exit_code_1(fake_build):
    tmp, _ = fake_build
    make_program(tmp / "llama.cpp" / "build" / "bin" / "llama-bench",
                 "#!/bin/sh\necho 'llama_model_load: error loading model: bad magic' >&2\nexit 1\n")
    code, out, err = run_python("bench_peers.py", f"--llamacpp={tmp / 'llama.cpp'}",
                                f"--gguf_dir={tmp / 'gguf'}", f"--cache_dir={tmp / 'cache'}",
                                "--types=f32", "--batch_sizes=1", "--threads=2")
    assert code == 1 and "Traceback" not in err
    assert err.splitlines() == ["error: llama.cpp: llama-bench failed (exit code 1): "
                                "llama_model_load: error loading model: bad magic"]


@pytest.mark.parametrize("script", ["bench.py", "bench_peers.py"])
def test_a_bad_llamacpp_path_is_one_line_and_exit_code_2(tmp_path, script):
    args = ["--peers"] if script == "bench.py" else []
    code, out, err = run_python(script, *args, f"--llamacpp={tmp_path / 'nope'}")
    assert code == 2 and out == ""
    assert err.splitlines() == [f"error: --llamacpp={tmp_path / 'nope'}: no such folder "
                                "(give llama.cpp's build/bin folder)"]


def test_bench_peers_without_any_build_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-bench on it
    code, out, err = run_python("bench.py", "--peers", f"--cache_dir={tmp_path}")
    assert code == 2 and out == ""
    line, = err.splitlines()
    assert line.startswith("error: --peers: no llama.cpp build found") and "cmake" in line


def test_bench_runs_llama_cpp_between_its_own_runs_and_reports_the_ratios(fake_build):
    import torch
    import transformers

    tmp, log = fake_build
    tiny = tmp / "tiny"
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=32, n_positions=64)).save_pretrained(tiny)
    (tmp / "gguf" / "tiny-f32.gguf").write_text("")
    code, out, err = run_python("bench.py", f"--init_from={tiny}", "--peers",
                                f"--llamacpp={tmp / 'llama.cpp'}", f"--gguf_dir={tmp / 'gguf'}",
                                "--peer_types=f32", "--systems=ours", "--samplers=top_k,top_p",
                                "--batch_sizes=1,8", "--new_tokens=8", "--repeats=2",
                                "--cold_starts=0", "--threads=1")
    assert code == 0, err
    report = json.loads(out.splitlines()[-1])
    peers = report["peers"]
    assert peers["llamacpp"]["threads"] == 1 and peers["ours_sampler"] == "top_k"
    assert [(r["type"], r["batch"], r["new_tokens"], r["repeats"]) for r in peers["results"]] == [
        ("f32", 1, 8, 2), ("f32", 8, 8, 2)]
    decode = json.loads(LLAMA_BENCH_DECODE)[0]["avg_ts"]
    ours = {r["batch"]: r["systems"]["ours"] for r in report["results"] if r["sampler"] == "top_k"}
    ratios = {(r["ours"], r["batch"]): r["decode_vs_llamacpp"] for r in peers["ratios"]}
    assert ratios[("fp32", 1)] == pytest.approx(ours[1]["decode_tokens_per_s"] / decode)
    assert ratios[("fp32", 8)] is not None
    # runs once per repeat, with the first sampler only (llama.cpp does not sample), -t as ours
    calls = log.read_text().splitlines()
    assert sum(" -n 8 -d 16" in c for c in calls) == 2
    assert sum(c.startswith("llama-batched-bench") and "-npl 8" in c for c in calls) == 2
    assert all(" -t 1 " in c for c in calls)
    assert "llama.cpp beside ours" in out
    targets = {t["target"]: t["met"] for t in report["targets"]}
    assert targets["decode tokens/s vs llama.cpp q8_0, ours int8, batch 1"] is None
