"""The CPU thread policy: how many threads torch uses for a model, and how its OpenMP threads
wait. Scripts call it; the rules and the measurements behind them are in docs/speed.md
("Threads on a busy machine").

Why a policy at all: torch's CPU wheel runs each operation's parallel region on GNU OpenMP
(libgomp), and every region ends at a barrier where the threads wait for the slowest one. When
other processes keep the cores busy, one of our threads is often off its core for a whole
scheduler time slice, and every region waits for it: beside two busy processes on 2 cores the
shipped model decoded at ~10 tokens/s on torch's 2 threads and ~97 on one. A small model also
has too little work per step to share between threads on any machine.

The policy, in three parts:
- `set_wait_policy`, before torch is imported: how OpenMP's threads wait at a barrier
  (WAIT_POLICY), unless the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT. libgomp reads them
  once, when `import torch` loads it; set afterwards they do nothing (measured). It is None
  now, libgomp's own spinning: sleeping at once (PASSIVE) or after 1000 spins cost 5-10% on a
  quiet machine, and on a busy one the thread count below falls to one, where no thread
  waits for another.
- `choose_threads`: as many threads as the model has work for (`useful_threads`: one per
  PARAMS_PER_THREAD parameters x rows of a decode step), no more than the cores other
  processes leave free, at least one, never more than torch's own default.
- `others_busy_cores`: the cores other processes keep busy, from /proc/stat: the CPU time
  the whole machine spent busy over a window (the seconds it took to import torch and load
  the model, or the seconds since the last check), minus our own process's CPU time. Niced
  work (another build) does not count, since it yields to us, unless we are niced ourselves.

`ThreadPolicy` ties them together for a script: `apply()` once after loading, then `check()`
during a long generation (cheap; it looks again at most every RECHECK_S seconds), which moves
the thread count when the load changes. The thread count does not change the text: the CPU
kernels give the same bits on 1 and 2 threads (tests/test_threads.py), so neither does a
change midway.
"""

import os
import sys
import time
from dataclasses import dataclass

PARAMS_PER_THREAD = 1_000_000  # parameters x rows per decode step worth one more thread
# (measured: the 2.7M shipped model is 7% faster on 2 threads than on 1 on a quiet 2-core EPYC;
# below ~1M a step is too little work to share)
RECHECK_S = 2.0                 # ThreadPolicy.check looks at the load at most this often
MIN_WINDOW_S = 0.2              # a shorter window of /proc/stat ticks (10 ms each) says little
# What set_wait_policy sets: (variable, value), or None to leave libgomp's own spinning. None:
# PASSIVE cost 5-7% of a quiet machine's speed and GOMP_SPINCOUNT=1000 10% (bench.py
# --load_test), while under load the thread count falls to one, where no thread waits.
WAIT_POLICY = None
USER_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # either one: the user chose
USER_COUNT_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


# ---------------------------------------------------------------------------------------------
# The OpenMP wait policy: environment variables, before torch is imported

def set_wait_policy(environ=None, policy=WAIT_POLICY):
    """`policy` (variable, value), e.g. ("OMP_WAIT_POLICY", "PASSIVE"), in `environ` (default
    os.environ) unless it is None, the user chose how OpenMP threads wait (OMP_WAIT_POLICY or
    GOMP_SPINCOUNT set) or torch is already imported (libgomp has read its settings then, and
    the variable would only reach child processes). Returns whether it set it."""
    environ = os.environ if environ is None else environ
    if policy is None or any(name in environ for name in USER_WAIT_VARS) \
            or "torch" in sys.modules:
        return False
    name, value = policy
    environ[name] = value
    return True


def user_thread_variable(environ=None):
    """The variable through which the user set a thread count, OMP_NUM_THREADS or
    MKL_NUM_THREADS (torch reads them at start-up and we leave it so), or None."""
    environ = os.environ if environ is None else environ
    for name in USER_COUNT_VARS:
        value = environ.get(name, "").strip()
        if value.isdigit() and int(value) >= 1:
            return name
    return None


# ---------------------------------------------------------------------------------------------
# The thread count: a pure function of the model and the machine's state

def useful_threads(params, rows):
    """How many threads a decode step of `rows` rows through `params` parameters has work for:
    one per PARAMS_PER_THREAD (the shipped 2.7M-parameter model: 2 at batch 1, which on a quiet
    2-core machine decodes 7% faster than 1; GPT-2 124M: as many as there are cores)."""
    return max(1, params * rows // PARAMS_PER_THREAD)


def choose_threads(params, rows, cores, others_busy):
    """Threads for a model of `params` parameters decoding `rows` rows at once on `cores` cores
    (torch's default count), while other processes keep `others_busy` cores busy: the cores
    left (rounded to the nearest whole core), capped by the work there is, at least 1."""
    free = int(cores - others_busy + 0.5)
    return max(1, min(cores, free, useful_threads(params, rows)))


# ---------------------------------------------------------------------------------------------
# The machine's state: /proc/stat

@dataclass(frozen=True)
class CPUSample:
    """The machine's CPU seconds so far (all cores) and our process's, at one moment."""
    at: float        # time.monotonic()
    busy_s: float    # user + system + irq + softirq + steal, every core, nice excluded
    nice_s: float    # niced user time, every core
    own_s: float     # this process's user + system time, all its threads


def read_cpu():
    """A CPUSample, or None where /proc/stat cannot be read (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()  # cpu user nice system idle iowait irq softirq steal
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) / hz for x in fields[1:9])
    own = os.times()
    return CPUSample(time.monotonic(), user + system + irq + softirq + steal, nice,
                     own.user + own.system)


def others_busy_cores(before, after, we_are_niced=False):
    """Cores other processes kept busy between two CPUSamples (their CPU seconds over the
    wall seconds), or None when the window is too short to say. Niced time counts only when
    we are niced too (else the scheduler gives it way to us)."""
    if before is None or after is None or after.at - before.at < MIN_WINDOW_S:
        return None
    busy = after.busy_s - before.busy_s
    if we_are_niced:
        busy += after.nice_s - before.nice_s
    return max(0.0, (busy - (after.own_s - before.own_s)) / (after.at - before.at))


def we_are_niced():
    try:
        return os.getpriority(os.PRIO_PROCESS, 0) > 0
    except (AttributeError, OSError):
        return False


# ---------------------------------------------------------------------------------------------
# For scripts

class ThreadPolicy:
    """The thread policy of one run. Make it as early as possible (the /proc/stat window starts
    then), call `apply(params, rows)` once the model is loaded and `check()` as tokens come.

    `requested`: the user's --threads (an int wins over everything), or None for the policy.
    A thread count from OMP_NUM_THREADS/MKL_NUM_THREADS is left as torch set it.
    """

    def __init__(self, requested=None, environ=None):
        self.requested = requested
        self.env_threads = user_thread_variable(environ)  # the variable's name, or None
        self.sample = read_cpu()
        self.threads = None      # the count in use after apply()
        self.why = ""            # a few words for the load line: "--threads", "auto", ...
        self.params = self.rows = self.cores = None
        self.last_check = time.monotonic()

    @property
    def automatic(self):
        return self.requested is None and self.env_threads is None

    def apply(self, params, rows):
        """Set torch's thread count for this model and batch; returns it."""
        import torch

        if self.requested is not None:
            self.threads, self.why = self.requested, "--threads"
        elif self.env_threads is not None:
            self.threads, self.why = torch.get_num_threads(), self.env_threads
            return self.threads
        else:
            self.params, self.rows = params, rows
            self.cores = torch.get_num_threads()  # torch's default: the physical cores it may use
            self.threads = self._choose()
            self.why = "auto"
        torch.set_num_threads(self.threads)
        return self.threads

    def check(self):
        """During generation: every RECHECK_S seconds, look at the load again and move the
        thread count if it changed. Returns the count in use."""
        now = time.monotonic()
        if not self.automatic or self.cores is None or now - self.last_check < RECHECK_S:
            return self.threads
        self.last_check = now
        threads = self._choose(stale_after=2 * RECHECK_S)
        if threads != self.threads:
            import torch
            torch.set_num_threads(threads)
            self.threads = threads
        return self.threads

    def _choose(self, stale_after=None):
        """The count for the load seen since the last sample. A window longer than
        `stale_after` seconds (we were idle: the load then says little about now) only starts
        a new one, and the count stays."""
        now = read_cpu()
        if stale_after is not None and self.sample is not None and now is not None \
                and now.at - self.sample.at > stale_after:
            self.sample = now
            return self.threads
        others = others_busy_cores(self.sample, now, we_are_niced())
        if others is None:  # too short a window, or no /proc/stat: the model's size alone
            others = 0.0
        else:
            self.sample = now
        return choose_threads(self.params, self.rows, self.cores, others)

    def describe(self):
        """For the load line: '1 thread (auto)' or '4 threads (--threads)'; '' when nothing
        was chosen here (OMP_NUM_THREADS: the user's environment already says it)."""
        if self.why not in ("auto", "--threads"):
            return ""
        return f"{self.threads} thread{'s' if self.threads != 1 else ''} ({self.why})"
