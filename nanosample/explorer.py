"""The explorer: a sampling run as one self-contained HTML page.

This file owns turning explain records (the dicts `explain.explain_rows` builds, the lines
`--explain_file` writes; schema in docs/explain_schema.md) into a page a person can point at:
every sample's text with the prompt set apart, each generated token shaded by the probability
it was drawn with (or by entropy); click or hover a token and the page shows the article's
table for that step, the candidates before and after temperature and the filters, the draw's
cumulative bar with u marked, and a sentence saying why this token came out.

The page is built from the records and nothing else (one source of truth): the records go into
the page as JSON, and the page's script (assets/explorer/page.js) draws everything from them.
It is one file with its style and script inline, no network and no CDN, so it opens from
file:// offline; a Content-Security-Policy lets only that one script run. Token text is data:
the JSON is escaped so that no token can close its <script> element, and the script inserts
text with textContent, never as HTML.

What the page keeps, so that a long run stays small: each step's first `K` candidates in the
draw's order, and the chosen token when it is not among them, with
K = min(20, max(3, 10_000 // steps)): all 10 of explain_top's default up to 1,000 steps, fewer
for longer runs (the page says how many). The model's logits (`logit`, `logit_final`) and the
`chosen` flag (the candidate whose rank is `chosen_rank`) are left out; everything else is the
records' own values, floats at full precision. A 1,000-step trace with 10 candidates a step
is about 1.5 MB.

    python sample.py --start="ROMEO:" --num_samples=2 --html=run.html
    python -m nanosample.explain trace.jsonl --html=run.html     # any --explain_file trace
"""

import base64
import hashlib
import json
import os
import sys
from pathlib import Path

from nanosample.cli import report_error

PAGE_VERSION = 1
ASSETS = Path(__file__).resolve().parent / "assets" / "explorer"

# The records' keys the page keeps, in the order each embedded row lists them. `settings` is
# an index into the page's list of distinct settings (most runs have one).
RECORD_FIELDS = ("sample", "step", "position", "settings", "greedy", "bias_or_penalties", "u",
                 "chosen_id", "chosen_text", "chosen_rank", "n_kept", "vocab_size",
                 "entropy_bits", "entropy_tempered_bits", "candidates")
CANDIDATE_FIELDS = ("rank", "id", "text", "p_raw", "p_adjusted", "p_tempered", "top_k", "top_p",
                    "min_p", "penalized", "kept", "q", "cum_before", "cum_after")

MAX_CANDIDATES, MIN_CANDIDATES, CANDIDATE_BUDGET = 20, 3, 10_000


def candidates_per_step(steps):
    """K, how many candidates each step keeps in a page of `steps` records (see the docstring)."""
    return min(MAX_CANDIDATES, max(MIN_CANDIDATES, CANDIDATE_BUDGET // max(steps, 1)))


# ---------------------------------------------------------------------------------------------
# Records -> the page's data

def page_data(records, run=None, max_candidates=None):
    """The JSON object the page embeds: run facts, the distinct settings, and one row per record.

    records: explain records, any order; each (sample, step) at most once, else ValueError.
    run: what the trace does not hold, all optional: {"prompt": str, "seed": int, "model": str}.
    max_candidates: K (default `candidates_per_step(len(records))`).
    """
    if not records:
        raise ValueError("no records: a page needs at least one generated token")
    records = sorted(records, key=lambda r: (r["sample"], r["step"]))
    for a, b in zip(records, records[1:]):
        if (a["sample"], a["step"]) == (b["sample"], b["step"]):
            raise ValueError(f"sample {a['sample']} step {a['step']} appears twice (several "
                             f"runs in one trace?)")
    k = candidates_per_step(len(records)) if max_candidates is None else max_candidates
    settings, rows = [], []
    for r in records:
        if r["settings"] not in settings:
            settings.append(r["settings"])
        kept = [c for i, c in enumerate(r["candidates"]) if i < k or c["chosen"]]
        row = dict(r, settings=settings.index(r["settings"]),
                   candidates=[[c[f] for f in CANDIDATE_FIELDS] for c in kept])
        rows.append([row[f] for f in RECORD_FIELDS])
    run = run or {}
    return {
        "page_version": PAGE_VERSION,
        "run": {"prompt": run.get("prompt"), "seed": run.get("seed"), "model": run.get("model")},
        "candidates_per_step": k,
        "most_candidates_in_trace": max((len(r["candidates"]) for r in records), default=0),
        "settings": settings,
        "record_fields": list(RECORD_FIELDS),
        "candidate_fields": list(CANDIDATE_FIELDS),
        "records": rows,
    }


# Characters that must not appear raw inside <script>: "<" could close it ("</script>") or open
# a comment, ">" and "&" for good measure; U+2028/2029 end a line in older JavaScript.
_SCRIPT_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026",
                   0x2028: "\\u2028", 0x2029: "\\u2029"}


def embed_json(data):
    """JSON text that is safe between <script type="application/json"> and </script>."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.translate(_SCRIPT_ESCAPES)  # only inside strings: JSON syntax has none of them


def _asset(name):
    return (ASSETS / name).read_text(encoding="utf-8")


def build_html(records, run=None, max_candidates=None):
    """The page, as a string: the template with its style, the records' JSON and the script."""
    script = _asset("page.js")
    # The hash lets exactly this script run (CSP): nothing injected could, even if escaping failed.
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    page = _asset("page.html")
    for placeholder, value in (("/*STYLE*/", _asset("page.css")),
                               ("SCRIPT_HASH", f"sha256-{digest}"),
                               ("/*SCRIPT*/", script),
                               ("/*DATA*/", embed_json(page_data(records, run, max_candidates)))):
        assert page.count(placeholder) == 1, placeholder
        page = page.replace(placeholder, value)
    return page


def write_html(records, path, run=None, overwrite=False):
    """Write the page to `path`; an existing file is an error (FileExistsError) unless `overwrite`."""
    page = build_html(records, run)
    with open(path, "w" if overwrite else "x", encoding="utf-8", newline="\n") as f:
        f.write(page)
    return len(page.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Reading a trace back: python -m nanosample.explain trace.jsonl --html=run.html

class TraceError(ValueError):
    """A trace file that is not what --explain_file writes; the message names the line."""


_REQUIRED = set(RECORD_FIELDS) | {"version"}
_REQUIRED_CANDIDATE = set(CANDIDATE_FIELDS) | {"chosen"}


def read_trace(path):
    """The records of a JSON Lines trace. Raises OSError, or TraceError naming the line."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TraceError(f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TraceError(f"line {number}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or record.get("version") != 1:
            raise TraceError(f"line {number}: not an explain record of schema version 1 (see "
                             f"docs/explain_schema.md)")
        missing = sorted(_REQUIRED - set(record))
        if not missing and record["candidates"] and isinstance(record["candidates"], list):
            missing = sorted(_REQUIRED_CANDIDATE - set().union(
                *(c for c in record["candidates"] if isinstance(c, dict))))
        if missing or not record["candidates"]:
            raise TraceError(f"line {number}: an explain record needs "
                             f"{', '.join(missing) or 'candidates'}")
        records.append(record)
    if not records:
        raise TraceError("no records (an empty trace)")
    return records


USAGE = ("usage: python -m nanosample.explain TRACE.jsonl --html=PAGE.html "
         "[--start=PROMPT] [--seed=N] [--overwrite]")
HELP = f"""{USAGE}

Write the explorer page (one self-contained HTML file) of a trace that sample.py
--explain_file wrote. The trace holds every step but not the run's prompt text or seed: give
them with --start and --seed to show them in the page's header (taken as given, not checked).
An existing PAGE.html is replaced only with --overwrite."""


class _UsageError(ValueError):
    """A mistake on the command line: main prints it as the one `error:` line."""


def main(argv=None):
    """The command line; returns the exit code (2 with one `error:` line for bad input)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(HELP)
        return 0
    try:
        trace, options = _parse_command_line(argv)
    except _UsageError as e:
        return report_error(str(e))
    return _trace_to_page(trace, options)


def _parse_command_line(argv):
    """(the trace's path, {"html", "start", "seed", "overwrite"}), every flag checked, the seed
    an int, and the page's path known to be writable, before the trace is read."""
    traces, options = [], {"html": None, "start": None, "seed": None, "overwrite": False}
    for arg in argv:
        if not arg.startswith("--"):
            traces.append(arg)
            continue
        name, has_value, value = arg[2:].partition("=")
        if name not in options:
            raise _UsageError(f"--{name}: unknown flag; the flags are --html, --start, --seed and "
                              f"--overwrite ({USAGE})")
        if name == "overwrite":
            if has_value:
                raise _UsageError("--overwrite: takes no value")
            options["overwrite"] = True
        elif not has_value or (name != "start" and not value):  # an empty prompt is a prompt
            raise _UsageError(f"--{name}: needs a value, e.g. --{name}=" + (
                "run.html" if name == "html" else "1337" if name == "seed" else "ROMEO:"))
        else:
            options[name] = value
    if len(traces) != 1:
        raise _UsageError(f"give one trace file ({USAGE})")
    if options["html"] is None:
        raise _UsageError(f"--html: needed, the page to write ({USAGE})")
    if options["seed"] is not None:
        if not options["seed"].isdigit():
            raise _UsageError(f"--seed={options['seed']}: must be an integer >= 0")
        options["seed"] = int(options["seed"])
    problem = output_problem(options["html"], options["overwrite"], traces[0])
    if problem:
        raise _UsageError(f"--html={options['html']}: {problem}")
    return traces[0], options


def _trace_to_page(trace, options):
    """Read the trace and write its page; the exit code, each failure one `error:` line naming
    the file it is about."""
    page = options["html"]
    try:
        records = read_trace(trace)
        run = {"prompt": options["start"], "seed": options["seed"]}
        size = write_html(records, page, run, overwrite=options["overwrite"])
    except FileNotFoundError:
        return report_error(f"{trace}: no such file")
    except IsADirectoryError:
        return report_error(f"{trace}: is a directory, not a trace file")
    except ValueError as e:  # a TraceError, or two records for one step
        return report_error(f"{trace}: {e}")
    except FileExistsError:
        return report_error(f"--html={page}: the file appeared meanwhile; not replaced")
    except OSError as e:
        return report_error(f"{e.filename or trace}: cannot read or write it ({e.strerror})")
    print(f"wrote {page}: {len(records)} steps, {size / 1e6:.2f} MB", file=sys.stderr)
    return 0


def output_problem(path, overwrite, source=None):
    """Why the page cannot go to `path` (a phrase), or None: the checks sample.py makes too."""
    directory = os.path.dirname(path) or "."
    if os.path.isdir(path):
        return "is a directory; give a file path"
    if not os.path.isdir(directory):
        return f"the directory {directory} does not exist"
    if source is not None and os.path.abspath(path) == os.path.abspath(source):
        return "the same file as the trace"
    if os.path.exists(path) and not overwrite:
        return "the file exists; choose another path, or add --overwrite to replace it"
    return None
