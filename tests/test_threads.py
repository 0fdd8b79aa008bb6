"""The CPU thread policy (nanosample/threads.py) and sample.py's --threads.

The policy's arithmetic is tested on given inputs (cores, other processes' load, model size);
the environment rules in fresh interpreters, since they act before torch is imported; and the
text must not depend on the thread count, which the policy may change midway.
"""

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_python, sample_py

import sample
from nanosample import threads
from nanosample.threads import CPUSample, choose_threads, others_busy_cores, useful_threads

SHIPPED = 2_720_000   # the shipped model's parameters (2.72M)
GPT2 = 124_439_808    # GPT-2 124M


@pytest.fixture
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# The thread count

def test_useful_threads_one_per_1m_parameter_rows():
    assert useful_threads(SHIPPED, 1) == 2
    assert useful_threads(SHIPPED, 11) == 29   # 29.9M
    assert useful_threads(500_000, 1) == 1     # too little work to share
    assert useful_threads(GPT2, 1) == 124
    assert useful_threads(1, 1) == 1           # never 0


@pytest.mark.parametrize("params, rows, cores, others, threads", [
    (500_000, 1, 2, 0.0, 1),      # a tiny model never pays for threads it cannot use
    (SHIPPED, 1, 2, 0.0, 2),      # the shipped model: 2 threads of work at batch 1
    (SHIPPED, 1, 16, 0.0, 2),
    (SHIPPED, 1, 2, 2.0, 1),      # beside two busy processes: one thread
    (SHIPPED, 64, 16, 0.0, 16),
    (GPT2, 1, 2, 0.0, 2),         # quiet 2-core machine: torch's default, as today
    (GPT2, 1, 2, 0.4, 2),         # 1.6 cores free rounds to 2
    (GPT2, 1, 2, 0.6, 1),         # 1.4 rounds to 1
    (GPT2, 1, 2, 1.0, 1),         # one busy process beside us on 2 cores
    (GPT2, 1, 2, 2.0, 1),         # two: never fewer than one thread
    (GPT2, 1, 2, 40.0, 1),
    (GPT2, 1, 16, 0.0, 16),       # batch 1 has work for every core
    (GPT2, 8, 16, 0.0, 16),       # never more than torch's default
    (GPT2, 8, 16, 4.0, 12),
    (GPT2, 8, 16, 4.6, 11),
])
def test_choose_threads(params, rows, cores, others, threads):
    assert choose_threads(params, rows, cores, others) == threads


def test_others_busy_cores_from_two_samples():
    before = CPUSample(at=10.0, busy_s=100.0, nice_s=50.0, own_s=1.0)
    after = CPUSample(at=12.0, busy_s=103.0, nice_s=52.0, own_s=2.0)
    # 3 busy CPU seconds in 2 s, 1 of them ours: others kept 1 core busy
    assert others_busy_cores(before, after) == 1.0
    # niced work yields to us, unless we are niced too
    assert others_busy_cores(before, after, we_are_niced=True) == 2.0
    # ours can exceed the machine's count by a tick's rounding: never below 0
    assert others_busy_cores(before, CPUSample(12.0, 101.0, 50.0, 2.5)) == 0.0
    # a window shorter than MIN_WINDOW_S says nothing
    assert others_busy_cores(before, CPUSample(10.1, 101.0, 50.0, 1.0)) is None
    assert others_busy_cores(None, after) is None


def test_user_thread_variable():
    assert threads.user_thread_variable({}) is None
    assert threads.user_thread_variable({"OMP_NUM_THREADS": "3"}) == "OMP_NUM_THREADS"
    assert threads.user_thread_variable({"MKL_NUM_THREADS": " 2 "}) == "MKL_NUM_THREADS"
    assert threads.user_thread_variable({"OMP_NUM_THREADS": "0"}) is None
    assert threads.user_thread_variable({"OMP_NUM_THREADS": "many"}) is None


def test_policy_applies_the_flag_then_the_environment_then_the_rule(keep_torch_threads):
    policy = threads.ThreadPolicy(3, environ={"OMP_NUM_THREADS": "1"})
    assert policy.apply(SHIPPED, 1) == 3 and torch.get_num_threads() == 3
    assert policy.describe() == "3 threads (--threads)"
    assert policy.check() == 3  # the user's count never moves

    torch.set_num_threads(2)  # as torch would from OMP_NUM_THREADS=2
    policy = threads.ThreadPolicy(None, environ={"OMP_NUM_THREADS": "2"})
    assert policy.apply(SHIPPED, 1) == 2 and torch.get_num_threads() == 2
    assert policy.describe() == ""  # the user's environment says it: not repeated

    policy = threads.ThreadPolicy(None, environ={})
    assert policy.apply(500_000, 1) == 1 and torch.get_num_threads() == 1
    assert policy.describe() == "1 thread (auto)"


# ---------------------------------------------------------------------------------------------
# The OpenMP wait policy: set before torch is imported, never over the user's

WAIT_PROBE = ("import os, sys; from nanosample import threads; set_ = threads.set_wait_policy(); "
              "import torch; print(set_, os.environ.get('OMP_WAIT_POLICY'), "
              "os.environ.get('GOMP_SPINCOUNT'))")


@pytest.mark.parametrize("user, printed", [
    ({}, "False None None"),      # WAIT_POLICY None: libgomp's own spinning
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "False ACTIVE None"),
    ({"GOMP_SPINCOUNT": "1000"}, "False None 1000"),
])
def test_wait_policy_respects_the_user(user, printed):
    env = {k: v for k, v in os.environ.items() if k not in threads.USER_WAIT_VARS}
    env.update(user, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", WAIT_PROBE], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == printed


def test_a_wait_policy_given_is_set_before_torch_loads():
    probe = ("import os; from nanosample import threads; "
             "print(threads.set_wait_policy(policy=('OMP_WAIT_POLICY', 'PASSIVE')), "
             "os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k not in threads.USER_WAIT_VARS}
    env.update(PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True PASSIVE"


def test_wait_policy_is_not_set_once_torch_is_loaded():
    env = {}
    assert "torch" in sys.modules  # this process: too late, libgomp has read its settings
    assert threads.set_wait_policy(env) is False and env == {}


# ---------------------------------------------------------------------------------------------
# --threads

@pytest.mark.parametrize("argv, message", [
    (["--threads=0"], "error: --threads=0: must be an integer >= 1, or None for the automatic "
                      "choice"),
    (["--threads=two"], "error: --threads: expected an integer, got 'two'"),
])
def test_threads_flag_errors(capsys, argv, message):
    assert sample.main(argv) == 2
    assert capsys.readouterr().err == message + "\n"


def test_threads_config_error(capsys, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("threads = -1\n")
    assert sample.main([str(path)]) == 2
    assert capsys.readouterr().err == (f"error: {path}: threads=-1: must be an integer >= 1, or "
                                       f"None for the automatic choice\n")


def test_same_text_on_one_and_two_threads():
    """The shipped model's CPU kernels give the same bits on 1 and 2 threads, so a fixed seed
    gives the same text (and the policy may change the count midway). Crosses block_size
    (256), so a mid-run prefill is covered too."""
    args = ["--num_samples=2", "--max_new_tokens=300", "--seed=7", "--top_p=0.95"]
    code1, out1, err1 = sample_py(*args, "--threads=1")
    code2, out2, err2 = sample_py(*args, "--threads=2")
    assert code1 == code2 == 0, err1 + err2
    assert len(out1) > 600 and out1 == out2
    assert "float32 on cpu, 1 thread (--threads)" in err1
    assert "float32 on cpu, 2 threads (--threads)" in err2


def test_shipped_model_logits_thread_invariant(keep_torch_threads):
    from nanosample.loader import load_model
    model = load_model("shakespeare_char").model
    idx = torch.randint(0, model.config.vocab_size, (3, 40),
                        generator=torch.Generator().manual_seed(0))
    out = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        with torch.no_grad():
            out[n] = model(idx)
    assert torch.equal(out[1], out[2])


def test_load_line_names_the_automatic_choice():
    """Without OMP_NUM_THREADS (which conftest's runs set), the policy chooses, and says so:
    1 or 2 threads for the shipped model (2 on an idle machine of 2 cores or more, fewer as
    other processes keep cores busy). With it, the line stays as it was."""
    env = {k: v for k, v in os.environ.items()
           if k not in threads.USER_COUNT_VARS + threads.USER_WAIT_VARS}
    env.update(PYTHONIOENCODING="utf-8", HF_HUB_OFFLINE="1")
    args = [sys.executable, str(REPO / "sample.py"), "--num_samples=1", "--max_new_tokens=5"]
    p = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert re.search(r"float32 on cpu, (1 thread|2 threads) \(auto\)$", p.stderr.splitlines()[0])
    code, _, err = sample_py("--num_samples=1", "--max_new_tokens=5")  # OMP_NUM_THREADS=1
    assert code == 0 and err.splitlines()[0].endswith("float32 on cpu"), err


def test_check_follows_the_load_and_skips_stale_windows(monkeypatch, keep_torch_threads):
    """ThreadPolicy on a scripted /proc/stat: quiet, then two busy processes, then quiet again,
    then a long idle gap (a stale window, which only starts a new one)."""
    samples = iter([
        CPUSample(at=0.0, busy_s=0.0, nice_s=0.0, own_s=0.0),    # made: the window starts
        CPUSample(at=3.0, busy_s=3.0, nice_s=0.0, own_s=3.0),    # apply: only our loading
        CPUSample(at=5.5, busy_s=8.0, nice_s=0.0, own_s=3.0),    # others kept 2 cores busy
        CPUSample(at=8.0, busy_s=11.0, nice_s=0.0, own_s=5.5),   # others: 0.2 cores
        CPUSample(at=30.0, busy_s=50.0, nice_s=0.0, own_s=5.5),  # 22 s since: stale
        CPUSample(at=32.5, busy_s=55.0, nice_s=0.0, own_s=8.0),  # others: 1 core
    ])
    monkeypatch.setattr(threads, "read_cpu", lambda: next(samples))
    torch.set_num_threads(2)  # as torch's default on a 2-core machine
    policy = threads.ThreadPolicy(None, environ={})
    assert policy.apply(GPT2, 1) == 2

    counts = []
    for _ in range(4):
        policy.last_check = -1e9  # as if RECHECK_S had passed
        counts.append(policy.check())
        assert torch.get_num_threads() == counts[-1]
    assert counts == [1, 2, 2, 1]
    assert policy.check() == 1  # within RECHECK_S of the last look: /proc/stat is not read


@pytest.mark.parametrize("argv, message", [
    (["--load_test", "--threads=2"], "error: --threads=2: --load_test compares its own thread "
                                     "counts (automatic, 1, torch's default); leave --threads out"),
    (["--load_test", "--competitors=0"], "error: --competitors=0: must be an integer >= 1"),
])
def test_bench_load_test_flag_errors(argv, message):
    code, out, err = run_python(str(REPO / "bench.py"), *argv)
    assert (code, out, err) == (2, "", message + "\n")
