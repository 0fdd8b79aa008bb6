"""sample.py end to end, as a user runs it: a subprocess with cwd at the repo root.

Three models: a transformers-written tiny GPT-2 directory (GPT-2's BPE vocabulary), a tiny
character model in the native format (written here with loader.save_native), and the shipped
checkpoints/shakespeare_char once it exists. Bad input of every kind must give exit code 2
and one stderr line `error: ...` naming the flag or file, never a traceback.
"""

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "checkpoints", "shakespeare_char")
SEPARATOR = "---------------"
CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'\n"))
SPEED_LINE = re.compile(r"generated (\d+) tokens in \d+\.\d\d s \(\d+\.\d tokens/s\)")


def sample_py(*args, cwd=REPO):
    """Run sample.py; (exit code, stdout, stderr)."""
    # one thread: the models are tiny and several runs share two cores
    env = dict(os.environ, PYTHONIOENCODING="utf-8", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), *args], cwd=cwd,
                       capture_output=True, text=True, encoding="utf-8", env=env, timeout=300)
    return p.returncode, p.stdout, p.stderr


def samples_of(stdout):
    """The samples of nanoGPT's output format: each text, then a line of dashes."""
    assert stdout.endswith("\n" + SEPARATOR + "\n"), stdout[-200:]
    return stdout.split("\n" + SEPARATOR + "\n")[:-1]


def tokens_reported(stderr):
    """The count on the last stderr line, which gives the speed."""
    m = SPEED_LINE.fullmatch(stderr.strip().splitlines()[-1])
    assert m, stderr
    return int(m.group(1))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Models and inputs, made once: {name: path}."""
    tmp = tmp_path_factory.mktemp("cli")
    from transformers import GPT2Config, GPT2LMHeadModel

    from nanosample import loader
    from nanosample.model import GPT, GPTConfig
    from nanosample.tokenizer import CharTokenizer

    torch.manual_seed(0)
    gpt2 = tmp / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)).save_pretrained(gpt2)
    char = tmp / "tiny-char"
    model = GPT(GPTConfig(block_size=32, vocab_size=len(CHARS), n_layer=1, n_head=2, n_embd=16))
    loader.save_native(model, CharTokenizer(CHARS), char)

    def write(name, data):
        path = tmp / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        return str(path)

    return {
        "tmp": str(tmp), "gpt2": str(gpt2), "char": str(char),
        "hello": write("hello.txt", "Hello"),
        "latin1": write("latin1.txt", "caf\xe9".encode("latin-1")),
        "long": write("long.txt", "the " * 100),
        "exists": write("trace.jsonl", "someone's file\n"),
        "unknown_key": write("unknown.toml", "tmperature = 0.5\n"),
        "bad_toml": write("bad.toml", "temperature = = 1\n"),
        "bad_type": write("bad_type.toml", 'max_new_tokens = "ten"\n'),
        "bad_value": write("bad_value.toml", "top_p = 1.5\n"),
        "evil_py": write("evil.py", f"import os\nos.system('touch {tmp}/marker')\n"),
        "yaml": write("c.yaml", "top_k: 5\n"),
        "greedy4": write("greedy4.toml", "temperature = 0.0\nmax_new_tokens = 4\nnum_samples = 2\n"),
        "six": write("six.py", "# nanoGPT style\nmax_new_tokens = 6\nseed = 7\n"),
    }


# ---------------------------------------------------------------------------------------------
# Bad input: (name, arguments, what the error line must contain). {x} is files[x]. Every
# sampler value's check is tested in test_settings.py; a few here show they reach the CLI.

BAD = [
    ("unknown flag", ["--tmperature=0.5"], "--tmperature: unknown flag; did you mean --temperature?"),
    ("unknown single-dash flag", ["-n", "3"], "-n: unknown flag"),
    ("int flag not an int", ["--num_samples=three"], "--num_samples: expected an integer"),
    ("int flag given a float", ["--max_new_tokens", "1.5"], "--max_new_tokens: expected an integer"),
    ("float flag not a number", ["--temperature=hot"], "--temperature: expected a number"),
    ("bool flag not a bool", ["--compile=maybe"], "--compile: expected true or false"),
    ("flag without its value", ["--seed"], "--seed: needs a value"),
    ("negative temperature", ["--temperature=-1"], "--temperature=-1.0: must be"),
    ("top_p above 1", ["--top_p=1.5"], "--top_p=1.5: must be a number > 0 and <= 1"),
    ("no samples", ["--num_samples=0"], "--num_samples=0: must be an integer >= 1"),
    ("negative length", ["--max_new_tokens=-1"], "--max_new_tokens=-1: must be"),
    ("negative seed", ["--seed=-1"], "--seed=-1: must be an integer >= 0"),
    ("zero batch size", ["--batch_size=0"], "--batch_size=0: must be"),
    ("unknown device", ["--device=gpu"], "--device=gpu: must be auto, cpu, cuda, cuda:N or mps"),
    ("unknown dtype", ["--dtype=float64"], "--dtype=float64: must be"),
    ("bad logit bias", ["--logit_bias=50256=-100"], "--logit_bias=50256=-100: must be ID:BIAS pairs"),
    ("empty stop string", ["--stop="], "--stop='': stop strings must not be empty"),
    ("explain sample out of range", ["--num_samples=2", "--explain_sample=2"],
     "--explain_sample=2: must be >= 0 and < num_samples (2)"),
    ("plot not an image", ["--plot=picture.txt"], "--plot=picture.txt: must be a file path ending"),
    ("missing config file", ["no/such/config.toml"], "no/such/config.toml: no such config file"),
    ("flag without dashes", ["top_k=5"], "top_k=5: no such config file (flags start with --"),
    ("config is a directory", ["--config", "{tmp}"], "{tmp}: is a directory"),
    ("config of unknown kind", ["{yaml}"], "{yaml}: config files must be .toml"),
    ("unknown config key", ["{unknown_key}"], "{unknown_key}: unknown key 'tmperature'; did you mean 'temperature'?"),
    ("invalid TOML", ["{bad_toml}"], "{bad_toml}: invalid TOML"),
    ("config value of the wrong type", ["{bad_type}"], "{bad_type}: max_new_tokens: expected an integer"),
    ("config value out of range", ["{bad_value}"], "{bad_value}: top_p=1.5: must be"),
    ("python config with code", ["{evil_py}"], "{evil_py}:1: only `key = literal` lines"),
    ("missing checkpoint", ["--init_from={tmp}/no-model"], "no-model"),
    ("unknown model name", ["--init_from=gtp2"], "did you mean 'gpt2'?"),
    ("resume without ckpt.pt", ["--init_from=resume", "--out_dir={tmp}/no-out"], "ckpt.pt"),
    ("missing prompt file", ["--start=FILE:{tmp}/none.txt"], "--start=FILE:{tmp}/none.txt: no such file"),
    ("prompt file not UTF-8", ["--start=FILE:{latin1}"], "--start=FILE:{latin1}: not UTF-8 text (byte 0xe9"),
    ("FILE: without a path", ["--start=FILE:"], "--start=FILE:: needs a file path"),
    ("prompt longer than the context", ["--init_from={gpt2}", "--start=FILE:{long}"],
     "--start=FILE:{long}: the prompt is 101 tokens, longer than this model's context of 64 "),
    ("character outside the vocabulary", ["--init_from={char}", "--start=café"],
     "--start: character 'é' (position 3 of the text) is not in this model's"),
    ("banned id outside the vocabulary", ["--init_from={gpt2}", "--ban=60000"],
     "--ban=60000: token ids must be < 50257"),
    ("device the machine lacks", ["--init_from={char}", "--device=cuda:99"], "--device=cuda:99: "),
    ("existing explain file", ["--explain_file={exists}"],
     "--explain_file={exists}: the file exists; choose another path, or add --overwrite"),
]


@pytest.fixture(scope="module")
def bad_results(files):
    """Run every bad case at once: they are independent, and most never load torch."""
    def run(case):
        name, args, _ = case
        return name, sample_py(*[a.format(**files) for a in args])
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(run, BAD))


def test_the_bad_input_table_is_big_enough():
    assert len(BAD) >= 20 and len({name for name, _, _ in BAD}) == len(BAD)


@pytest.mark.parametrize("name, args, expected", BAD, ids=[name for name, _, _ in BAD])
def test_bad_input_is_one_error_line_and_exit_2(bad_results, files, name, args, expected):
    code, out, err = bad_results[name]
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected.format(**files) in lines[0]
    assert code == 2
    assert out == ""


def test_python_config_code_was_never_run(bad_results, files):
    assert not os.path.exists(os.path.join(files["tmp"], "marker"))


def test_help_lists_every_flag():
    from dataclasses import fields

    from nanosample.settings import SampleSettings
    code, out, err = sample_py("--help")
    assert code == 0 and err == ""
    for f in fields(SampleSettings):
        assert f"--{f.name}=" in out


# ---------------------------------------------------------------------------------------------
# A transformers-written tiny GPT-2 (the BPE vocabulary)

@pytest.fixture(scope="module")
def gpt2_runs(files):
    """The runs the GPT-2 tests read, made in parallel: {name: (code, stdout, stderr)}."""
    common = ["--init_from=" + files["gpt2"], "--max_new_tokens=6", "--stop_at_eot=False"]
    runs = {
        "three": common + ["--start=Hello", "--num_samples=3", "--seed=1"],
        "three again": common + ["--start", "Hello", "--num_samples", "3", "--seed", "1"],
        "other seed": common + ["--start=Hello", "--num_samples=3", "--seed=2"],
        "file prompt": common + ["--start=FILE:" + files["hello"], "--num_samples=1", "--seed=1"],
        "empty prompt": common + ["--start=", "--num_samples=1"],
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(runs, pool.map(lambda args: sample_py(*args), runs.values())))


def test_gpt2_output_format(gpt2_runs):
    code, out, err = gpt2_runs["three"]
    assert code == 0, err
    texts = samples_of(out)
    assert len(texts) == 3
    assert all(t.startswith("Hello") and len(t) > len("Hello") for t in texts)
    assert 0 < tokens_reported(err) <= 18
    assert "Traceback" not in err


def test_gpt2_same_seed_same_text_other_seed_other_text(gpt2_runs):
    assert gpt2_runs["three"][1] == gpt2_runs["three again"][1]
    assert gpt2_runs["three"][1] != gpt2_runs["other seed"][1]
    assert len(set(samples_of(gpt2_runs["three"][1]))) == 3  # each sample has its own draws


def test_gpt2_file_prompt_streams_sample_zero(gpt2_runs):
    code, out, err = gpt2_runs["file prompt"]
    assert code == 0, err
    # Sample 0 of a seed is the same text whatever num_samples is, streamed or not.
    assert samples_of(out) == samples_of(gpt2_runs["three"][1])[:1]


def test_gpt2_empty_prompt_starts_from_endoftext(gpt2_runs):
    code, out, err = gpt2_runs["empty prompt"]
    assert code == 0, err
    [text] = samples_of(out)
    assert text and not text.startswith("<|endoftext|>")


# ---------------------------------------------------------------------------------------------
# A tiny character model in the native format

def test_char_config_precedence_and_python_config(files):
    # greedy4.toml: greedy, 4 tokens, 2 samples; six.py: 6 tokens; the flag: 1 sample.
    code, out, err = sample_py(f"--init_from={files['char']}", "--start=To be", files["greedy4"],
                               files["six"], "--num_samples=1")
    assert code == 0, err
    [text] = samples_of(out)
    assert tokens_reported(err) == 6
    assert text.startswith("To be") and len(text) == len("To be") + 6
    assert set(text) <= set(CHARS)
    # greedy: another seed gives the same text; flags beat both files
    code, out2, err = sample_py(f"--init_from={files['char']}", "--start=To be", files["greedy4"],
                                "--seed=99", files["six"], "--max_new_tokens=3")
    assert code == 0, err
    assert samples_of(out2) == [text[:len("To be") + 3]] * 2
    assert tokens_reported(err) == 6


# ---------------------------------------------------------------------------------------------
# The shipped model

needs_shipped = pytest.mark.skipif(
    not os.path.isdir(SHIPPED), reason="checkpoints/shakespeare_char is not trained yet (train.py)")


@needs_shipped
def test_shipped_model_defaults_format_and_seed(files):
    args = ["--num_samples=2", "--max_new_tokens=40"]
    code, out, err = sample_py(*args)  # every other setting is the default
    assert code == 0, err
    texts = samples_of(out)
    assert len(texts) == 2 and all(t.startswith("\n") and len(t) == 41 for t in texts)
    assert tokens_reported(err) == 80
    assert sample_py(*args)[1] == out
    assert sample_py(*args, "--seed=7")[1] != out


@needs_shipped
def test_shipped_model_preset_file_prompt_and_flags(files, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("ROMEO:\n", encoding="utf-8")
    args = ["configs/greedy.toml", f"--start=FILE:{prompt}", "--max_new_tokens=30"]
    code, out, err = sample_py(*args)
    assert code == 0, err
    [text] = samples_of(out)
    assert text.startswith("ROMEO:\n") and len(text) == len("ROMEO:\n") + 30
    assert sample_py(*args, "--seed=5")[1] == out  # greedy does not depend on the seed


# ---------------------------------------------------------------------------------------------
# In-process pieces of sample.py

def test_printer_keeps_sample_order_and_streams_the_current_sample():
    import io

    from nanosample.generate import Piece
    from sample import SamplePrinter

    pieces = [Piece(1, "b1", 5, False), Piece(0, "a1", 3, False), Piece(1, "b2", 6, True, "eot"),
              Piece(0, "a2", 4, False), Piece(0, "a3", 7, True, "length")]
    out = io.StringIO()
    printer = SamplePrinter(out, "P:", 2, stream=True)
    seen = []
    for piece in pieces:
        printer.add(piece)
        seen.append(out.getvalue())
    printer.finish()
    # sample 0 is written as it comes; sample 1, finished first, waits for its turn
    assert seen[:2] == ["P:", "P:a1"]
    assert seen[2] == "P:a1"
    assert out.getvalue() == f"P:a1a2a3\n{SEPARATOR}\nP:b1b2\n{SEPARATOR}\n"

    out = io.StringIO()
    printer = SamplePrinter(out, "P:", 2, stream=False)
    for piece in pieces[:4]:
        printer.add(piece)
    assert out.getvalue() == ""  # nothing until sample 0 is done
    printer.add(pieces[4])
    assert out.getvalue() == f"P:a1a2a3\n{SEPARATOR}\nP:b1b2\n{SEPARATOR}\n"


def test_explain_flags_fail_clearly_without_explain_py(monkeypatch):
    from sample import import_explain
    from nanosample.settings import SampleSettings, SettingsError

    monkeypatch.setitem(sys.modules, "nanosample.explain", None)  # the import now fails
    for settings, flag in [(SampleSettings(explain=True), "--explain"),
                           (SampleSettings(explain_file="t.jsonl"), "--explain_file"),
                           (SampleSettings(plot="p.png"), "--plot")]:
        with pytest.raises(SettingsError, match=f"^{flag}: explain mode is not available"):
            import_explain(settings)
    assert import_explain(SampleSettings()) is None  # not asked for: never imported


def test_prompt_file_byte_order_mark_is_dropped(tmp_path):
    from sample import read_prompt

    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffHello\n".encode("utf-8"))
    assert read_prompt(f"FILE:{path}") == ("Hello\n", f"--start=FILE:{path}")
    assert read_prompt("plain") == ("plain", "--start")
