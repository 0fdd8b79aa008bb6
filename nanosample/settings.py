"""Settings: the frozen dataclasses that hold each script's defaults, and the one parser that
turns config files and command-line flags into them.

`parse_settings(cls, argv)` works for any frozen dataclass whose fields are int, float, bool,
str, `X | None` or `tuple[X, ...]`: the flags, the config-file keys and `--help` are all
generated from the fields, so they never disagree. Each field's meaning is the "help" string
in its metadata (`setting(default, "meaning")`), the one place it is written.

Precedence: defaults < each config file, in the order given < flags. Config files are TOML,
or nanoGPT-style `.py` files made only of `key = literal` lines, which are parsed with `ast`
and never executed. Every user mistake is a `SettingsError`: one line that starts with the
flag or file it is about, which scripts print as `error: <message>` and exit 2.
`read_settings` also says where each field was set and which keys were ignored: nanoGPT's own
config files (its train.py's and bench.py's settings) work for SampleSettings, see
"nanoGPT's config files" below.

`SampleSettings` holds `sample.py`'s settings and validates them (SAMPLING.md §3) when it is
built, so a bad value is refused before any model loads.
"""

from __future__ import annotations

import ast
import difflib
import os
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field, fields

from nanosample import cli
from nanosample.sampler_settings import SETTINGS as SAMPLER_SETTINGS
from nanosample.sampler_settings import SamplingParams, parse_logit_bias, sampler_fields  # noqa: F401


class SettingsError(ValueError):
    """A user's mistake in a flag or a config file: one line, starting with the flag or file."""


class HelpRequested(Exception):
    """`-h`/`--help` was given. `text` is the help to print; the script then exits 0."""

    def __init__(self, text):
        super().__init__(text)
        self.text = text


def parse_for_main(cls, argv, prog, description):
    """`parse_settings` for a script's main(): returns (settings, None), or (None, exit code)
    once `--help` is printed (0) or the one-line `error:` is (2)."""
    try:
        return parse_settings(cls, argv, prog=prog, description=description), None
    except HelpRequested as h:
        print(h.text)
        return None, 0
    except SettingsError as e:
        return None, cli.report_error(e)


def setting(default, help):
    """A dataclass field with its meaning attached; `--help` prints it."""
    return field(default=default, metadata={"help": help})


# ---------------------------------------------------------------------------------------------
# Field types

@dataclass(frozen=True)
class _Kind:
    """What a field accepts: a scalar type, maybe None, maybe several of them."""
    base: type       # int, float, bool or str
    optional: bool   # `X | None`: the literal None is accepted
    many: bool       # `tuple[X, ...]`: a repeatable flag, a list in config files

    def describe(self):
        what = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[self.base]
        if self.many:
            what = "a list of " + {int: "integers", float: "numbers", bool: "booleans", str: "strings"}[self.base]
        return what + " or None" if self.optional else what

    def metavar(self):
        name = self.base.__name__.upper()
        if self.base is bool and not self.many:
            name = "[true|false]"
        if self.many:
            name = "STR (repeatable)" if self.base is str else f"{name}[,{name}...] (repeatable)"
        return name + "|None" if self.optional else name


def _kind_of(annotation):
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        assert len(rest) == 1, f"only `X | None` unions are supported, not {annotation}"
        optional, annotation = True, rest[0]
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        assert len(args) == 2 and args[1] is Ellipsis and args[0] in (int, float, str), \
            f"only tuple[int|float|str, ...] is supported, not {annotation}"
        return _Kind(args[0], optional, True)
    assert annotation in (int, float, bool, str), f"unsupported settings type {annotation}"
    return _Kind(annotation, optional, False)


def _kinds(cls):
    assert cls.__dataclass_params__.frozen, f"{cls.__name__} must be a frozen dataclass"
    hints = typing.get_type_hints(cls)
    return {f.name: _kind_of(hints[f.name]) for f in fields(cls)}


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _short(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _scalar_from_text(base, text):
    """A flag's text as `base`; ValueError saying what was expected."""
    if base is str:
        return text
    if base is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"expected true or false, got {_short(text)}")
    try:
        return base(text.strip())
    except ValueError:
        kind = "an integer" if base is int else "a number"
        raise ValueError(f"expected {kind}, got {_short(text)}") from None


def _value_from_text(kind, text):
    """A flag's text as a value of the field's kind."""
    if kind.optional and text == "None":
        return None
    if not kind.many:
        return _scalar_from_text(kind.base, text)
    if kind.base is str:
        return (text,)  # one string per flag: stop strings may hold commas
    parts = [p.strip() for p in text.split(",")]
    if "" in parts:
        raise ValueError(f"expected {kind.describe()} separated by commas, got {_short(text)}")
    return tuple(_scalar_from_text(kind.base, p) for p in parts)


def _scalar_from_file(base, value):
    """A config file's value (TOML or a Python literal) checked against `base`."""
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"expected {_Kind(base, False, False).describe()}, got {_short(value)}")
    return value


def _value_from_file(kind, value):
    # A NUL byte can come only from a file (argv cannot hold one); no path or text needs it.
    if any(isinstance(v, str) and "\x00" in v
           for v in (value if isinstance(value, list) else [value])):
        raise ValueError("holds a NUL byte (\\x00 or \\u0000), which no setting accepts")
    # TOML has no null, so the string "None" means None there, as it does on the command line.
    if kind.optional and (value is None or value == "None"):
        return None
    if not kind.many:
        return _scalar_from_file(kind.base, value)
    items = value if isinstance(value, (list, tuple)) else [value]
    try:
        return tuple(_scalar_from_file(kind.base, v) for v in items)
    except ValueError:
        raise ValueError(f"expected {kind.describe()}, got {_short(value)}") from None


def _suggest(name, candidates, form):
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f"; did you mean {form.format(close[0])}?" if close else "; see --help for the list"


# ---------------------------------------------------------------------------------------------
# Config files

def read_config_file(path, foreign_keys=()):
    """Read a TOML or `key = literal` .py config file: {key: (value, where)}.

    `where` names the file, and the line for .py files, for error messages. Keys are not
    checked here; `parse_settings` checks them against the dataclass. `foreign_keys`: another
    program's settings (nanoGPT's train.py); a .py file that sets one of them is that
    program's config file, and may also hold `import` lines and expressions, see
    `_read_python_config`.
    """
    # A regular file of at most cli.CONFIG_LIMIT bytes: never /dev/zero, never a FIFO's wait.
    hint = f" (flags start with --, e.g. --{path})" if "=" in path else ""
    data = cli.read_user_bytes(path, path, what="a config file", noun="config file",
                               missing_hint=hint)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".toml", ".py"):
        raise SettingsError(f"{path}: config files must be .toml or nanoGPT-style .py files")
    text = cli.decode_utf8(data, path)
    if suffix == ".toml":
        return {key: (value, path) for key, value in cli.parse_toml(text, path).items()}
    return _read_python_config(path, text, foreign_keys)


class Unevaluated:
    """A .py config value that is not a literal (nanoGPT's `'ft-' + str(time.time())`): never
    evaluated. Harmless for a key that is ignored; an error for a key that is used."""

    def __init__(self, where, name):
        self.where, self.name = where, name

    def error(self):
        return SettingsError(f"{self.where}: {self.name}: the value must be a literal (a number, "
                             f"string, True/False, None or a list of them), not an expression")


def _read_python_config(path, text, foreign_keys=()):
    # nanoGPT exec()s its config files; we only accept `name = literal` and never run anything.
    # One of nanoGPT's own files (it sets a key of `foreign_keys`) may also hold `import` lines
    # and expressions (config/finetune_shakespeare.py: wandb_run_name = 'ft-' + str(time.time())):
    # the imports are skipped, the expressions kept unevaluated (Unevaluated).
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as e:
        raise SettingsError(f"{path}:{e.lineno}: invalid Python syntax: {e.msg}") from None
    except (MemoryError, RecursionError):  # e.g. 200,000 unary minus signs in a row
        raise SettingsError(f"{path}: too deeply nested for a config file of `key = literal` "
                            f"lines") from None
    lines = text.splitlines()
    values = {}
    foreign = any(isinstance(node, ast.Assign) and len(node.targets) == 1
                  and isinstance(node.targets[0], ast.Name) and node.targets[0].id in foreign_keys
                  for node in tree.body)
    for node in tree.body:
        where = f"{path}:{node.lineno}"
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str):
            continue  # a docstring
        if foreign and isinstance(node, (ast.Import, ast.ImportFrom)):
            continue  # never run: nothing here evaluates what it would bring in
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            found = lines[node.lineno - 1].strip()
            found = found if len(found) <= 40 else found[:37] + "..."
            raise SettingsError(f"{where}: only `key = literal` lines are allowed in a .py config, "
                                f"found `{found}`")
        name = node.targets[0].id
        try:
            value = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            if not foreign:
                raise Unevaluated(where, name).error() from None
            value = Unevaluated(where, name)
        values[name] = (value, where)
    return values


# ---------------------------------------------------------------------------------------------
# The parser

def _looks_like_flag(arg, kinds):
    name = arg[2:].partition("=")[0].replace("-", "_")
    return arg.startswith("--") and (name in kinds or name in ("config", "help"))


@dataclass(frozen=True)
class ParsedSettings:
    """What `read_settings` found: the settings, and where each came from."""
    settings: object
    sources: dict   # field -> where the user set it: "--key", "path" (TOML) or "path:line"
    ignored: dict   # another program's key in a config file (nanoGPT's) -> that file, in order


def parse_settings(cls, argv=None, *, prog=None, description=""):
    """Build `cls` from defaults < config files (in order) < flags.

    argv: the arguments (default sys.argv[1:]). Positional arguments and `--config=PATH` are
    config files; `--key=value` and `--key value` set one field; a bool field's bare `--key`
    means true; `None` sets an optional field to None; a tuple field's flag may be repeated
    (flags replace a config file's list, repeats add to each other). Raises SettingsError on
    any mistake, HelpRequested for -h/--help.
    """
    return read_settings(cls, argv, prog=prog, description=description).settings


def read_settings(cls, argv=None, *, prog=None, description=""):
    """`parse_settings`, also saying which fields the user set and which keys were ignored.

    A class that reads nanoGPT's config files (`NANOGPT_CONFIG = True`, as SampleSettings)
    accepts the settings of nanoGPT's train.py and bench.py in them: see `_nanogpt_entries`.
    """
    kinds = _kinds(cls)
    foreign = _nanogpt_foreign_keys(kinds) if getattr(cls, "NANOGPT_CONFIG", False) else frozenset()
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0])
    if "-h" in argv or "--help" in argv:
        raise HelpRequested(settings_help(cls, prog=prog, description=description))

    # Every flag is checked before any file is read: a mistyped flag is reported as itself,
    # not as whatever the config file it came with says.
    config_paths, flags = _split_argv(argv, kinds)
    values, sources, ignored = _read_config_files(config_paths, kinds, foreign)
    for key, value in flags.items():  # flags come last: they win over every file
        values[key] = value
        sources[key] = f"--{key}"

    try:
        return ParsedSettings(cls(**values), sources, ignored)
    except ValueError as e:
        raise SettingsError(name_the_source(str(e), sources)) from None


def _split_argv(argv, kinds):
    """The command line as (config file paths, in order; {field: value} of the flags)."""
    config_paths, flags = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("-"):
            config_paths.append(arg)
            continue
        if not arg.startswith("--") or arg == "--":
            raise SettingsError(f"{arg}: unknown flag; flags look like --key=value (see --help)")
        name, has_value, text = arg[2:].partition("=")
        name = name.replace("-", "_")  # --top-k works as well as nanoGPT's --top_k
        if name == "config":
            if not has_value:
                if i >= len(argv) or _looks_like_flag(argv[i], kinds):
                    raise SettingsError("--config: needs a file path")
                text, i = argv[i], i + 1
            config_paths.append(text)
            continue
        if name not in kinds:
            raise SettingsError(f"--{name}: unknown flag" + _suggest(name, list(kinds), "--{}"))
        kind = kinds[name]
        if not has_value:
            text, i = _separate_flag_value(name, kind, argv, i, kinds)
        try:
            value = _value_from_text(kind, text)
        except ValueError as e:
            raise SettingsError(f"--{name}: {e}") from None
        if kind.many and value is not None and flags.get(name) is not None:
            value = flags[name] + value  # a tuple field's repeated flag adds to the list
        flags[name] = value
    return config_paths, flags


def _separate_flag_value(name, kind, argv, i, kinds):
    """The value of `--name value` (no `=`), which is argv[i]: (its text, the next index)."""
    if kind.base is bool and not kind.many:
        # A bare bool flag means true; it takes the next word only when that is a
        # boolean, so `--compile configs/x.toml` still reads the config file.
        words = _TRUE[:3] + _FALSE[:3]
        if i < len(argv) and (argv[i].lower() in words
                              or kind.optional and argv[i] == "None"):
            return argv[i], i + 1
        return "true", i
    if i >= len(argv) or _looks_like_flag(argv[i], kinds):
        raise SettingsError(f"--{name}: needs a value ({kind.describe()})")
    return argv[i], i + 1


def _read_config_files(config_paths, kinds, foreign):
    """The config files' values, later files winning: (values, sources, ignored), as
    ParsedSettings names them. `foreign`: nanoGPT's keys, set aside by `_nanogpt_entries`."""
    values, sources, ignored = {}, {}, {}
    for path in config_paths:
        entries = read_config_file(path, foreign)
        if any(key in foreign for key in entries):
            entries, skipped = _nanogpt_entries(path, entries, foreign)
            for key, where in skipped.items():
                ignored.setdefault(key, where)  # the first file that set it is the one named
        for key, (value, where) in entries.items():
            if key not in kinds:
                known = list(kinds) + sorted(foreign)  # a mistyped nanoGPT key gets its name
                raise SettingsError(f"{where}: unknown key '{key}'" + _suggest(key, known, "'{}'"))
            if isinstance(value, Unevaluated):
                raise value.error()
            try:
                values[key] = _value_from_file(kinds[key], value)
            except ValueError as e:
                raise SettingsError(f"{where}: {key}: {e}") from None
            sources[key] = where
    return values, sources, ignored


# ---------------------------------------------------------------------------------------------
# nanoGPT's config files

# The settings of nanoGPT's train.py and bench.py: the names each assigns in its block of
# defaults, before it exec()s configurator.py (karpathy/nanoGPT, master). Its config files set
# them (config/train_shakespeare_char.py, train_gpt2.py, finetune_shakespeare.py,
# eval_gpt2*.py), and its sample.py runs any of them. Every setting of its sample.py is a
# SampleSettings field.
NANOGPT_TRAIN_KEYS = (
    "out_dir", "eval_interval", "log_interval", "eval_iters", "eval_only",
    "always_save_checkpoint", "init_from", "wandb_log", "wandb_project", "wandb_run_name",
    "dataset", "gradient_accumulation_steps", "batch_size", "block_size", "n_layer", "n_head",
    "n_embd", "dropout", "bias", "learning_rate", "max_iters", "weight_decay", "beta1", "beta2",
    "grad_clip", "decay_lr", "warmup_iters", "lr_decay_iters", "min_lr", "backend", "device",
    "dtype", "compile")
NANOGPT_BENCH_KEYS = ("batch_size", "block_size", "bias", "real_data", "seed", "device", "dtype",
                      "compile", "profile")
# Shared names that mean something else in training: its micro-batch is not our memory cap.
NANOGPT_TRAINING_MEANING = ("batch_size",)


def _nanogpt_foreign_keys(kinds):
    """The keys of nanoGPT's config files that a class reading them accepts and ignores."""
    shared_by_name = set(kinds) - set(NANOGPT_TRAINING_MEANING)
    return frozenset(NANOGPT_TRAIN_KEYS + NANOGPT_BENCH_KEYS) - shared_by_name


def _nanogpt_entries(path, entries, foreign):
    """A nanoGPT config's entries: (those used, {ignored key: path}).

    Ignored: the keys only nanoGPT's train.py and bench.py have, and batch_size, their
    micro-batch. A training config (one that sets a train.py key) names the model it trains:
    train.py writes it to out_dir, so sampling loads it from there (init_from='resume', the
    default of nanoGPT's sample.py), and the file's own init_from, where training started
    ('scratch', or 'gpt2-xl' in finetune_shakespeare.py), is ignored. An evaluation config
    (eval_only = True, as eval_gpt2.py) trains nothing: its init_from is the model to load.
    """
    training = set(NANOGPT_TRAIN_KEYS) & foreign & set(entries)
    evaluating = entries.get("eval_only", (None,))[0] is True
    used, ignored = {}, {}
    for key, (value, where) in entries.items():
        if key in foreign or key == "init_from" and training and not evaluating:
            ignored[key] = path
        else:
            used[key] = (value, where)
    if training and not evaluating:
        used["init_from"] = ("resume", path)
    return used, ignored


def name_the_source(message, sources):
    """Start a validation error ("top_p=1.5: ...") with the flag or file that set the value."""
    message = cli.one_line(message)  # whatever the validator wrote
    m = re.match(r"(\w+)=", message)
    if m and m.group(1) in sources:
        source = sources[m.group(1)]
        return "--" + message if source.startswith("--") else f"{source}: {message}"
    return message


def _show_default(value):
    if isinstance(value, tuple):
        return ", ".join(repr(v) for v in value) if value else "(none)"
    return repr(value) if isinstance(value, str) else str(value)


def settings_help(cls, *, prog, description=""):
    """The `--help` text: every field with its type, default and meaning."""
    kinds = _kinds(cls)
    out = [f"usage: {prog} [CONFIG_FILE ...] [--key=value | --key value ...]", ""]
    if description:
        out += [textwrap.fill(description, 92), ""]
    out += [textwrap.fill(
        "Config files (TOML, or nanoGPT-style .py files of `key = literal` lines, never executed) "
        "are applied in the order given, then flags: defaults < config files < flags. "
        "Optional values accept None. Bool flags: --flag alone means true.", 92), "", "flags:"]
    for f in fields(cls):
        out.append(f"  --{f.name}={kinds[f.name].metavar()}    (default: {_show_default(f.default)})")
        meaning = f.metadata.get("help", "")
        if meaning:
            out.append(textwrap.fill(meaning, 92, initial_indent=" " * 6, subsequent_indent=" " * 6))
    out.append("  --config=PATH    a config file, applied in order with the positional ones")
    out.append("  -h, --help    show this help and exit")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# sample.py's settings

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE_MODES = ("none", "fp16", "bf16", "int8")  # quantize.MODES, without importing torch here
_PLOT_SUFFIXES = (".png", ".svg", ".pdf")


@dataclass(frozen=True)
@sampler_fields(SAMPLER_SETTINGS, as_flags=True, after="max_new_tokens")  # --temperature ... --ban
class SampleSettings:
    """Everything `sample.py` reads. nanoGPT's flags keep nanoGPT's names, meanings and defaults.
    The sampler's flags come from their one declaration, sampler_settings.SETTINGS."""
    NANOGPT_CONFIG = True  # nanoGPT's config files work too (read_settings); not a field
    # what to load and what to start from (nanoGPT)
    init_from: str = setting("shakespeare_char",
        "what to load: gpt2, gpt2-medium, gpt2-large, gpt2-xl (downloaded from the Hugging Face "
        "hub), resume (nanoGPT's ckpt.pt in --out_dir), a path to a Hugging Face or native model "
        "directory, a nanoGPT out_dir or ckpt.pt file, or the name of a folder in checkpoints/ "
        "(shakespeare_char is the shipped model). Not given: resume when an out_dir is given "
        "(as in nanoGPT), else the shipped model")
    out_dir: str = setting("out", "nanoGPT's output directory, holding ckpt.pt; given by a flag or "
                                  "a config file without --init_from, it is what loads "
                                  "(init_from=resume)")
    start: str = setting("\n",
        "the prompt; FILE:path reads it from a UTF-8 file (used as is, final newline included). "
        "Empty: start from <|endoftext|> for GPT-2 models, from a newline for character models. "
        "Each sample is printed with its prompt, as nanoGPT does")
    num_samples: int = setting(10, "how many samples to draw")
    max_new_tokens: int = setting(500, "tokens to generate per sample (fewer if a stop ends it)")
    seed: int = setting(1337, "random seed; sample i of seed s is the same text however the "
                              "samples are batched")
    draw: str = setting("inverse_cdf",
        "inverse_cdf: each sample draws u from its own generator and takes the token whose "
        "cumulative probability interval holds u (the explain trace shows u); multinomial: "
        "nanoGPT's draw, torch.multinomial on one stream seeded with seed, the samples one "
        "after another (a sample then depends on those before it; temperature and top_k only)")
    context: str = setting("half",
        "past block_size: half = compute the last block_size // 2 tokens again once, then go on "
        "with the KV cache; crop = nanoGPT's rule, the last block_size tokens computed again at "
        "every step (slower)")
    # stopping and batching
    stop: tuple[str, ...] = setting((), "stop a sample when it generates this string (not printed); "
                                        "repeat the flag for several. The shell passes \\n as two "
                                        "characters: use $'\\n' or a TOML config for a newline")
    stop_at_eot: bool = setting(True, "stop a sample at <|endoftext|> (GPT-2 vocabularies)")
    batch_size: int | None = setting(None, "at most this many samples per forward batch (memory "
                                           "cap); None = up to 64 at a time. A batch whose KV "
                                           "cache cannot fit in the memory left is refused")
    stream: bool | None = setting(None, "print tokens as they are generated; None = stream when "
                                        "there is one sample and no --explain, else a progress "
                                        "bar on stderr")
    # hardware (nanoGPT)
    device: str = setting("auto", "cpu, cuda, cuda:N or mps; auto = cuda if available, else mps, "
                                  "else cpu")
    dtype: str = setting("auto", "float32, bfloat16 or float16; auto = bfloat16 on a GPU that "
                                 "supports it, else float32")
    quantize: str = setting("none", "CPU only: the matrix products' weights in fewer bits, "
                                    "faster, a little less exact (docs/speed.md has the "
                                    "figures): fp16, bf16 (fast only on CPUs with AVX-512 "
                                    "BF16 or AMX) or int8 (8-bit inputs too); none = float32. "
                                    "Sample i may then change with --batch_size")
    threads: int | None = setting(None,
        "CPU threads for torch; None = automatic: as many as the model has work for (one per "
        "32M parameters x rows: the shipped model gets 1, GPT-2 124M up to 3), no more than "
        "the cores other processes leave free, looked at again every 2 s. OMP_NUM_THREADS, when "
        "set, is kept. The stderr line after loading says which count ran (docs/speed.md)")
    compile: bool = setting(False, "torch.compile the model. On the CPU it makes these models "
                                   "slower: compiling takes minutes, and compiled GPT-2 decodes at "
                                   "0.2-0.5x eager's speed (bench.py --systems=ours,compiled). Its "
                                   "products round differently: greedy text matched eager's in "
                                   "our tests, but sample i may change with --batch_size "
                                   "(docs/speed.md)")
    cuda_graph: bool | None = setting(None,
        "replay each decode step from a CUDA graph (the prompt and the recomputation past "
        "block_size stay eager); None = on a CUDA device for batches of up to 64 with "
        "--context=half and without --compile, else off; true = every batch, and needs a CUDA "
        "device. Its logits are eager's up to rounding, so a near tie may pick another token "
        "(docs/speed.md)")
    # explain mode: how each token was drawn
    explain: bool = setting(False, "print each sampling decision of one sample as a table on stderr")
    explain_sample: int = setting(0, "which sample --explain shows (0 .. num_samples-1)")
    explain_top: int = setting(10, "candidates per step in the --explain table (the chosen token "
                                   "is always shown)")
    explain_file: str | None = setting(None, "write every step of every sample as JSON Lines to "
                                             "this file")
    plot: str | None = setting(None, "draw the sampling picture of one step to this .png/.svg/.pdf "
                                     "file (needs matplotlib)")
    plot_step: int = setting(0, "which step of --explain_sample --plot draws (0 = the first)")
    html: str | None = setting(None, "write the run as one self-contained HTML page to this file: "
                                     "point at a token to see how it was drawn")
    overwrite: bool = setting(False, "let --explain_file, --plot and --html replace existing "
                                     "files (by default an existing file is an error)")

    def __post_init__(self):
        # Validation at the edge: each check raises ValueError("name=value: what is allowed"),
        # which parse_settings prefixes with the flag or config file that set the value.
        check(self.num_samples >= 1, "num_samples", self.num_samples, "must be an integer >= 1")
        check(self.max_new_tokens >= 0, "max_new_tokens", self.max_new_tokens,
              "must be an integer >= 0")
        check(0 <= self.seed < 2**63, "seed", self.seed, "must be an integer >= 0 and < 2**63")
        check(self.batch_size is None or self.batch_size >= 1, "batch_size", self.batch_size,
              "must be an integer >= 1, or None for no cap")
        for s in self.stop:
            check(s != "", "stop", "''", "stop strings must not be empty")
        check(bool(DEVICE_PATTERN.fullmatch(self.device)), "device", self.device,
              "must be auto, cpu, cuda, cuda:N or mps")
        check(self.dtype in _DTYPES, "dtype", self.dtype,
              "must be auto, float32, bfloat16 or float16")
        check(self.quantize in QUANTIZE_MODES, "quantize", self.quantize,
              f"must be {', '.join(QUANTIZE_MODES[:-1])} or {QUANTIZE_MODES[-1]}")
        check(self.quantize == "none" or not self.compile, "quantize", self.quantize,
              "cannot be combined with --compile (torch.compile does not trace the packed "
              "reduced-precision weights); use one or the other")
        check(self.threads is None or self.threads >= 1, "threads", self.threads,
              "must be an integer >= 1, or None for the automatic choice")
        check(self.draw in ("inverse_cdf", "multinomial"), "draw", self.draw,
              "must be inverse_cdf or multinomial")
        check(self.context in ("half", "crop"), "context", self.context, "must be half or crop")
        if self.cuda_graph:  # whether the device has CUDA is known once it is resolved (sample.py)
            check(not self.compile, "cuda_graph", "true",
                  "cannot be combined with --compile (the graph would run the model's modules "
                  "uncompiled); choose one")
            check(self.context == "half", "cuda_graph", "true",
                  "needs --context=half (crop is there to print nanoGPT's own text, and the "
                  "graph's attention rounds differently from eager's)")
        if self.draw == "multinomial":
            # nanoGPT's sampler has temperature and top-k only; the others have no place in it
            for name, off in (("top_p", 1.0), ("min_p", 0.0), ("repetition_penalty", 1.0),
                              ("frequency_penalty", 0.0), ("presence_penalty", 0.0),
                              ("logit_bias", None), ("ban", ())):
                check(getattr(self, name) == off, name, getattr(self, name),
                      f"--draw=multinomial is nanoGPT's sampler (temperature and top_k only); "
                      f"{name} needs --draw=inverse_cdf")
        check(0 <= self.explain_sample < self.num_samples, "explain_sample", self.explain_sample,
              f"must be >= 0 and < num_samples ({self.num_samples})")
        check(self.explain_top >= 1, "explain_top", self.explain_top, "must be an integer >= 1")
        check(self.explain_file != "", "explain_file", "''", "must be a file path, or None")
        check(self.html != "", "html", "''", "must be a file path, or None")
        if self.plot is not None:
            check(os.path.splitext(self.plot)[1].lower() in _PLOT_SUFFIXES, "plot", self.plot,
                  "must be a file path ending in .png, .svg or .pdf")
            check(0 <= self.plot_step < max(self.max_new_tokens, 1), "plot_step", self.plot_step,
                  f"must be >= 0 and < max_new_tokens ({self.max_new_tokens})")
        check(self.plot_step >= 0, "plot_step", self.plot_step, "must be an integer >= 0")
        self.sampling_params()

    @property
    def explaining(self):
        """Whether any explain output (table, trace file, plot, page) was asked for."""
        return (self.explain or self.explain_file is not None or self.plot is not None
                or self.html is not None)

    def sampling_params(self):
        """The sampler's settings for every sample, as a `SamplingParams`.

        Building it runs the sampler's own checks (SAMPLING.md §3), so the rules live in one
        place: ValueError("top_p=1.5: must be ...").
        """
        return SamplingParams(**{s.name: s.param(getattr(self, s.flag_name))
                                 for s in SAMPLER_SETTINGS})


def check(ok, name, value, allowed):
    """A settings class's validation (its __post_init__): ValueError("name=value: allowed")
    unless `ok`; read_settings names the flag or file that set it."""
    if not ok:
        raise ValueError(f"{name}={value}: {allowed}")
