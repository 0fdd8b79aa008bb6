"""The sampler's settings, declared once: name, flag, type, defaults, check and help text.

`SETTINGS` is the one list. Everything else reads it:
- `SamplingParams` (below), the validated settings of one sample, has one field per entry;
- `settings.SampleSettings` gets one `sample.py` flag per entry (`--help` prints `help`);
- `sampling.BatchParams` turns the numbers into per-row tensors;
- `explain.py` writes the numbers into each trace record, `evaluate.py` sweeps them.

A setting whose flag differs from its field (`--ban` fills `banned_ids`) says so here, and its
error messages name the flag. This module does not import torch, so a bad flag is refused at
once. To add a sampler setting: one `SamplerSetting` here, one transform in sampling.py.

Every number is checked as SAMPLING.md §3 says, and also in float32, the precision the sampler
computes in: a nonzero value that becomes 0, a subnormal number or inf there is refused (a
temperature of 1e-46 is 0 in float32; it must not run as anything).
"""

import math
import struct
from dataclasses import dataclass, field


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32


def float32_problem(x):
    """Why x cannot be a nonzero float32 sampler value ("becomes 0", ...), or None if it can."""
    if x == 0:
        return None
    try:
        as_float32 = struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # older Pythons refuse to pack what rounds past float32's largest
        return "overflows to inf"
    if math.isinf(as_float32):
        return "overflows to inf"
    if as_float32 == 0:
        return "becomes 0"
    if abs(as_float32) < FLOAT32_TINY:
        return "becomes a subnormal number"
    return None


def check_float32(flag, x):
    problem = float32_problem(x)
    if problem:
        raise ValueError(f"{flag}={x!r}: {problem} in float32, the precision the sampler "
                         f"computes in; nonzero values must be 1.2e-38 to 3.4e38 in size")


def number(ok, allowed, float32=True):
    """The check of a number setting: finite, `ok(x)`, and (unless `float32` is False, for a
    setting that says what its tiny values do) a normal number or 0 in float32."""
    def check(flag, x):
        if not (_is_number(x) and math.isfinite(x) and ok(x)):
            raise ValueError(f"{flag}={x!r}: must be {allowed}")
        if float32:
            check_float32(flag, x)
    return check


def integer(ok, allowed):
    def check(flag, x):
        if not (_is_int(x) and ok(x)):
            raise ValueError(f"{flag}={x!r}: must be {allowed}")
    return check


def check_bias_pairs(flag, pairs):
    for item in pairs:
        ok = (isinstance(item, tuple) and len(item) == 2 and _is_int(item[0]) and item[0] >= 0
              and _is_number(item[1]) and math.isfinite(item[1]))
        if not ok:
            raise ValueError(f"{flag}={item!r}: must be (token id >= 0, finite bias) pairs")
        check_float32(flag, item[1])


def check_token_list(flag, tokens):
    for token in tokens:
        if not (_is_int(token) and token >= 0):
            raise ValueError(f"{flag}={token!r}: token ids must be >= 0")


def parse_logit_bias(text):
    """"50256:-100,198:2.5" -> ((50256, -100.0), (198, 2.5)); None -> ()."""
    if text is None:
        return ()
    allowed = "must be ID:BIAS pairs separated by commas, e.g. 50256:-100,198:2.5"
    pairs, seen = [], set()
    for part in text.split(","):
        token, colon, bias = part.strip().partition(":")
        try:
            token_id, value = int(token), float(bias)
        except ValueError:
            raise ValueError(f"logit_bias={text}: {allowed}") from None
        if not (colon and token_id >= 0):
            raise ValueError(f"logit_bias={text}: {allowed} (ids >= 0)")
        if not math.isfinite(value):
            raise ValueError(f"logit_bias={text}: each bias must be a finite number (use --ban "
                             f"to ban a token)")
        problem = float32_problem(value)
        if problem:
            raise ValueError(f"logit_bias={text}: the bias {bias.strip()} {problem} in float32, "
                             f"the precision the sampler computes in; nonzero biases must be "
                             f"1.2e-38 to 3.4e38 in size (use --ban to ban a token)")
        if token_id in seen:
            raise ValueError(f"logit_bias={text}: token id {token_id} is given twice")
        seen.add(token_id)
        pairs.append((token_id, value))
    return tuple(pairs)


# ----------------------------------------------------------------------------------------------
# The declaration

@dataclass(frozen=True)
class SamplerSetting:
    name: str        # the SamplingParams field, and the key in sweeps and the explain trace
    kind: object     # the type of the sample.py flag (what settings.py parses)
    default: object  # sample.py's default (nanoGPT's, where nanoGPT has the flag)
    off: object      # the value that changes nothing: SamplingParams' default
    check: object    # check(flag, value) raises ValueError("flag=value: ...") for a bad value
    help: str        # what --help says
    flag: str = ""   # sample.py's flag, when it is not `name`
    to_param: object = None  # the flag's value -> the field's value, when they differ
    tiny_is_off: bool = False  # values below float32's normal range (1.2e-38) act as `off`

    @property
    def flag_name(self):
        return self.flag or self.name

    @property
    def is_number(self):
        """Numbers go into sweeps, the trace's settings and BatchParams' columns."""
        return isinstance(self.off, (int, float))

    def param(self, flag_value):
        return flag_value if self.to_param is None else self.to_param(flag_value)


# In the order sample.py's --help lists them; SAMPLING.md §1 gives the order they apply in.
SETTINGS = (
    SamplerSetting("temperature", float, 0.8, 1.0,
                   number(lambda t: t >= 0, "a finite number >= 0 (0 = greedy)"),
                   "divide the logits by this; 0 = greedy (argmax), 1 = unchanged"),
    SamplerSetting("top_k", int | None, 200, 0,
                   integer(lambda k: k >= 0, "an integer >= 0 (0 = off)"),
                   "keep only the k most likely tokens (ties kept); 0 or None = off",
                   to_param=lambda k: 0 if k is None else k),
    SamplerSetting("top_p", float, 1.0, 1.0,
                   number(lambda p: 0 < p <= 1, "a number > 0 and <= 1 (1 = off)"),
                   "nucleus sampling: keep the smallest set of most likely tokens whose "
                   "probability reaches p (0 < p <= 1); 1 = off"),
    SamplerSetting("min_p", float, 0.0, 0.0,
                   number(lambda m: 0 <= m <= 1, "a number >= 0 and <= 1 (0 = off)", float32=False),
                   "keep tokens with probability >= min_p * the top probability (0 <= m <= 1); "
                   "0 = off", tiny_is_off=True),
    SamplerSetting("repetition_penalty", float, 1.0, 1.0,
                   number(lambda r: r > 0, "a finite number > 0 (1 = off)"),
                   "Hugging Face's: logits of tokens already in the prompt or output are divided "
                   "by it (multiplied when negative); > 0, 1 = off"),
    SamplerSetting("frequency_penalty", float, 0.0, 0.0,
                   number(lambda a: -2 <= a <= 2, "a number from -2 to 2 (0 = off)"),
                   "OpenAI's: subtract this times each token's count in the output so far; "
                   "-2 to 2, 0 = off"),
    SamplerSetting("presence_penalty", float, 0.0, 0.0,
                   number(lambda b: -2 <= b <= 2, "a number from -2 to 2 (0 = off)"),
                   "OpenAI's: subtract this from every token already in the output; -2 to 2, "
                   "0 = off"),
    SamplerSetting("logit_bias", str | None, None, (), check_bias_pairs,
                   "add a bias to some token ids' logits, e.g. 50256:-100,198:2.5; None = none",
                   to_param=parse_logit_bias),
    SamplerSetting("banned_ids", tuple[int, ...], (), (), check_token_list,
                   "token ids that are never generated, e.g. --ban=50256,198",
                   flag="ban", to_param=lambda ids: tuple(sorted(set(ids)))),
)
NUMBERS = tuple(s for s in SETTINGS if s.is_number)  # the seven numbers of SAMPLING.md §3


def sampler_fields(settings, *, as_flags, after=None):
    """A class decorator, put under @dataclass: one field per setting, inserted after the
    field `after` (at the end when None). As flags (`settings.SampleSettings`): named by
    the flag, typed by `kind`, sample.py's default and the help text; else (`SamplingParams`):
    named by the field, defaulting to the value that is off."""
    def add(cls):
        annotations = dict(cls.__dict__.get("__annotations__", {}))
        new = {}
        for s in settings:
            name = s.flag_name if as_flags else s.name
            new[name] = s.kind if as_flags else type(s.off)
            default = s.default if as_flags else s.off
            setattr(cls, name, field(default=default, metadata={"help": s.help}))
        keys = list(annotations)
        at = keys.index(after) + 1 if after is not None else len(keys)
        cls.__annotations__ = {**{k: annotations[k] for k in keys[:at]}, **new,
                               **{k: annotations[k] for k in keys[at:]}}
        return cls
    return add


@dataclass(frozen=True)
@sampler_fields(SETTINGS, as_flags=False)
class SamplingParams:
    """The sampler's settings for one sample, validated once (SAMPLING.md §3); one field per
    entry of SETTINGS, each defaulting to off."""

    def __post_init__(self):
        for s in SETTINGS:
            s.check(s.flag_name, getattr(self, s.name))

    @property
    def greedy(self):
        return self.temperature == 0

    @property
    def uses_penalties(self):
        return (self.repetition_penalty != 1 or self.frequency_penalty != 0
                or self.presence_penalty != 0)


def check_token_ids(params, vocab_size):
    """The ids that logit_bias and banned_ids name must exist in the vocabulary."""
    for token, _ in params.logit_bias:
        if token >= vocab_size:
            raise ValueError(f"logit_bias={token}: token ids must be < {vocab_size}")
    for token in params.banned_ids:
        if token >= vocab_size:
            raise ValueError(f"ban={token}: token ids must be < {vocab_size}")
