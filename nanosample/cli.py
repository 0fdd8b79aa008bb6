"""The scripts' shared command-line edge: the one-line `error:` report and the exit codes,
bounded reads of the files a user names, outputs that appear whole or not at all, the memory a
run will need, and `run_script`, which runs a script's main() so that no fault of the
terminal (a closed pipe, a full disk, Ctrl-C) ends in a traceback.

Exit codes, the same for sample.py, train.py, evaluate.py and bench.py:

    0    done
    1    the run failed midway: an output could not be written (a full disk, a closed
         stdout), or the model failed (NaN logits, out of memory); one `error:` line says
         which, and what was written before stays valid (each output file is whole)
    2    bad input, refused before any work: a flag, a config file, a prompt, a checkpoint,
         an output path or a size that cannot fit
    130  interrupted (Ctrl-C)

A reader that goes away (`sample.py | head`) ends a run quietly, with exit code 1.

Nothing here imports torch: the scripts import this first, and a mistyped flag is reported
before torch loads.
"""

import contextlib
import errno
import os
import signal
import stat
import sys
import tempfile

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# Bounds on what a user's file may hold (a real one is far smaller; /dev/zero or a huge file
# is refused before it is read, not after the memory is gone).
CONFIG_LIMIT = 1 << 20        # config files, sweep files, prompts (--start=FILE:)
PROMPTS_LIMIT = 16 << 20      # evaluate.py --prompts
CORPUS_LIMIT = 64 << 20       # train.py / evaluate.py --data (tiny Shakespeare is 1.1 MB)


class RunError(Exception):
    """A fault in the middle of a run (an output that cannot be written, the model failing):
    one line, naming the flag or file, reported as `error: ...` with exit code 1."""


def one_line(message):
    """`message` on one line, whatever the code that wrote it put in it."""
    return " ".join(str(message).split())


def report_error(error, code=EXIT_USAGE):
    """Print `error: <one line>` on stderr and return `code` (2: bad input, 1: failed midway)."""
    if sys.stderr is not None:
        with contextlib.suppress(OSError):
            print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
    return code


def checkpoint_message(error):
    """A loader.CheckpointError as one line for the user: the loader names the file, or
    `init_from=...`, which the user typed as the --init_from flag (or a config file's key)."""
    message = str(error)
    return "--" + message if message.startswith("init_from=") else message


def failure(error):
    """One line for an exception raised mid-run by the model or torch: its first line."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    text = text if len(text) <= 300 else text[:297] + "..."
    return text if isinstance(error, ValueError) else f"{type(error).__name__}: {text}"


# ---------------------------------------------------------------------------------------------
# Running a script

_interrupted = False


def _on_sigint(signum, frame):
    # Remembered as well as raised: a library that swallows KeyboardInterrupt (a bare
    # `except:`) cannot make the run go on; check_interrupted() raises it again.
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def check_interrupted():
    """Raise KeyboardInterrupt if Ctrl-C was pressed, even when something swallowed it."""
    if _interrupted:
        raise KeyboardInterrupt


def _quiet_stdout():
    """Point fd 1 at /dev/null, so that the interpreter's last flush of what could not be
    written (a closed pipe, a full disk) neither fails nor prints a second error."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def run_script(main, argv=None, *, interrupted="interrupted"):
    """Run `main(argv)` and return its exit code, as `sys.exit(run_script(main))` uses it.

    Catches what a terminal does to a run: Ctrl-C (`error: <interrupted>`, 130), a reader
    that goes away (quiet, 1), a stdout that is closed (2) or that fails when written or
    flushed (a full disk: 1). `interrupted` says what an interrupt leaves behind.
    """
    global _interrupted
    _interrupted = False
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:  # not when ignored (nohup)
        with contextlib.suppress(ValueError):  # only the main thread may set handlers
            signal.signal(signal.SIGINT, _on_sigint)
    if sys.stdout is None:  # fd 1 was closed before Python started
        return report_error("stdout is closed; give it somewhere to go (> file, or > /dev/null)")
    try:
        code = main(argv)
        check_interrupted()
        sys.stdout.flush()  # a full disk shows here, where it can still be reported
        return code
    except KeyboardInterrupt:
        return _report_interrupt(interrupted)
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_FAILED
    except OSError as e:
        # Every file we open is named in its own error; a nameless one is a write to an open
        # stream: stdout (stderr's own failures cannot be reported anywhere).
        if e.filename is not None:
            return report_error(f"{e.filename}: {e.strerror}", EXIT_FAILED)
        _quiet_stdout()
        return report_error(f"cannot write to stdout ({e.strerror or e})", EXIT_FAILED)
    finally:
        if signal.getsignal(signal.SIGINT) is _on_sigint:
            signal.signal(signal.SIGINT, previous)


def _report_interrupt(what):
    if sys.stderr is not None and sys.stderr.isatty():
        with contextlib.suppress(OSError):
            sys.stderr.write("\n")  # off the line the terminal echoed ^C on
    # stdout may hold half a line of text: it goes out as it is, then the line on stderr.
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stdout.flush()
    return report_error(what, EXIT_INTERRUPTED)


# ---------------------------------------------------------------------------------------------
# Reading a user's file

def _describe_mode(mode):
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _size(n):
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n:,} bytes"


def read_user_bytes(path, name, *, what="a file", noun="file", limit=CONFIG_LIMIT,
                    missing_hint=""):
    """The bytes of the regular file at `path`, at most `limit` of them.

    Every mistake is a SettingsError that starts with `name` (the flag, or the path for a
    config file): no such file, a directory, a FIFO or device (which could block or never
    end), unreadable, larger than `limit`, a path that is not a path (a NUL byte). `what`
    completes "is a directory, not ..."; `noun` completes "no such ...".
    """
    from nanosample.settings import SettingsError  # settings imports this module

    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise SettingsError(f"{name}: no such {noun}{missing_hint}") from None
    except IsADirectoryError:
        raise SettingsError(f"{name}: is a directory, not {what}") from None
    except OSError as e:
        raise SettingsError(f"{name}: cannot read the {noun}: {e.strerror}") from None
    except (ValueError, UnicodeError):  # a NUL byte, or a string no file name can hold
        raise SettingsError(f"{name}: not a usable file path (it holds a NUL byte or an "
                            f"unencodable character)") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
        os.close(fd)
        kind = _describe_mode(info.st_mode)
        if kind == "a directory":
            raise SettingsError(f"{name}: is a directory, not {what}")
        if not stat.S_ISREG(info.st_mode):
            raise SettingsError(f"{name}: is {kind}, not {what} (only regular files are read)")
        raise SettingsError(f"{name}: the file is {_size(info.st_size)}, more than the "
                            f"{_size(limit)} allowed for {what}")
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)  # the file may have grown since fstat
        except OSError as e:
            raise SettingsError(f"{name}: cannot read the {noun}: {e.strerror}") from None
    if len(data) > limit:
        raise SettingsError(f"{name}: the file is more than the {_size(limit)} allowed for {what}")
    return data


def decode_utf8(data, name):
    """`data` as text; a SettingsError naming `name`, the byte and its offset if not UTF-8."""
    from nanosample.settings import SettingsError

    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SettingsError(f"{name}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                            f"{e.start})") from None


def read_user_text(path, name, *, what="a text file", limit=CONFIG_LIMIT):
    """A user's UTF-8 file as text, bounded as read_user_bytes reads it."""
    return decode_utf8(read_user_bytes(path, name, what=what, limit=limit), name)


def parse_toml(text, name):
    """A TOML file's table; invalid or absurdly nested TOML is a SettingsError naming `name`."""
    import tomllib

    from nanosample.settings import SettingsError

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"{name}: invalid TOML: {e}") from None
    except (RecursionError, MemoryError):
        raise SettingsError(f"{name}: invalid TOML: nested too deeply") from None


def check_text_arg(text, name):
    """A text flag (a prompt, a stop string) must be UTF-8: the shell hands undecodable bytes
    over as lone surrogates (Python's surrogateescape), which would otherwise turn into U+FFFD
    here and an error in a FILE: prompt. A SettingsError naming the byte and its position."""
    from nanosample.settings import SettingsError

    for i, ch in enumerate(text):
        if "\udc80" <= ch <= "\udcff":
            raise SettingsError(f"{name}: not UTF-8 text (byte 0x{ord(ch) - 0xdc00:02x} at "
                                f"character {i})")
        if "\ud800" <= ch <= "\udfff":
            raise SettingsError(f"{name}: not UTF-8 text (a lone surrogate U+{ord(ch):04X} at "
                                f"character {i})")
    return text


# ---------------------------------------------------------------------------------------------
# Writing outputs

def _parent(path):
    return os.path.dirname(os.path.abspath(path))


def _existing_ancestor(path):
    """The nearest part of `path` that exists (itself or a parent)."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def check_writable_dir(directory, name):
    """SettingsError naming `name` unless files can be created in `directory` (or, when it
    does not exist yet, in the nearest parent that does, which must be a directory). Tried
    for real: a temporary file is created and removed, as permissions alone do not tell (a
    read-only file system, root)."""
    from nanosample.settings import SettingsError

    try:
        there = _existing_ancestor(directory)
    except ValueError:  # a NUL byte
        raise SettingsError(f"{name}: not a usable path (it holds a NUL byte)") from None
    if not os.path.isdir(there):
        under = "is a file" if there == os.path.abspath(directory) else f"is under {there}, a file"
        raise SettingsError(f"{name}: {under}, not a directory")
    try:
        with tempfile.TemporaryFile(dir=there):
            pass
    except OSError as e:
        raise SettingsError(f"{name}: cannot write in {there} ({e.strerror})") from None


class OutputFile:
    """An output that appears whole or not at all: written to a temporary file beside `path`,
    renamed into place by commit(). Two runs writing the same path never interleave (the
    last to finish wins, whole), and a run that fails midway leaves the old file as it was.

    Checked when made, before any work: `path` is not a directory, its directory exists and
    takes new files (the temporary file is created then), and an existing file is replaced
    only with `overwrite`. A device or a FIFO that exists (/dev/stdout, /dev/null) is written
    directly: there is nothing to replace, and it cannot be renamed over.
    Errors are SettingsError (when made) or RunError (when written), both naming `name`.
    """

    def __init__(self, path, name, *, overwrite=False):
        from nanosample.settings import SettingsError

        self.path, self.name, self.overwrite = path, name, overwrite
        self.tmp = None
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            mode = None
        except (ValueError, UnicodeError):
            raise SettingsError(f"{name}: not a usable file path (it holds a NUL byte)") from None
        except OSError as e:
            if e.errno == errno.ENOTDIR:
                raise SettingsError(f"{name}: a part of the path is a file, not a "
                                    f"directory") from None
            raise SettingsError(f"{name}: cannot use this path ({e.strerror})") from None
        if mode is not None and stat.S_ISDIR(mode):
            raise SettingsError(f"{name}: is a directory; give a file path")
        if mode is not None and not stat.S_ISREG(mode):
            self.write_path = path  # a device or a FIFO
            return
        directory = _parent(path)
        if not os.path.isdir(directory):
            raise SettingsError(f"{name}: the directory {os.path.dirname(path) or '.'} does "
                                f"not exist")
        if mode is not None and not overwrite:
            raise SettingsError(f"{name}: the file exists; choose another path, or add "
                                f"--overwrite to replace it")
        base = os.path.basename(path)
        try:
            fd, self.tmp = tempfile.mkstemp(dir=directory, prefix=f".{base}.",
                                            suffix=f".tmp{os.path.splitext(base)[1]}")
        except OSError as e:
            raise SettingsError(f"{name}: cannot write in {directory} ({e.strerror})") from None
        os.close(fd)
        self.write_path = self.tmp  # keeps path's extension: matplotlib reads the format off it

    def open(self, mode="w", **kwargs):
        """The file to write (the temporary one), opened with `open`'s arguments."""
        try:
            return open(self.write_path, mode, **kwargs)
        except OSError as e:
            raise RunError(f"{self.name}: cannot write it ({e.strerror})") from None

    def commit(self):
        """Put the written file in place. Without `overwrite`, a file that appeared at `path`
        during the run is kept and FileExistsError raised (the new one is discarded)."""
        if self.tmp is None:
            return
        tmp, self.tmp = self.tmp, None
        try:
            if self.overwrite:
                os.replace(tmp, self.path)
                return
            try:
                os.link(tmp, self.path)  # never replaces: fails if the path appeared meanwhile
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links
                if os.path.lexists(self.path):
                    raise FileExistsError(errno.EEXIST, "File exists", self.path) from None
                os.replace(tmp, self.path)
                return
        except FileExistsError:
            os.unlink(tmp)
            raise FileExistsError(errno.EEXIST, "File exists", self.path) from None
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise RunError(f"{self.name}: cannot put the file in place ({e.strerror})") from None
        os.unlink(tmp)

    def discard(self):
        """Drop what was written; `path` stays as it was."""
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.tmp = None


def write_whole(output, text):
    """Write `text` to an OutputFile and put it in place; RunError naming it if that fails."""
    try:
        with output.open("w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        output.discard()
        raise RunError(f"{output.name}: cannot write it ({e.strerror})") from None
    output.commit()


# ---------------------------------------------------------------------------------------------
# Memory: refuse what cannot fit before allocating it

def available_memory_bytes(device="cpu"):
    """Bytes a run may still allocate on `device`: free GPU memory, or MemAvailable (Linux;
    else the physical memory). None when unknown."""
    if str(device).startswith("cuda"):
        import torch
        return torch.cuda.mem_get_info(torch.device(device))[0]
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def generation_bytes(n_layer, n_embd, vocab_size, batch, positions, dtype_bytes):
    """Memory one batch of generate() holds: the KV cache, 2 (k and v) x n_layer x batch x
    positions x n_embd values, plus the sampler's (batch, vocab) rows (logits and its float32
    and float64 working copies, ~6 of them)."""
    cache = 2 * n_layer * batch * positions * n_embd * dtype_bytes
    rows = 6 * batch * vocab_size * 8
    return cache + rows


def gib(n):
    return f"{n / 2**30:.1f} GiB" if n < 2**40 * 10 else f"{n / 2**30:.3g} GiB"


def peak_rss_mb():
    """This process's peak resident set size so far, in MiB.

    VmHWM rather than getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child
    would report its parent's peak (a parent that just wrote a checkpoint holds ~1 GB).
    """
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    import resource  # not Linux: ru_maxrss is bytes on macOS, KiB elsewhere
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024
