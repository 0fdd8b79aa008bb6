"""Hostile and broken inputs and faults, through the real scripts (issue 14, findings 3, 5, 6, 8,
9): each ends in one stderr line `error: ...` with the exit code nanosample/cli.py documents
(2: refused before any work; 1: failed midway; 130: interrupted), fast, never a traceback.

Each case runs sample.py, train.py, evaluate.py or bench.py in a subprocess, as a user would.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'\n"))
VERSE = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
         "First Citizen:\nYou are all resolved rather to die than to famish?\n\n")
ENV = dict(os.environ, PYTHONIOENCODING="utf-8", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
# The tiny training run every train.py case would start if its check did not stop it first.
TINY_TRAIN = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4",
              "--max_iters=4", "--warmup_iters=1", "--eval_interval=0", "--log_interval=2",
              "--eval_iters=1", "--final_eval_batches=1", "--final_eval_batch_size=2",
              "--train_eval_batches=1", "--threads=1"]
TINY_SWEEP = ["--prompt_length=8", "--max_new_tokens=6", "--num_prompts=2", "--num_samples=1",
              "--setting=temperature=1"]


def script(name, *args, stdout=subprocess.PIPE, shell_tail=None, timeout=300):
    """Run a script; (exit code, stdout, stderr). `shell_tail` runs it through sh with that
    redirection (e.g. '>&-' closes stdout)."""
    argv = [sys.executable, os.path.join(REPO, name), *args]
    if shell_tail is not None:
        quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in argv)
        argv = ["sh", "-c", f"exec {quoted} {shell_tail}"]
    p = subprocess.run(argv, cwd=REPO, stdout=stdout, stderr=subprocess.PIPE, env=ENV,
                       timeout=timeout)
    out = p.stdout.decode("utf-8", "replace") if p.stdout is not None else ""
    return p.returncode, out, p.stderr.decode("utf-8", "replace")


def assert_one_error(code, err, expected_code, message):
    """One `error:` line and the exit code. A failure midway (exit 1, 130) comes after the model
    was loaded, so sample.py's `loaded ...` line may stand before it, and nothing else."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    if expected_code != 2 and lines and lines[0].startswith("loaded "):
        lines = lines[1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], err
    assert code == expected_code, (code, err)


def unwritable_directory(tmp):
    """A directory no file can be created in: /sys for root (permissions do not stop root),
    else a directory without write permission. None if there is none here."""
    if os.geteuid() == 0:
        try:
            tempfile.TemporaryFile(dir="/sys").close()
        except OSError:
            return "/sys"
        return None
    path = os.path.join(tmp, "readonly")
    os.mkdir(path, 0o555)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Models, inputs and hostile files, made once: {name: path}."""
    from nanosample import loader
    from nanosample.model import GPT, GPTConfig
    from nanosample.tokenizer import CharTokenizer

    tmp = tmp_path_factory.mktemp("robust")
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=len(CHARS), n_layer=1, n_head=2, n_embd=16)
    char = tmp / "tiny-char"
    loader.save_native(GPT(config), CharTokenizer(CHARS), char)
    # Finite weights whose logits overflow to inf - inf = NaN: the model fails mid-run (a
    # loader that refuses non-finite weights still loads these).
    broken = GPT(config)
    with torch.no_grad():
        broken.transformer.ln_f.weight.fill_(3e38)
        broken.transformer.wte.weight.mul_(1e3)
    nan = tmp / "nan-char"
    loader.save_native(broken, CharTokenizer(CHARS), nan)

    def write(name, data):
        path = tmp / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        return str(path)

    def sparse(name, size):
        path = tmp / name
        with open(path, "wb") as f:
            f.truncate(size)  # no disk used
        return str(path)

    fifo = str(tmp / "fifo.txt")
    os.mkfifo(fifo)
    fifo_toml = str(tmp / "fifo.toml")
    os.mkfifo(fifo_toml)
    full_png, full_jsonl = str(tmp / "full.png"), str(tmp / "full.jsonl")
    os.symlink("/dev/full", full_png)
    os.symlink("/dev/full", full_jsonl)
    return {
        "tmp": str(tmp), "char": str(char), "nan": str(nan), "fifo": fifo, "fifo_toml": fifo_toml,
        "full_png": full_png, "full_jsonl": full_jsonl,
        "unwritable": unwritable_directory(str(tmp)) or "",
        "corpus": write("corpus.txt", "".join(VERSE.replace("First", w)
                                              for w in ("First", "Second", "Third") * 8)),
        "afile": write("afile", "a plain file\n"),
        "nul_toml": write("nul.toml", 'explain_file = "trace\\u0000.jsonl"\n'),
        "nul_train_toml": write("nul_train.toml", 'out_dir = "out\\u0000dir"\n'),
        "deep_py": write("deep.py", "max_new_tokens = " + "-" * 200_000 + "1\n"),
        "deep_toml": write("deep.toml", "a = " + "[" * 100_000 + "\n"),
        "big_prompt": sparse("big_prompt.txt", 2 << 20),
        "big_corpus": sparse("big_corpus.txt", 70 << 20),
    }


# ---------------------------------------------------------------------------------------------
# (name, script, arguments, exit code, what the one error line contains). {x} is files[x].

CASES = [
    # finding 6: faults of the terminal and the disk, refused or reported in one line
    ("sample: --plot into an unwritable directory", "sample.py",
     ["--init_from={char}", "--max_new_tokens=3", "--num_samples=1", "--plot={unwritable}/p.png"],
     2, "--plot={unwritable}/p.png: cannot write in"),
    ("sample: --explain_file on a full disk", "sample.py",
     ["--init_from={char}", "--max_new_tokens=3", "--num_samples=1", "--explain_file=/dev/full"],
     1, "--explain_file=/dev/full: cannot write it (No space left on device)"),
    ("sample: --plot on a full disk", "sample.py",
     ["--init_from={char}", "--max_new_tokens=3", "--num_samples=1", "--plot={full_png}"],
     1, "--plot={full_png}: cannot write it (No space left on device)"),
    ("sample: a NUL byte in a path from TOML", "sample.py", ["{nul_toml}"],
     2, "{nul_toml}: explain_file: holds a NUL byte"),
    ("sample: a .py config of 200k unary minus signs", "sample.py", ["{deep_py}"],
     2, "{deep_py}: too deeply nested"),
    ("sample: NaN logits mid-generation", "sample.py",
     ["--init_from={nan}", "--max_new_tokens=3", "--num_samples=2"],
     1, "generation failed: the model produced NaN logits"),
    ("evaluate: --out_dir under a file", "evaluate.py",
     ["--init_from={char}", "--data={corpus}", "--out_dir={afile}/sweep", *TINY_SWEEP],
     2, "--out_dir={afile}/sweep: is under {afile}, a file"),
    ("evaluate: --out_dir (and its sweep.png) unwritable", "evaluate.py",
     ["--init_from={char}", "--data={corpus}", "--out_dir={unwritable}/sweep", *TINY_SWEEP],
     2, "--out_dir={unwritable}/sweep: cannot write in"),
    ("evaluate: NaN logits mid-sweep", "evaluate.py",
     ["--init_from={nan}", "--data={corpus}", "--out_dir={tmp}/nan-sweep", *TINY_SWEEP],
     1, "the sweep failed: the model produced NaN logits"),
    ("evaluate: a TOML sweep nested 100k deep", "evaluate.py",
     ["--sweep={deep_toml}", "--out_dir={tmp}/deep"], 2, "--sweep={deep_toml}: invalid TOML"),
    ("train: --out_dir under a file", "train.py",
     ["--data={corpus}", "--out_dir={afile}/ckpt", *TINY_TRAIN], 2, "--out_dir={afile}/ckpt: is under"),
    ("train: --out_dir unwritable", "train.py",
     ["--data={corpus}", "--out_dir={unwritable}/ckpt", *TINY_TRAIN],
     2, "--out_dir={unwritable}/ckpt: cannot write in"),
    ("train: a NUL byte in --out_dir from TOML", "train.py", ["{nul_train_toml}"],
     2, "{nul_train_toml}: out_dir: holds a NUL byte"),
    ("bench: --init_from that does not exist", "bench.py", ["--init_from=/nonexistent"],
     2, "--init_from='/nonexistent': no such file or directory"),
    ("bench: --systems= names none", "bench.py", ["--systems="],
     2, "--systems=: must name at least one of ours, hf, nocache"),
    ("bench: an unwritable --cache_dir", "bench.py", ["--cache_dir={unwritable}/cache"],
     2, "--cache_dir={unwritable}/cache: cannot write in"),
    ("bench: --child without arguments", "bench.py", ["--child"], 2, "--child: bench.py's"),
    # finding 8: unbounded reads and sizes that cannot fit
    ("sample: --start=FILE:/dev/zero", "sample.py", ["--start=FILE:/dev/zero"],
     2, "--start=FILE:/dev/zero: is a character device, not a prompt file"),
    ("sample: a FIFO as the prompt", "sample.py", ["--start=FILE:{fifo}"],
     2, "--start=FILE:{fifo}: is a FIFO (named pipe), not a prompt file"),
    ("sample: a prompt file over the limit", "sample.py", ["--start=FILE:{big_prompt}"],
     2, "--start=FILE:{big_prompt}: the file is 2 MiB, more than the 1 MiB allowed"),
    ("sample: a config that is /dev/zero", "sample.py", ["/dev/zero"],
     2, "/dev/zero: is a character device, not a config file"),
    ("sample: a FIFO as the config", "sample.py", ["{fifo_toml}"],
     2, "{fifo_toml}: is a FIFO (named pipe), not a config file"),
    ("sample: a batch that cannot fit", "sample.py",
     ["--init_from={char}", "--num_samples=1000000000000", "--batch_size=1000000000000"],
     2, "--batch_size=1000000000000: a batch of 1000000000000 samples needs about"),
    ("evaluate: --data=/dev/zero", "evaluate.py",
     ["--init_from={char}", "--data=/dev/zero", "--out_dir={tmp}/zero", *TINY_SWEEP],
     2, "--data=/dev/zero: is a character device"),
    ("evaluate: --num_prompts=1e8", "evaluate.py",
     ["--init_from={char}", "--data={corpus}", "--out_dir={tmp}/many", "--num_prompts=100000000",
      "--prompt_length=8", "--max_new_tokens=6"],
     2, "--num_prompts=100000000: the sweep would hold about"),
    ("train: --data=/dev/zero", "train.py", ["--data=/dev/zero", *TINY_TRAIN],
     2, "--data=/dev/zero: is a character device"),
    ("train: a FIFO as the corpus", "train.py", ["--data={fifo}", *TINY_TRAIN],
     2, "--data={fifo}: is a FIFO"),
    ("train: a corpus over the limit", "train.py", ["--data={big_corpus}", *TINY_TRAIN],
     2, "--data={big_corpus}: the file is 70 MiB, more than the 64 MiB allowed"),
    ("train: --batch_size=1e9", "train.py",
     ["--data={corpus}", "--out_dir={tmp}/huge", "--batch_size=1000000000"],
     2, "--batch_size=1000000000: a step needs about"),
    # finding 9: values that trained to NaN, duplicate keys
    ("train: --learning_rate=inf", "train.py", ["--learning_rate=inf"],
     2, "--learning_rate=inf: must be a finite number"),
    ("train: --grad_clip=nan", "train.py", ["--grad_clip=nan"],
     2, "--grad_clip=nan: must be a finite number"),
    ("train: --weight_decay=inf", "train.py", ["--weight_decay=inf"],
     2, "--weight_decay=inf: must be a finite number"),
    ("train: --beta2=1", "train.py", ["--beta2=1"], 2, "--beta2=1.0: must be >= 0 and < 1"),
    ("evaluate: a key given twice in --setting", "evaluate.py",
     ["--setting=temperature=0.5,temperature=0.7"], 2, "temperature is given twice"),
]


def test_the_case_table_is_big_and_named_uniquely():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def results(files):
    """Every case at once: they are independent, and most never load a model."""
    def run(case):
        name, name_of_script, args, _, _ = case
        if "{unwritable}" in " ".join(args) and not files["unwritable"]:
            return name, None
        return name, script(name_of_script, *[a.format(**files) for a in args])
    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(run, CASES))


@pytest.mark.parametrize("name, name_of_script, args, code, message", CASES,
                         ids=[c[0] for c in CASES])
def test_one_error_line_and_the_documented_exit_code(results, files, name, name_of_script, args,
                                                     code, message):
    if results[name] is None:
        pytest.skip("no unwritable directory on this machine")
    got, out, err = results[name]
    assert_one_error(got, err, code, message.format(**files))
    if code == 2:
        assert out == "", out  # refused before any work: nothing printed


def test_full_disk_files_written_before_stay_whole(files):
    # --plot fails at the end; the JSON Lines trace written before it is whole and in place
    trace = os.path.join(files["tmp"], "before-plot.jsonl")
    code, out, err = script("sample.py", f"--init_from={files['char']}", "--max_new_tokens=3",
                            "--num_samples=2", f"--explain_file={trace}",
                            f"--plot={files['full_png']}")
    assert_one_error(code, err, 1, "cannot write it (No space left on device)")
    records = [json.loads(line) for line in open(trace, encoding="utf-8")]
    assert len(records) == 2 * 3 and {r["sample"] for r in records} == {0, 1}
    assert out.count("---------------") == 2  # and the samples were printed whole
    assert not [f for f in os.listdir(files["tmp"]) if f.startswith(".before-plot")]


# ---------------------------------------------------------------------------------------------
# stdout: closed, full, or a reader that went away

def test_closed_stdout_is_one_line(files):
    code, _, err = script("sample.py", f"--init_from={files['char']}", "--max_new_tokens=3",
                          stdout=None, shell_tail=">&-")
    assert_one_error(code, err, 2, "stdout is closed")


@pytest.mark.parametrize("name, args", [
    ("sample.py", ["--init_from={char}", "--max_new_tokens=3", "--num_samples=2"]),
    ("sample.py", ["--help"]),
    ("evaluate.py", ["--init_from={char}", "--data={corpus}", "--out_dir={tmp}/full-stdout",
                     *TINY_SWEEP]),
])
def test_stdout_on_a_full_disk_is_one_line(files, name, args):
    code, _, err = script(name, *[a.format(**files) for a in args], stdout=None,
                          shell_tail=">/dev/full")
    assert_one_error(code, err, 1, "cannot write to stdout (No space left on device)")


@pytest.mark.parametrize("name", ["sample.py", "train.py", "evaluate.py", "bench.py"])
def test_help_into_a_closed_pipe_is_quiet(name):
    # `python sample.py --help | true`, made certain: the reader is gone before the first write
    read, write = os.pipe()
    os.close(read)
    try:
        p = subprocess.run([sys.executable, os.path.join(REPO, name), "--help"], cwd=REPO,
                           stdout=write, stderr=subprocess.PIPE, env=ENV, timeout=120)
    finally:
        os.close(write)
    assert p.stderr.decode() == ""  # quiet, as `| head` expects: no traceback, no error line
    assert p.returncode == 1


# ---------------------------------------------------------------------------------------------
# Ctrl-C during start-up

def _torch_is_loading(pid):
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "libtorch" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc to see torch loading")
@pytest.mark.parametrize("name, args", [
    ("train.py", ["--data={corpus}", "--out_dir={tmp}/interrupted", *TINY_TRAIN]),
    ("evaluate.py", ["--init_from={char}", "--data={corpus}", "--out_dir={tmp}/interrupted-sweep",
                     *TINY_SWEEP]),
])
def test_ctrl_c_during_start_up_stops_the_run(files, name, args):
    p = subprocess.Popen([sys.executable, os.path.join(REPO, name),
                          *[a.format(**files) for a in args]], cwd=REPO, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not _torch_is_loading(p.pid) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    p.send_signal(signal.SIGINT)  # while torch is being imported: start-up
    out, err = p.communicate(timeout=120)
    assert_one_error(p.returncode, err.decode(), 130, "interrupted")
    written = os.path.join(files["tmp"], "interrupted")
    assert not os.path.exists(os.path.join(written, "model.safetensors"))
    assert not os.path.exists(os.path.join(files["tmp"], "interrupted-sweep", "sweep.md"))


# ---------------------------------------------------------------------------------------------
# finding 5: train.py never replaces a checkpoint by accident

def test_train_default_out_dir_is_not_the_shipped_model():
    import train
    assert os.path.normpath(train.TrainSettings().out_dir) != os.path.join("checkpoints",
                                                                           "shakespeare_char")


def test_train_refuses_an_existing_checkpoint_without_overwrite(files, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(files["char"], out)
    before = (out / "model.safetensors").read_bytes()
    args = [f"--data={files['corpus']}", f"--out_dir={out}", *TINY_TRAIN]
    code, stdout, err = script("train.py", *args)
    assert_one_error(code, err, 2, f"--out_dir={out}: holds a checkpoint (model.safetensors); "
                                   f"choose another --out_dir, or add --overwrite")
    assert stdout == "" and (out / "model.safetensors").read_bytes() == before
    code, stdout, err = script("train.py", *args, "--overwrite")
    assert code == 0, err
    assert (out / "model.safetensors").read_bytes() != before and f"saved {out}" in stdout


def test_train_stops_when_the_loss_is_not_finite_and_saves_nothing(files, tmp_path, monkeypatch):
    import train
    from nanosample.settings import parse_settings

    settings = parse_settings(train.TrainSettings, [f"--data={files['corpus']}",
                                                    f"--out_dir={tmp_path / 'ckpt'}", *TINY_TRAIN])
    real = train.compute_loss
    calls = []

    def diverging(model, x, y, autocast):
        loss = real(model, x, y, autocast)
        calls.append(1)
        return loss * float("nan") if len(calls) == 3 else loss  # step 3 diverges

    monkeypatch.setattr(train, "compute_loss", diverging)
    with pytest.raises(train.TrainingFailed, match=r"the training loss became nan at step 3 "
                                                   r"\(learning rate .*\); stopped, nothing was saved"):
        train.train(settings, log=lambda line: None)
    assert not (tmp_path / "ckpt").exists()


# ---------------------------------------------------------------------------------------------
# finding 9: the same bytes are an error from the command line and from a file; outputs are
# replaced whole, never written into

def test_non_utf8_start_is_an_error_like_the_file(files):
    p = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), b"--start=caf\xe9"],
                       cwd=REPO, capture_output=True, env=ENV, timeout=120)
    assert_one_error(p.returncode, p.stderr.decode(), 2,
                     "--start: not UTF-8 text (byte 0xe9 at character 3)")
    latin1 = os.path.join(files["tmp"], "latin1.txt")
    with open(latin1, "wb") as f:
        f.write(b"caf\xe9")
    code, _, err = script("sample.py", f"--start=FILE:{latin1}")
    assert_one_error(code, err, 2, f"--start=FILE:{latin1}: not UTF-8 text (byte 0xe9 at offset 3)")


def test_overwrite_replaces_the_file_whole_never_writing_into_it(files, tmp_path):
    # Another run's file, seen through a second hard link: writing into the file would change
    # it; renaming a new file into place leaves it as it was. So two runs never interleave.
    trace, other = tmp_path / "trace.jsonl", tmp_path / "other-run.jsonl"
    trace.write_text("another run's line\n")
    os.link(trace, other)
    code, _, err = script("sample.py", f"--init_from={files['char']}", "--max_new_tokens=2",
                          "--num_samples=1", f"--explain_file={trace}", "--overwrite")
    assert code == 0, err
    assert other.read_text() == "another run's line\n"
    assert len(trace.read_text().splitlines()) == 2
    assert sorted(os.listdir(tmp_path)) == ["other-run.jsonl", "trace.jsonl"]  # no temp left


# ---------------------------------------------------------------------------------------------
# finding 8: a huge --num_samples runs batch by batch in bounded memory

def test_a_huge_num_samples_starts_at_once_in_bounded_batches(files):
    p = subprocess.Popen([sys.executable, os.path.join(REPO, "sample.py"),
                          f"--init_from={files['char']}", "--num_samples=100000000",
                          "--max_new_tokens=2", "--stream=false"], cwd=REPO, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        separators = 0
        while separators < 100:  # the whole first batch (64 samples) and more
            line = p.stdout.readline()
            assert line, p.stderr.read().decode()
            separators += line == b"---------------\n"
        with open(f"/proc/{p.pid}/status") as f:
            peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    finally:
        p.kill()
        p.communicate()
    # One batch of 10^8 rows would need ~10^8 x 65 x 8 bytes for its logits alone (52 GB);
    # a run that holds a few batches stays within torch's own ~0.5 GB and a list per sample.
    assert peak_kib < 2 * 2**20, peak_kib


# ---------------------------------------------------------------------------------------------
# The pieces, in process

def test_output_file_is_put_in_place_whole_or_not_at_all(tmp_path):
    from nanosample.cli import OutputFile, RunError, write_whole
    from nanosample.settings import SettingsError

    path = tmp_path / "out.txt"
    out = OutputFile(str(path), "--out")
    assert not path.exists() and os.path.dirname(out.write_path) == str(tmp_path)
    write_whole(out, "new\n")
    assert path.read_text() == "new\n" and os.listdir(tmp_path) == ["out.txt"]

    with pytest.raises(SettingsError, match=r"^--out: the file exists; choose another path"):
        OutputFile(str(path), "--out")
    out = OutputFile(str(path), "--out", overwrite=True)
    out.discard()  # a run that failed: the old file stays
    assert path.read_text() == "new\n" and os.listdir(tmp_path) == ["out.txt"]

    late = tmp_path / "late.txt"
    out = OutputFile(str(late), "--late")
    late.write_text("appeared during the run\n")
    with pytest.raises(FileExistsError):
        write_whole(out, "ours\n")
    assert late.read_text() == "appeared during the run\n"
    assert sorted(os.listdir(tmp_path)) == ["late.txt", "out.txt"]

    with pytest.raises(SettingsError, match=r"^--x: the directory .*nowhere does not exist"):
        OutputFile(str(tmp_path / "nowhere" / "x.txt"), "--x")
    with pytest.raises(SettingsError, match=r"^--x: is a directory"):
        OutputFile(str(tmp_path), "--x")
    assert issubclass(RunError, Exception)


def test_bounded_reader_states_its_limit(tmp_path):
    from nanosample.cli import read_user_text
    from nanosample.settings import SettingsError

    path = tmp_path / "p.txt"
    path.write_text("x" * 11)
    assert read_user_text(str(path), "--p", limit=11) == "x" * 11
    with pytest.raises(SettingsError, match=r"^--p: the file is 11 bytes, more than the 10 bytes "
                                            r"allowed for a text file$"):
        read_user_text(str(path), "--p", limit=10)
    with pytest.raises(SettingsError, match=r"^--p: not a usable file path"):
        read_user_text("a\x00b", "--p")
