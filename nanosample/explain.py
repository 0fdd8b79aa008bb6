"""Explain mode: every sampling decision shown the way the article shows it.

This file owns the explain trace (SAMPLING.md §5): from the `TraceStep` that generate() hands
to its `trace` callable after each step, it builds one record per active sample, and turns the
records into
- a readable table for people (the article's table: rank, token, raw p, p after temperature,
  each filter's verdict, final p, cumulative; then u and the selected token), one per step of
  one chosen sample;
- JSON Lines for programs, every step of every sample, with the schema in `JSONL_SCHEMA`
  (quoted by the README and docs/explain_schema.md), written and flushed as it goes;
- a picture (`plot_explained`, matplotlib, an optional extra): one step's distribution before
  and after temperature and the filters, its cumulative curve with u marked, and the entropy and
  chosen-token probability over the whole sample.

Everything here is computed from what the sampler decided (`sampling.Step`): the chosen token,
u, the kept set, the order of the draw and q are the sampler's own values, never recomputed
another way, so the trace is true to the output. Explain mode costs nothing when it is off:
generate() calls `trace` only when one is given, and this module is imported only then.
"""

import contextlib
import json
import math
import os
import sys
import unicodedata

import torch

from nanosample import sampling
from nanosample.sampler_settings import NUMBERS

SCHEMA_VERSION = 1

JSONL_SCHEMA = """\
One JSON object per line: one per generated token (step) of each sample, in the order they were
generated (the samples of one batch interleave, step by step; sort by (sample, step) if needed).
Probabilities are floats in [0, 1]; entropies are in bits. With --draw=multinomial (nanoGPT's
draw) each record also has "draw": "multinomial" after u, and u is null: the token came from
torch.multinomial on the run's one shared stream, not from an interval holding a u; q and the
running sums (cum_before, cum_after) still give the distribution it was drawn from.

version                int         1; raised when a key changes meaning or disappears
sample                 int         the sample's index (its random stream derives from (seed, sample))
step                   int         0 for the sample's first generated token
position               int         the position the token takes in the sequence, prompt included
settings               object      this sample's settings, as given: temperature, top_k, top_p,
                                   min_p, repetition_penalty, frequency_penalty, presence_penalty
greedy                 bool        temperature 0: the most likely token, no draw; temperature and
                                   the filters are skipped
bias_or_penalties      bool        logit bias, bans or penalties are on (then p_adjusted is given)
u                      float|null  the uniform number drawn, in [0, 1); null when greedy
chosen_id              int         the token drawn, which is the token in the output
chosen_text            str         its text
chosen_rank            int         its rank in the draw's order (1 = first)
n_kept                 int         how many tokens survived every filter
vocab_size             int         how many tokens the tokenizer has
entropy_bits           float       entropy of the final distribution q
entropy_tempered_bits  float|null  entropy after temperature, before the filters (whole
                                   vocabulary); null when greedy
candidates             list        the top explain_top tokens by final probability, continued
                                   with the best dropped tokens by tempered probability when
                                   fewer survive (at most as many as the sampler ranked, 256 or
                                   more), in the draw's order; then the chosen token if it is not
                                   among them. Each candidate:
  rank                 int         place in the draw's order: descending tempered logit, ties by
                                   ascending id (1 = first)
  id                   int         token id
  text                 str         the token's text (partial UTF-8 bytes as \\xNN escapes)
  logit                float       the model's logit (float32)
  logit_final          float       after bias, penalties and temperature: what the filters and
                                   the draw saw
  p_raw                float       softmax of the model's logits, whole vocabulary
  p_adjusted           float|null  softmax after logit bias, bans and penalties; null when none
                                   are on
  p_tempered           float|null  softmax of the adjusted logits / temperature, whole vocabulary;
                                   null when greedy
  top_k                bool|null   kept by top-k; null when top-k is off or greedy
  top_p                bool|null   kept by top-p, which sees what top-k left (false for a token
                                   top-k dropped); null when off or greedy
  min_p                bool|null   kept by min-p and by the filters before it (false for a token
                                   top-k or top-p dropped); null when off or greedy
  penalized            bool|null   the penalties changed its logit; null when no penalty is on
  kept                 bool        survived every filter, so it could be drawn
  q                    float       final probability: softmax over the kept tokens; 0 if dropped
  cum_before           float|null  the draw's cumulative probability before this token; null if
                                   dropped
  cum_after            float|null  the cumulative probability after it: u in [cum_before,
                                   cum_after) selects this token; the last kept token's interval
                                   ends at 1 exactly (it takes any u the rounded sum misses)
  chosen               bool        this is the token drawn
"""

_LN2 = math.log(2)


# ---------------------------------------------------------------------------------------------
# From a TraceStep to records

def _entropy_bits(logp):
    """Entropy of each row of log-probabilities, in bits. (R, V) -> (R,)"""
    p = logp.exp()
    terms = torch.where(p > 0, p * logp, torch.zeros_like(p))  # 0 * log 0 = 0, not NaN
    return -terms.sum(dim=-1) / _LN2


def explain_rows(trace, tokenizer, rows, top=10):
    """One record (a dict, see JSONL_SCHEMA) for each batch row in `rows` of a TraceStep.

    The full-vocabulary softmaxes are computed for these rows only; the order of the draw, the
    kept set, q and the cumulative sums are the sampler's own (`Candidates`).
    """
    draw = _DrawSums(trace.result.candidates)
    vocabulary = _VocabularyView(trace, tokenizer, rows)
    return [_step_record(trace, tokenizer, i, r, top, draw, vocabulary)
            for i, r in enumerate(rows)]


class _DrawSums:
    """q and its running sum exactly as the draw computed them (inverse_cdf), for every batch
    row: the window is a few hundred wide, so this is cheap and bit for bit the draw's numbers."""

    def __init__(self, candidates):
        self.q = sampling.final_probabilities(candidates)                 # (B, M) float64
        self.cdf = self.q.cumsum(dim=-1)                                  # (B, M)
        self.cdf_before = torch.nn.functional.pad(self.cdf[:, :-1], (1, 0))  # (B, M) 0 first


class _VocabularyView:
    """The whole-vocabulary numbers of the explained rows (R of them, in the order of `rows`):
    the softmaxes raw, adjusted and tempered, and which logits the penalties changed."""

    def __init__(self, trace, tokenizer, rows):
        result, params = trace.result, trace.params
        index = torch.tensor(rows, dtype=torch.long, device=trace.raw_logits.device)
        self.raw = raw = sampling.clean_logits(trace.raw_logits[index],
                                               tokenizer.n_vocab)         # (R, V) float32
        self.raw_logp = torch.log_softmax(raw.double(), dim=-1)           # (R, V)
        adjusted = result.adjusted[index]                                 # (R, V)
        temperature = params.temperature[index]                           # (R, 1)
        # the sampler's own division (greedy rows divide by 1), so the values match its logits
        tempered = sampling.apply_temperature(
            adjusted, temperature.masked_fill(temperature == 0, 1.0))     # (R, V)
        self.tempered_logp = torch.log_softmax(tempered.double(), dim=-1)  # (R, V)
        self.entropy_tempered = _entropy_bits(self.tempered_logp).tolist()  # (R,)

        row_settings = [params.rows[r] for r in rows]
        self.adjusting = [bool(s.logit_bias or s.banned_ids or s.uses_penalties)
                          for s in row_settings]                          # (R,)
        self.adjusted_logp = None                                         # (R, V) when any
        if any(self.adjusting):
            self.adjusted_logp = torch.log_softmax(adjusted.double(), dim=-1)
        self.penalized = None                                             # (R, V) bool when any
        if any(s.uses_penalties for s in row_settings):
            # What bias alone would give; any difference at a token is the penalties' doing.
            biased = raw if params.bias is None else sampling.apply_logit_bias(
                raw, params.bias[index])                                  # (R, V)
            self.penalized = adjusted != biased


def _step_record(trace, tokenizer, i, r, top, draw, vocabulary):
    """The record of batch row `r` (row `i` of `vocabulary`): the step, then its candidates."""
    result, candidates = trace.result, trace.result.candidates
    s = trace.params.rows[r]
    n_kept = int(candidates.n_kept[r])
    rank = int(result.ranks[r])
    token = int(result.tokens[r])
    positions = _listed_positions(candidates.logits[r], rank, top)
    assert int(candidates.ids[r, rank]) == token, "the sampler's rank names its token"
    greedy = s.temperature == 0
    u = float(result.u[r])
    kept_q = draw.q[r, :n_kept]                                           # (n_kept,)
    return {
        "version": SCHEMA_VERSION,
        "sample": int(trace.samples[r]),
        "step": int(trace.step),
        "position": int(trace.position),
        "settings": {n.name: type(n.off)(getattr(s, n.name)) for n in NUMBERS},
        "greedy": greedy,
        "bias_or_penalties": vocabulary.adjusting[i],
        "u": None if greedy or math.isnan(u) else u,
        **({"draw": "multinomial"} if trace.draw == "multinomial" else {}),
        "chosen_id": token,
        "chosen_text": tokenizer.token_text(token),
        "chosen_rank": rank + 1,
        "n_kept": n_kept,
        "vocab_size": tokenizer.n_vocab,
        "entropy_bits": max(0.0, float(_entropy_bits(kept_q.log()[None])[0])),
        "entropy_tempered_bits": None if greedy else vocabulary.entropy_tempered[i],
        "candidates": _candidate_records(trace, tokenizer, i, r, positions, draw, vocabulary),
    }


def _listed_positions(window_logits, rank, top):
    """The places in the draw's order a record lists: the first `top` ranked, then the chosen
    token's `rank` if it is not among them. window_logits: (M,) the row's sorted window."""
    # finite entries are a prefix: after them come banned/padding ids and row padding
    n_ranked = int(torch.isfinite(window_logits).sum())
    positions = list(range(min(top, n_ranked)))
    if rank not in positions:
        positions.append(rank)
    return positions


def _candidate_columns(trace, i, r, at, ids, draw, vocabulary):
    """Each candidate key of JSONL_SCHEMA as a list over the listed candidates (N of them):
    `at` (N,) their places in row r's window, `ids` (N,) their token ids."""
    candidates, params = trace.result.candidates, trace.params
    s = params.rows[r]
    greedy = s.temperature == 0
    none = [None] * len(at)
    columns = {}
    for name, active, column in (
            ("top_k", 0 < s.top_k < params.vocab_size, candidates.kept_top_k),
            ("top_p", s.top_p < 1, candidates.kept_top_p),
            ("min_p", s.min_p > 0, candidates.kept_min_p)):
        columns[name] = column[r, at].tolist() if active and not greedy else none
    return columns | {
        "logit": vocabulary.raw[i, ids].tolist(),
        "logit_final": candidates.logits[r, at].tolist(),
        "p_raw": vocabulary.raw_logp[i, ids].exp().tolist(),
        "p_adjusted": (vocabulary.adjusted_logp[i, ids].exp().tolist()
                       if vocabulary.adjusting[i] else none),
        "p_tempered": vocabulary.tempered_logp[i, ids].exp().tolist() if not greedy else none,
        "penalized": vocabulary.penalized[i, ids].tolist() if s.uses_penalties else none,
        "kept": candidates.kept[r, at].tolist(),
        "q": draw.q[r, at].tolist(),
        "cum_after": draw.cdf[r, at].tolist(),
        "cum_before": draw.cdf_before[r, at].tolist(),
    }


def _candidate_records(trace, tokenizer, i, r, positions, draw, vocabulary):
    """The "candidates" list of row r's record: one dict per place in `positions`."""
    candidates = trace.result.candidates
    at = torch.tensor(positions, dtype=torch.long, device=trace.raw_logits.device)  # (N,)
    ids = candidates.ids[r, at]                                                      # (N,)
    columns = _candidate_columns(trace, i, r, at, ids, draw, vocabulary)
    n_kept, rank = int(candidates.n_kept[r]), int(trace.result.ranks[r])
    listed = []
    for n, (j, token_id) in enumerate(zip(positions, ids.tolist())):
        kept = columns["kept"][n]
        cum_after = columns["cum_after"][n]
        if j == n_kept - 1:
            cum_after = 1.0  # inverse_cdf gives the last kept token any u above the sum
        listed.append({
            "rank": j + 1,
            "id": token_id,
            "text": tokenizer.token_text(token_id),
            "logit": columns["logit"][n],
            "logit_final": columns["logit_final"][n],
            "p_raw": columns["p_raw"][n],
            "p_adjusted": columns["p_adjusted"][n],
            "p_tempered": columns["p_tempered"][n],
            "top_k": columns["top_k"][n],
            "top_p": columns["top_p"][n],
            "min_p": columns["min_p"][n],
            "penalized": columns["penalized"][n],
            "kept": kept,
            "q": columns["q"][n] if kept else 0.0,
            "cum_before": columns["cum_before"][n] if kept else None,
            "cum_after": cum_after if kept else None,
            "chosen": j == rank,
        })
    return listed


# ---------------------------------------------------------------------------------------------
# The table

_VISIBLE = {" ": "␣", "\n": "↵", "\t": "\\t", "\r": "\\r"}


def visible_text(text):
    """A token's text for a table: whitespace and control characters made visible."""
    out = []
    for c in text:
        if c in _VISIBLE:
            out.append(_VISIBLE[c])
        elif unicodedata.category(c)[0] == "C":
            out.append(f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join(out) if out else '""'


def _width(text):
    """Columns a string takes in a terminal (wide East Asian characters take two)."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _fit(text, width):
    """Cut a string to `width` columns (with …) and pad it on the right."""
    if _width(text) > width:
        while _width(text) > width - 1:
            text = text[:-1]
        text += "…"
    return text + " " * (width - _width(text))


def _p(value):
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return "<0.0001" if value < 0.00005 else f"{value:.4f}"


def _verdict(value):
    return "-" if value is None else "✓" if value else "✗"


def _settings_line(record):
    s = record["settings"]
    if record["greedy"]:
        parts = ["greedy (temperature 0)"]
    else:
        parts = [f"temperature {s['temperature']:g}"]
        top_k_off = record["candidates"][0]["top_k"] is None  # 0, or k >= the vocabulary
        parts += [f"top_k {s['top_k']}" if not top_k_off else
                  f"top_k {s['top_k']} (off: >= the vocabulary)" if s["top_k"] else "top_k off",
                  f"top_p {s['top_p']:g}" if s["top_p"] < 1 else "top_p off",
                  f"min_p {s['min_p']:g}" if s["min_p"] > 0 else "min_p off"]
    if s["repetition_penalty"] != 1:
        parts.append(f"repetition_penalty {s['repetition_penalty']:g}")
    if s["frequency_penalty"]:
        parts.append(f"frequency_penalty {s['frequency_penalty']:g}")
    if s["presence_penalty"]:
        parts.append(f"presence_penalty {s['presence_penalty']:g}")
    return " · ".join(parts)


def format_table(record):
    """The article's table for one record, as text (no trailing newline)."""
    cands = record["candidates"]
    adjusted = record["bias_or_penalties"]                       # an "adj p" column
    penalties = any(c["penalized"] is not None for c in cands)   # a "pen" column
    token_width = min(16, max(5, *(_width(visible_text(c["text"])) for c in cands)))
    lines = [f"sample {record['sample']} · step {record['step']} · position {record['position']} · "
             + _settings_line(record), _table_header(token_width, adjusted, penalties)]
    previous_rank = 0
    for c in cands:
        if c["rank"] != previous_rank + 1:
            lines.append("     ...")
        previous_rank = c["rank"]
        lines.append(_table_row(c, token_width, adjusted, penalties))
    chosen = next(c for c in cands if c["chosen"])  # exactly one per record
    lines += _table_outcome(record, chosen)
    return "\n".join(lines)


def _table_header(token_width, adjusted, penalties):
    header = ["    rank", "  " + _fit("token", token_width), "   raw p"]
    if adjusted:
        header.append("   adj p")
    header += ["  temp p", " top-k", " top-p", " min-p"]
    if penalties:
        header.append("  pen")
    header += ["  final p", "  cumulative"]
    return "".join(header)


def _table_row(c, token_width, adjusted, penalties):
    """One candidate's line, its columns as `_table_header` names them."""
    row = [("→ " if c["chosen"] else "  ") + f"{c['rank']:6d}",
           "  " + _fit(visible_text(c["text"]), token_width), f"{_p(c['p_raw']):>8}"]
    if adjusted:
        row.append(f"{_p(c['p_adjusted']):>8}")
    row += [f"{_p(c['p_tempered']):>8}", f"{_verdict(c['top_k']):>6}",
            f"{_verdict(c['top_p']):>6}", f"{_verdict(c['min_p']):>6}"]
    if penalties:
        row.append(f"{'-' if c['penalized'] is None else 'yes' if c['penalized'] else 'no':>5}")
    cumulative = "-" if c["cum_after"] is None else f"{c['cum_after']:.4f}"
    row += [f"{_p(c['q']):>9}", f"{cumulative:>12}"]
    return "".join(row)


def _table_outcome(record, chosen):
    """The two lines under the table: how the token was selected, and what survived."""
    shown = f'"{visible_text(chosen["text"])}" (rank {chosen["rank"]}, id {chosen["id"]})'
    if record["greedy"]:
        selected = f"greedy: no draw; selected {shown}, the most likely token"
    elif record.get("draw") == "multinomial":
        selected = (f"torch.multinomial (nanoGPT's draw, one stream for the run; no u): "
                    f"selected {shown}")
    else:
        selected = (f"u = {record['u']:.4f}, in [{chosen['cum_before']:.4f}, "
                    f"{chosen['cum_after']:.4f}): selected {shown}")
    survived = (f"{record['n_kept']} of {record['vocab_size']} tokens kept · "
                f"entropy {record['entropy_bits']:.2f} bits")
    if record["entropy_tempered_bits"] is not None:
        survived += f" ({record['entropy_tempered_bits']:.2f} bits after temperature, before the filters)"
    return [selected, survived]


# ---------------------------------------------------------------------------------------------
# The trace callable generate() calls

class Explainer:
    """generate()'s `trace`: turns each TraceStep into tables, JSON Lines and plot records.

    table_sample: the sample whose steps are shown as tables on `table_stream` and kept in
    `records` for the plot. jsonl_path: every step of every sample, one line each, flushed as
    it goes; an existing file is an error unless `overwrite`. plot_path: drawn by close().
    html_path: the explorer page of every step of every sample (explorer.py), written by close();
    `run` holds what the records do not: {"prompt": text, "seed": int, "model": name}.
    outputs: {"explain_file" | "plot" | "html": cli.OutputFile}, as sample.py makes them: the
    file is then written beside its path and put in place by close(), whole (two runs never
    interleave), and a failed write is a cli.RunError naming the flag.
    """

    def __init__(self, tokenizer, table_sample=0, top=10, table_stream=None, jsonl_path=None,
                 record_for_plot=False, plot_path=None, plot_step=0, overwrite=False,
                 messages=None, html_path=None, run=None, outputs=None):
        assert top >= 1
        self.tokenizer = tokenizer
        self.table_sample = table_sample
        self.top = top
        self.table_stream = table_stream
        self.plot_path, self.plot_step, self.overwrite = plot_path, plot_step, overwrite
        self.record_for_plot = record_for_plot or plot_path is not None
        self.messages = messages if messages is not None else sys.stderr
        self.records = []  # table_sample's records, when recording for a plot
        self.html_path, self.run = html_path, run
        self.all_records = []  # every sample's records, for the explorer page
        self.outputs = outputs or {}
        self.jsonl = None
        self.jsonl_name = f"--explain_file={jsonl_path}"
        if "explain_file" in self.outputs:
            self.jsonl = self.outputs["explain_file"].open("w", encoding="utf-8")
        elif jsonl_path is not None:
            # "x": never replace a file the CLI did not agree to replace (and no race after its check)
            self.jsonl = open(jsonl_path, "w" if overwrite else "x", encoding="utf-8")
        self.closed = False

    def __call__(self, trace):
        rows = [r for r, (sample, active) in enumerate(zip(trace.samples, trace.active))
                if active and (self.jsonl is not None or self.html_path is not None
                               or sample == self.table_sample
                               and (self.table_stream is not None or self.record_for_plot))]
        if not rows:
            return
        for record in explain_rows(trace, self.tokenizer, rows, self.top):
            if self.jsonl is not None:
                self._write_jsonl(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
            if self.html_path is not None:
                self.all_records.append(record)
            if record["sample"] == self.table_sample:
                if self.table_stream is not None:
                    self.table_stream.write(format_table(record) + "\n\n")
                    self.table_stream.flush()
                if self.record_for_plot:
                    self.records.append(record)
        if self.jsonl is not None:
            self._write_jsonl(None)  # flushed: an interrupted run keeps every finished step

    def _write_jsonl(self, line):
        from nanosample.cli import RunError

        try:
            if line is None:
                self.jsonl.flush()
            else:
                self.jsonl.write(line)
        except OSError as e:  # a full disk: the run stops; the file is dropped, not left half
            jsonl, self.jsonl = self.jsonl, None
            with contextlib.suppress(OSError):
                jsonl.close()
            if "explain_file" in self.outputs:
                self.outputs["explain_file"].discard()
            raise RunError(f"{self.jsonl_name}: cannot write it ({e.strerror})") from None

    def close(self):
        """Finish the outputs: close the JSON Lines file, draw the plot, write the page. Safe to
        call twice."""
        if self.closed:
            return
        self.closed = True
        if self.jsonl is not None:
            self._write_jsonl(None)
            self.jsonl.close()
            if "explain_file" in self.outputs:
                self.outputs["explain_file"].commit()
        if self.plot_path is not None:
            self._plot()
        if self.html_path is not None:
            self._html()

    def _html(self):
        from nanosample import explorer

        flag = f"--html={self.html_path}"
        if not self.all_records:
            print(f"warning: {flag}: no tokens were generated; no page written", file=self.messages)
            return
        self._write_output("html", flag, self.html_path, lambda path, overwrite:
                           explorer.write_html(self.all_records, path, self.run, overwrite=overwrite))

    def _plot(self):
        flag = f"--plot={self.plot_path}"
        if not self.records:
            print(f"warning: {flag}: sample {self.table_sample} generated no tokens; nothing to "
                  f"plot", file=self.messages)
            return
        steps = [r["step"] for r in self.records]
        step = self.plot_step
        if step not in steps:
            step = steps[-1]
            print(f"warning: {flag}: sample {self.table_sample} has no step {self.plot_step} "
                  f"(it ended after {len(steps)} tokens); drawing its last step, {step}",
                  file=self.messages)
        self._write_output("plot", flag, self.plot_path, lambda path, overwrite:
                           plot_explained(self.records, path, step, overwrite=overwrite))

    def _write_output(self, key, flag, path, write):
        """Write one output with `write(path, overwrite)`: through its cli.OutputFile when
        sample.py made one (a temporary file, put in place whole), else straight to `path`. A
        file that appeared meanwhile is kept, with a warning; a full disk is a cli.RunError."""
        output = self.outputs.get(key)
        try:
            if output is None:
                write(path, self.overwrite)
            else:
                write(output.write_path, True)
                output.commit()
        except FileExistsError:
            print(f"warning: {flag}: the file appeared during the run; not replaced (add "
                  f"--overwrite to replace it)", file=self.messages)
        except OSError as e:  # a full disk
            from nanosample.cli import RunError
            if output is not None:
                output.discard()
            raise RunError(f"{flag}: cannot write it ({e.strerror})") from None


def require_matplotlib(flag="--plot"):
    """Raise settings.SettingsError (one line, naming the flag) when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        from nanosample.settings import SettingsError
        raise SettingsError(f"{flag}: needs matplotlib, which is not installed; "
                            f"pip install matplotlib (or pip install -e '.[plot]')") from None


def open_trace(settings, tokenizer, prompt_ids=None, outputs=None):
    """sample.py's hook: the trace callable for a run's SampleSettings (see sample.py).

    prompt_ids: the prompt as the model saw it, for the explorer page's header (--html).
    `outputs`: the cli.OutputFile of --explain_file, --plot and --html, already checked
    (sample.py makes them before the model loads); made here when not given.
    Raises settings.SettingsError for a user's mistake: matplotlib missing for --plot, or an
    --explain_file that cannot be written.
    """
    from nanosample.cli import OutputFile

    if settings.plot is not None:
        require_matplotlib(f"--plot={settings.plot}")
    html = getattr(settings, "html", None)
    run = None
    if html is not None:
        run = {"prompt": None if prompt_ids is None else tokenizer.decode(prompt_ids),
               "seed": settings.seed,
               "model": settings.out_dir if settings.init_from == "resume" else settings.init_from}
    if outputs is None:
        outputs = {flag: OutputFile(path, f"--{flag}={path}", overwrite=settings.overwrite)
                   for flag, path in (("explain_file", settings.explain_file),
                                      ("plot", settings.plot), ("html", html)) if path is not None}
    # Every path now has its OutputFile (which refused an existing file, or an unwritable
    # directory, as a SettingsError): the Explainer writes through them and never opens a path.
    return Explainer(tokenizer, table_sample=settings.explain_sample, top=settings.explain_top,
                     table_stream=sys.stderr if settings.explain else None,
                     jsonl_path=settings.explain_file, plot_path=settings.plot,
                     plot_step=settings.plot_step, overwrite=settings.overwrite,
                     html_path=html, run=run, outputs=outputs)


# ---------------------------------------------------------------------------------------------
# The picture

CHOSEN_COLOR = "#d62728"


def _token_ticks(axes, x, labels, cands):
    """Token labels under the bars: the chosen one in bold red, dropped ones in grey."""
    axes.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    for c, tick in zip(cands, axes.get_xticklabels()):
        if c["chosen"]:
            tick.set_color(CHOSEN_COLOR)
            tick.set_fontweight("bold")
        elif not c["kept"]:
            tick.set_color("#888888")


def plot_explained(records, path, step, overwrite=False):
    """Draw one sample's sampling picture to `path` (.png, .svg or .pdf).

    Top left: step `step`'s candidates, with their probability raw, after temperature and
    final (dropped tokens hatched, the chosen one in red). Top right: the draw's cumulative
    probability over the same candidates, u marked, the chosen token's interval shaded.
    Bottom: entropy and the chosen token's probability at every step of the sample.
    An existing file is an error (FileExistsError) unless `overwrite`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_step = {r["step"]: r for r in records}
    if step not in by_step:
        raise ValueError(f"step {step} is not among the records (steps {min(by_step)} to "
                         f"{max(by_step)})")
    record = by_step[step]
    fig = Figure(figsize=(13, 8.5), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, without pyplot's global state
    grid = fig.add_gridspec(2, 2, height_ratios=(1.2, 1))
    bars, cumulative = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    over_time = fig.add_subplot(grid[1, :])
    fig.suptitle(f"sample {record['sample']}, step {step} (position {record['position']}): "
                 + _settings_line(record))
    labels = _candidate_labels(record["candidates"])
    _plot_stages(bars, record, labels)
    _plot_draw(cumulative, record, labels)
    _plot_over_time(over_time, records, record, step)

    suffix = os.path.splitext(path)[1].lower().lstrip(".") or "png"
    with open(path, "wb" if overwrite else "xb") as f:
        fig.savefig(f, format=suffix, dpi=110)


def _candidate_labels(cands):
    """The x labels of the two top panels: each candidate's text (cut to 12) and its rank."""
    labels = [visible_text(c["text"]) for c in cands]
    return [f"{t if len(t) <= 12 else t[:11] + '…'} ({c['rank']})" for t, c in zip(labels, cands)]


def _plot_stages(bars, record, labels):
    """Top left: the distribution at each stage, three bars per candidate."""
    from matplotlib.patches import Patch

    cands = record["candidates"]
    x = list(range(len(cands)))
    width = 0.27
    stages = [("raw p", "p_raw", "#b8b8b8"), ("after temperature", "p_tempered", "#6b9bd1"),
              ("final q", "q", "#f28e2b")]
    for k, (name, key, color) in enumerate(stages):
        values = [c[key] if c[key] is not None else 0.0 for c in cands]
        drawn = bars.bar([i + (k - 1) * width for i in x], values, width, color=color)
        for c, bar in zip(cands, drawn):
            if not c["kept"]:
                bar.set_hatch("//")
                bar.set_alpha(0.5)
            if c["chosen"]:
                bar.set_edgecolor(CHOSEN_COLOR)
                bar.set_linewidth(1.5)
    legend = [Patch(color=color, label=name) for name, _, color in stages]
    legend.append(Patch(facecolor="white", edgecolor=CHOSEN_COLOR, label="the chosen token"))
    if not all(c["kept"] for c in cands):
        legend.append(Patch(facecolor="white", edgecolor="#888888", hatch="//",
                            label="dropped by a filter"))
    bars.legend(handles=legend, fontsize=8)
    _token_ticks(bars, x, labels, cands)
    bars.set_ylabel("probability")
    bars.set_title(f"top candidates: {record['n_kept']} of {record['vocab_size']} tokens kept",
                   fontsize=10)


def _plot_draw(cumulative, record, labels):
    """Top right: the draw; each kept token owns the interval [cum_before, cum_after) of [0, 1)."""
    from matplotlib.patches import Patch

    cands = record["candidates"]
    x = list(range(len(cands)))
    kept = [(i, c) for i, c in zip(x, cands) if c["kept"]]
    cumulative.bar([i for i, _ in kept], [c["cum_after"] - c["cum_before"] for _, c in kept],
                   0.6, bottom=[c["cum_before"] for _, c in kept],
                   color=[CHOSEN_COLOR if c["chosen"] else "#f28e2b" for _, c in kept])
    chosen = next(c for c in cands if c["chosen"])
    cumulative.axhspan(chosen["cum_before"], chosen["cum_after"], color=CHOSEN_COLOR,
                       alpha=0.08)
    legend = [Patch(color="#f28e2b", label="q: each kept token's interval"),
              Patch(color=CHOSEN_COLOR, label=f"the chosen token's "
                                              f"[{chosen['cum_before']:.3f}, "
                                              f"{chosen['cum_after']:.3f})")]
    if record["u"] is not None:
        legend.append(cumulative.axhline(record["u"], color="#333333", ls="--", lw=1,
                                         label=f"u = {record['u']:.4f}"))
    else:
        cumulative.text(0.02, 0.95, "greedy: no draw, the most likely token" if record["greedy"]
                        else "torch.multinomial (nanoGPT's draw): no u",
                        transform=cumulative.transAxes, va="top")
    shown = max(c["cum_after"] for _, c in kept)
    if shown < 1 - 1e-9:
        cumulative.text(0.98, 0.5, f"the other {record['n_kept'] - len(kept)} kept tokens\n"
                        f"share the rest, {shown:.3f} to 1", transform=cumulative.transAxes,
                        ha="right", va="center", fontsize=8, color="#555555")
    _token_ticks(cumulative, x, labels, cands)
    cumulative.set_ylim(0, 1.02)
    cumulative.set_ylabel("cumulative probability")
    cumulative.set_title("the draw: the token whose interval holds u", fontsize=10)
    cumulative.legend(handles=legend, fontsize=8, loc="upper left")


def _plot_over_time(over_time, records, record, step):
    """Bottom: the whole sample, step by step; entropy on the left axis, the chosen token's q
    on the right, the pictured `step` dashed."""
    from matplotlib.ticker import MaxNLocator

    steps = [r["step"] for r in records]
    chosen_q = [next(c["q"] for c in r["candidates"] if c["chosen"]) for r in records]
    over_time.plot(steps, [r["entropy_bits"] for r in records], color="#1f77b4",
                   label="entropy of q (bits)")
    if any(r["entropy_tempered_bits"] is not None for r in records):
        over_time.plot(steps, [r["entropy_tempered_bits"] for r in records], color="#1f77b4",
                       ls=":", label="entropy after temperature, before filters (bits)")
    over_time.set_xlabel("step")
    over_time.xaxis.set_major_locator(MaxNLocator(integer=True))
    over_time.set_ylabel("entropy (bits)")
    probability = over_time.twinx()
    probability.plot(steps, chosen_q, ".", color=CHOSEN_COLOR, markersize=4,
                     label="q of the chosen token")
    probability.set_ylim(0, 1.05)
    probability.set_ylabel("q of the chosen token")
    over_time.axvline(step, color="#888888", lw=1, ls="--")
    handles = over_time.get_legend_handles_labels()
    more = probability.get_legend_handles_labels()
    over_time.set_ylim(0, 1.3 * max(max(r["entropy_bits"], r["entropy_tempered_bits"] or 0)
                                    for r in records) + 0.1)
    over_time.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="upper left",
                     ncols=3)
    over_time.set_title(f"sample {record['sample']}, every step (dashed: step {step})",
                        fontsize=10)


# ---------------------------------------------------------------------------------------------
# python -m nanosample.explain trace.jsonl --html=run.html

def main(argv=None):
    """The explorer page of a trace that --explain_file wrote (explorer.py owns the command)."""
    from nanosample import explorer
    return explorer.main(argv)


if __name__ == "__main__":
    sys.exit(main())
