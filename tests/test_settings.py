"""settings.py: flags and config files -> frozen dataclasses, precedence, and the errors users see."""

import os
import sys
from dataclasses import dataclass, fields

import pytest

from nanosample.settings import (HelpRequested, SampleSettings, SettingsError, parse_logit_bias,
                      parse_settings, read_config_file, setting)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ["greedy", "nanogpt", "article_top_k", "article_top_p", "creative", "focused"]


@dataclass(frozen=True)
class Demo:
    """A dataclass of every supported field type: the parser is generic."""
    name: str = setting("demo", "a string")
    steps: int = setting(3, "an integer")
    rate: float = setting(0.5, "a number")
    fast: bool = setting(False, "a switch")
    limit: int | None = setting(None, "an optional integer")
    label: str | None = setting("x", "an optional string")
    tags: tuple[str, ...] = setting((), "strings, repeatable")
    ids: tuple[int, ...] = setting((), "integers, repeatable")

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps={self.steps}: must be >= 0")


def parse(*argv, cls=Demo):
    return parse_settings(cls, list(argv), prog="demo")


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_of(*argv, cls=Demo):
    with pytest.raises(SettingsError) as info:
        parse(*argv, cls=cls)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Flags

def test_defaults_without_arguments():
    assert parse() == Demo()
    assert parse(cls=SampleSettings) == SampleSettings()


def test_both_flag_forms_and_types():
    s = parse("--name=abc", "--steps", "7", "--rate=-0.25", "--limit", "12", "--label=None")
    assert (s.name, s.steps, s.rate, s.limit, s.label) == ("abc", 7, -0.25, 12, None)
    assert isinstance(s.rate, float) and isinstance(s.steps, int)


def test_a_value_may_start_with_a_dash_or_hold_an_equals_sign():
    s = parse("--rate", "-1.5", "--name", "--x", "--label=a=b")
    assert (s.rate, s.name, s.label) == (-1.5, "--x", "a=b")


def test_none_for_optional_values():
    assert parse("--limit=None").limit is None
    assert parse("--limit", "None").limit is None
    assert parse("--limit=5", "--limit=None").limit is None  # the last flag wins
    assert parse(cls=SampleSettings, *["--top_k=None"]).top_k is None
    assert parse(cls=SampleSettings, *["--top_k=None"]).sampling_params().top_k == 0  # off
    assert parse(cls=SampleSettings, *["--stream=None"]).stream is None
    assert "--steps: expected an integer, got 'None'" in error_of("--steps=None")


def test_bool_flags():
    assert parse("--fast").fast is True
    assert parse("--fast=False").fast is False
    assert parse("--fast=true").fast is True
    assert parse("--fast", "false").fast is False
    assert parse(cls=SampleSettings, *["--stream", "None"]).stream is None
    assert parse(cls=SampleSettings, *["--stop_at_eot=False"]).stop_at_eot is False
    assert error_of("--fast=maybe") == "--fast: expected true or false, got 'maybe'"


def test_bare_bool_flag_does_not_swallow_a_config_file(tmp_path):
    path = write(tmp_path, "a.toml", "steps = 9\n")
    s = parse("--fast", path)
    assert (s.fast, s.steps) == (True, 9)


def test_repeated_list_flags_add_up():
    s = parse("--tags=a,b", "--tags", "c", "--ids=1,2", "--ids=3")
    assert s.tags == ("a,b", "c")  # a string keeps its commas: stop strings may hold them
    assert s.ids == (1, 2, 3)
    s = parse(cls=SampleSettings, *["--stop", "\n\n", "--stop=THE END", "--ban=50256,198"])
    assert s.stop == ("\n\n", "THE END") and s.ban == (50256, 198)


def test_dashes_in_flag_names_work_too():
    assert parse(cls=SampleSettings, *["--top-k=5", "--max-new-tokens", "7"]).top_k == 5


@pytest.mark.parametrize("argv, message", [
    (["--steps=abc"], "--steps: expected an integer, got 'abc'"),
    (["--steps=1.5"], "--steps: expected an integer, got '1.5'"),
    (["--rate=fast"], "--rate: expected a number, got 'fast'"),
    (["--steps"], "--steps: needs a value (an integer)"),
    (["--name", "--steps=2"], "--name: needs a value (a string)"),
    (["--ids=1,,2"], "--ids: expected a list of integers separated by commas, got '1,,2'"),
    (["-x"], "-x: unknown flag; flags look like --key=value (see --help)"),
    (["--config"], "--config: needs a file path"),
    (["--steps=-1"], "--steps=-1: must be >= 0"),  # the dataclass's own check, named by its flag
])
def test_flag_errors(argv, message):
    assert error_of(*argv) == message


def test_unknown_flag_suggests_the_closest():
    assert error_of("--step=2") == "--step: unknown flag; did you mean --steps?"
    assert error_of("--tmperature=1", cls=SampleSettings) == \
        "--tmperature: unknown flag; did you mean --temperature?"
    assert error_of("--qqqqq=1") == "--qqqqq: unknown flag; see --help for the list"


# ---------------------------------------------------------------------------------------------
# Config files and precedence

def test_precedence_defaults_then_configs_in_order_then_flags(tmp_path):
    first = write(tmp_path, "first.toml", 'steps = 1\nrate = 2\nname = "first"\n')
    second = write(tmp_path, "second.py", "rate = 3.5\nname = 'second'\n")
    s = parse(first, second)
    assert (s.steps, s.rate, s.name, s.fast) == (1, 3.5, "second", False)
    # flags win wherever they stand, even before the config files
    s = parse("--name=flag", first, f"--config={second}")
    assert (s.steps, s.rate, s.name) == (1, 3.5, "flag")
    s = parse("--config", second, first)  # order is the command line's
    assert (s.rate, s.name) == (2.0, "first")


def test_toml_values_are_typed(tmp_path):
    path = write(tmp_path, "c.toml", 'rate = 1\nfast = true\nlimit = "None"\ntags = ["a", "b"]\n'
                                     'ids = [3, 4]\nlabel = "None"\n')
    s = parse(path)
    assert s.rate == 1.0 and isinstance(s.rate, float)
    assert (s.fast, s.limit, s.tags, s.ids, s.label) == (True, None, ("a", "b"), (3, 4), None)
    assert parse(write(tmp_path, "d.toml", 'tags = "one"\n')).tags == ("one",)


def test_flags_replace_a_config_list(tmp_path):
    path = write(tmp_path, "c.toml", 'tags = ["a", "b"]\n')
    assert parse(path, "--tags=c").tags == ("c",)


def test_python_config_in_nanogpt_style(tmp_path):
    path = write(tmp_path, "c.py", '"""a docstring"""\n# a comment\nsteps = 4\nlimit = None\n'
                                   "tags = ['x']\nfast = True\nsteps = 5  # the last one wins\n")
    s = parse(path)
    assert (s.steps, s.limit, s.tags, s.fast) == (5, None, ("x",), True)


@pytest.mark.parametrize("line", [
    "open(MARKER, 'w').write('ran')",
    "steps = len(open(MARKER, 'w').write('ran') * 'x')",
    "import os; os.system('touch ' + MARKER)",
    "__import__('os').system('touch ' + MARKER)",
    "def f(): open(MARKER, 'w')",
])
def test_python_config_is_never_executed(tmp_path, line):
    marker = tmp_path / "marker"
    path = write(tmp_path, "evil.py", f"MARKER = {str(marker)!r}\nsteps = 2\n{line}\n")
    message = error_of(path)
    assert message.startswith(f"{path}:3: ")
    assert "literal" in message
    assert not marker.exists()


def test_python_config_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "bad.py", "steps = 1\nrate = = 2\n")
    assert error_of(path).startswith(f"{path}:2: invalid Python syntax")


@pytest.mark.parametrize("name, text, message", [
    ("a.toml", "stepz = 2\n", "{path}: unknown key 'stepz'; did you mean 'steps'?"),
    ("a.py", "rat = 2\n", "{path}:1: unknown key 'rat'; did you mean 'rate'?"),
    ("a.toml", 'steps = "two"\n', "{path}: steps: expected an integer, got 'two'"),
    ("a.toml", "steps = 2.5\n", "{path}: steps: expected an integer, got 2.5"),
    ("a.toml", 'fast = "yes"\n', "{path}: fast: expected true or false, got 'yes'"),
    ("a.toml", "ids = [1, 'x']\n", "{path}: ids: expected a list of integers, got [1, 'x']"),
    ("a.toml", "[section]\nsteps = 2\n", "{path}: unknown key 'section'; see --help for the list"),
    ("a.toml", "steps = -3\n", "{path}: steps=-3: must be >= 0"),
    ("a.py", "steps = -3\n", "{path}:1: steps=-3: must be >= 0"),
])
def test_config_errors(tmp_path, name, text, message):
    path = write(tmp_path, name, text)
    assert error_of(path) == message.format(path=path)


def test_config_file_errors(tmp_path):
    assert error_of(str(tmp_path / "none.toml")) == f"{tmp_path / 'none.toml'}: no such config file"
    assert error_of("steps=3") == "steps=3: no such config file (flags start with --, e.g. --steps=3)"
    assert error_of(str(tmp_path)) == f"{tmp_path}: is a directory, not a config file"
    path = write(tmp_path, "c.yaml", "steps: 3\n")
    assert error_of(path) == f"{path}: config files must be .toml or nanoGPT-style .py files"
    path = write(tmp_path, "bad.toml", "steps = \n")
    assert error_of(path).startswith(f"{path}: invalid TOML: ")
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'name = "caf\xe9"\n')
    assert error_of(str(path)) == f"{path}: not UTF-8 text (byte 0xe9 at offset 11)"


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_config(tmp_path):
    path = write(tmp_path, "secret.toml", "steps = 1\n")
    os.chmod(path, 0)
    assert error_of(path) == f"{path}: cannot read the config file: Permission denied"


def test_read_config_file_reports_where_each_value_came_from(tmp_path):
    path = write(tmp_path, "c.py", "\nsteps = 4\n")
    assert read_config_file(path) == {"steps": (4, f"{path}:2")}


# ---------------------------------------------------------------------------------------------
# --help

def test_help_lists_every_field_with_type_default_and_meaning():
    with pytest.raises(HelpRequested) as info:
        parse_settings(SampleSettings, ["--top_k=5", "--help"], prog="sample.py")
    text = info.value.text
    assert text.startswith("usage: sample.py")
    for f in fields(SampleSettings):
        assert f.metadata["help"], f"{f.name} has no help string"
        line = next(l for l in text.splitlines() if l.strip().startswith(f"--{f.name}="))
        assert "(default: " in line
        assert f.metadata["help"].split()[0] in text
    assert "--top_k=INT|None    (default: 200)" in text
    assert "--temperature=FLOAT    (default: 0.8)" in text
    assert "--start=STR    (default: '\\n')" in text
    assert "--stop=STR (repeatable)    (default: (none))" in text
    assert "--config=PATH" in text


def test_help_for_any_dataclass():
    with pytest.raises(HelpRequested) as info:
        parse("-h")
    assert "--ids=INT[,INT...] (repeatable)    (default: (none))" in info.value.text
    assert "      integers, repeatable" in info.value.text


# ---------------------------------------------------------------------------------------------
# SampleSettings: nanoGPT's defaults and the checks of SAMPLING.md §3

def test_sample_defaults_are_nanogpts():
    s = SampleSettings()
    assert (s.init_from, s.out_dir, s.start, s.num_samples, s.max_new_tokens, s.temperature,
            s.top_k, s.seed, s.device, s.compile) == \
        ("shakespeare_char", "out", "\n", 10, 500, 0.8, 200, 1337, "auto", False)


@pytest.mark.parametrize("flag, message", [
    ("--temperature=-1", "--temperature=-1.0: must be a finite number >= 0 (0 = greedy)"),
    ("--temperature=nan", "--temperature=nan: must be a finite number >= 0 (0 = greedy)"),
    ("--temperature=inf", "--temperature=inf: must be a finite number >= 0 (0 = greedy)"),
    ("--top_k=-1", "--top_k=-1: must be an integer >= 0 (0 = off)"),
    ("--top_p=0", "--top_p=0.0: must be a number > 0 and <= 1 (1 = off)"),
    ("--top_p=1.5", "--top_p=1.5: must be a number > 0 and <= 1 (1 = off)"),
    ("--min_p=2", "--min_p=2.0: must be a number >= 0 and <= 1 (0 = off)"),
    ("--repetition_penalty=0", "--repetition_penalty=0.0: must be a finite number > 0 (1 = off)"),
    ("--frequency_penalty=3", "--frequency_penalty=3.0: must be a number from -2 to 2 (0 = off)"),
    ("--presence_penalty=-2.5", "--presence_penalty=-2.5: must be a number from -2 to 2 (0 = off)"),
    ("--num_samples=0", "--num_samples=0: must be an integer >= 1"),
    ("--max_new_tokens=-1", "--max_new_tokens=-1: must be an integer >= 0"),
    ("--seed=-5", "--seed=-5: must be an integer >= 0 and < 2**63"),
    ("--batch_size=0", "--batch_size=0: must be an integer >= 1, or None for no cap"),
    ("--device=gpu", "--device=gpu: must be auto, cpu, cuda, cuda:N or mps"),
    ("--dtype=float64", "--dtype=float64: must be auto, float32, bfloat16 or float16"),
    ("--ban=-3", "--ban=-3: token ids must be >= 0"),
    ("--logit_bias=50256", "--logit_bias=50256: must be ID:BIAS pairs separated by commas, "
                           "e.g. 50256:-100,198:2.5"),
    ("--logit_bias=1:nan", "--logit_bias=1:nan: each bias must be a finite number (use --ban "
                           "to ban a token)"),
    ("--logit_bias=1:2,1:3", "--logit_bias=1:2,1:3: token id 1 is given twice"),
    ("--stop=", "--stop='': stop strings must not be empty"),
    ("--explain_sample=10", "--explain_sample=10: must be >= 0 and < num_samples (10)"),
    ("--explain_top=0", "--explain_top=0: must be an integer >= 1"),
    ("--plot=out.jpgx", "--plot=out.jpgx: must be a file path ending in .png, .svg or .pdf"),
])
def test_sample_settings_refuse_bad_values(flag, message):
    assert error_of(flag, cls=SampleSettings) == message


def test_plot_step_must_be_a_step_that_exists():
    assert error_of("--plot=a.png", "--max_new_tokens=5", "--plot_step=5", cls=SampleSettings) == \
        "--plot_step=5: must be >= 0 and < max_new_tokens (5)"


def test_a_bad_value_from_a_config_file_names_the_file(tmp_path):
    path = write(tmp_path, "c.toml", "top_p = 1.5\n")
    assert error_of(path, cls=SampleSettings) == \
        f"{path}: top_p=1.5: must be a number > 0 and <= 1 (1 = off)"
    # ... unless a flag replaces it
    assert parse(path, "--top_p=0.5", cls=SampleSettings).top_p == 0.5


def test_sampling_params_carry_every_sampler_value():
    s = parse(cls=SampleSettings, *["--temperature=0.5", "--top_k=0", "--top_p=0.9", "--min_p=0.1",
              "--repetition_penalty=1.2", "--frequency_penalty=0.5", "--presence_penalty=-0.5",
              "--logit_bias=50256:-100, 198:2.5", "--ban=7,3", "--ban=7"])
    p = s.sampling_params()
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.5, 0, 0.9, 0.1)
    assert (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) == (1.2, 0.5, -0.5)
    assert p.logit_bias == ((50256, -100.0), (198, 2.5))
    assert p.banned_ids == (3, 7)


def test_parse_logit_bias():
    assert parse_logit_bias(None) == ()
    assert parse_logit_bias("5:1") == ((5, 1.0),)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_are_valid_and_say_what_they_are_for(preset):
    path = os.path.join(REPO, "configs", f"{preset}.toml")
    with open(path, encoding="utf-8") as f:
        assert f.readline().startswith("# "), "a preset opens with a comment saying what it is for"
    s = parse_settings(SampleSettings, [path])
    s.sampling_params()


def test_preset_values():
    def load(name):
        return parse_settings(SampleSettings, [os.path.join(REPO, "configs", f"{name}.toml")])
    assert load("greedy").temperature == 0
    nanogpt = load("nanogpt")
    assert (nanogpt.temperature, nanogpt.top_k, nanogpt.num_samples, nanogpt.max_new_tokens) == \
        (0.8, 200, 10, 500)
    assert load("article_top_p").top_p == 0.95 and load("article_top_p").top_k == 0
    assert load("article_top_k").top_k == 50
