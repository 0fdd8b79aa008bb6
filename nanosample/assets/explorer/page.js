// The explorer page's script (nanosample/explorer.py builds the page around it).
// Everything is drawn from the JSON in #trace-data: explain records, one row per step, in the
// field order the data names. Text from the trace is only ever set with textContent.
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("trace-data").textContent);
  const SVG_NS = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function svgEl(tag, attrs, text) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // ---------------------------------------------------------------------------------------
  // The records, as objects

  function fromRow(fields, row) {
    const o = {};
    fields.forEach((f, i) => { o[f] = row[i]; });
    return o;
  }
  const records = DATA.records.map((row) => {
    const r = fromRow(DATA.record_fields, row);
    r.candidates = r.candidates.map((c) => fromRow(DATA.candidate_fields, c));
    r.settings = DATA.settings[r.settings];
    r.chosen = r.candidates.find((c) => c.rank === r.chosen_rank);
    return r;
  });
  const bySample = new Map();   // sample -> its records, by step (the data is sorted)
  for (const r of records) {
    if (!bySample.has(r.sample)) bySample.set(r.sample, []);
    bySample.get(r.sample).push(r);
  }
  const sampleIds = [...bySample.keys()];
  const maxEntropy = Math.max(1e-9, ...records.map((r) => r.entropy_bits));

  // ---------------------------------------------------------------------------------------
  // Words and numbers, as the text table (explain.format_table) writes them

  const VISIBLE = { " ": "␣", "\n": "↵", "\t": "\\t", "\r": "\\r" };
  function visible(text) {
    let out = "";
    for (const ch of text) {
      const code = ch.codePointAt(0);
      if (VISIBLE[ch]) out += VISIBLE[ch];
      else if (code < 0x20 || (code >= 0x7f && code < 0xa0)) out += "\\x" + code.toString(16).padStart(2, "0");
      else out += ch;
    }
    return out || '""';
  }
  function short(text, n) {
    const chars = [...visible(text)];
    return chars.length <= n ? chars.join("") : chars.slice(0, n - 1).join("") + "…";
  }
  function p4(v) {
    if (v === null) return "–";
    if (v === 0) return "0";
    return v < 0.00005 ? "<0.0001" : v.toFixed(4);
  }
  const p3 = (v) => v.toFixed(3);
  const verdict = (v) => (v === null ? "–" : v ? "✓" : "✗");
  const num = (v) => String(v);   // 0.8 -> "0.8", 1 -> "1", as Python's :g does for these

  function filtersOn(s, vocab) {
    const on = [];
    if (s.top_k > 0 && s.top_k < vocab) on.push("top_k " + s.top_k);
    if (s.top_p < 1) on.push("top_p " + num(s.top_p));
    if (s.min_p > 0) on.push("min_p " + num(s.min_p));
    return on;
  }
  function settingsParts(s, vocab) {
    if (s.temperature === 0) return ["greedy (temperature 0)"].concat(penaltyParts(s));
    const parts = ["temperature " + num(s.temperature)];
    parts.push(s.top_k === 0 ? "top_k off" : s.top_k >= vocab ? "top_k " + s.top_k + " (off: ≥ the vocabulary)" : "top_k " + s.top_k);
    parts.push(s.top_p < 1 ? "top_p " + num(s.top_p) : "top_p off");
    parts.push(s.min_p > 0 ? "min_p " + num(s.min_p) : "min_p off");
    return parts.concat(penaltyParts(s));
  }
  function penaltyParts(s) {
    const parts = [];
    if (s.repetition_penalty !== 1) parts.push("repetition_penalty " + num(s.repetition_penalty));
    if (s.frequency_penalty) parts.push("frequency_penalty " + num(s.frequency_penalty));
    if (s.presence_penalty) parts.push("presence_penalty " + num(s.presence_penalty));
    return parts;
  }

  // ---------------------------------------------------------------------------------------
  // Shading: darker = a less likely choice (q mode, on a log scale: the surprise -log2 q, full
  // at 6 bits, q = 1/64) or a more uncertain step (entropy mode, full at the run's largest)

  const SURPRISE_BITS = 6;
  let shadeBy = "q";
  function shade(r) {
    const t = shadeBy === "q" ? -Math.log2(Math.max(r.chosen.q, 1e-300)) / SURPRISE_BITS
      : r.entropy_bits / maxEntropy;
    const hue = shadeBy === "q" ? 28 : 212;
    return `hsl(${hue}, 88%, ${(97 - 44 * Math.min(1, Math.max(0, t))).toFixed(1)}%)`;
  }
  function drawRamp() {
    const hue = shadeBy === "q" ? 28 : 212;
    $("ramp").style.background = `linear-gradient(90deg, hsl(${hue}, 88%, 97%), hsl(${hue}, 88%, 53%))`;
    $("ramp-low").textContent = shadeBy === "q" ? "q = 1" : "0 bits";
    $("ramp-high").textContent = shadeBy === "q" ? "q ≤ 1/64 (log scale)" : maxEntropy.toFixed(2) + " bits";
    for (const t of tokens.values()) t.span.style.background = shade(t.record);
  }

  // ---------------------------------------------------------------------------------------
  // The header and the notes

  function fillHeader() {
    const run = DATA.run, first = records[0];
    const parts = [];
    if (run.model) parts.push("model " + run.model);
    parts.push(run.seed === null ? "seed: not in the trace" : "seed " + run.seed);
    parts.push(sampleIds.length === 1 ? "1 sample" : sampleIds.length + " samples");
    parts.push(records.length + " generated tokens");
    parts.push("vocabulary " + first.vocab_size + " tokens");
    $("run").textContent = parts.join(" · ");
    const distinct = DATA.settings;
    if (distinct.length === 1) {
      for (const part of settingsParts(distinct[0], first.vocab_size)) $("settings").append(el("span", "", part));
    } else {
      $("settings").append(el("span", "", "settings differ between samples: each sample names its own"));
    }
    const prompt = run.prompt === null ? "" : run.prompt;
    document.title = "nanosample explorer: " + (short(prompt, 40) || "a sampling run");
    const notes = $("notes");
    const k = DATA.candidates_per_step, most = DATA.most_candidates_in_trace;
    notes.append(el("p", "", "Built from " + records.length + " explain records (the JSON Lines " +
      "schema of docs/explain_schema.md, version 1): the same numbers as --explain's table and " +
      "--explain_file. The candidates are listed in the draw's order (descending probability); " +
      "u falls in the chosen token's interval [cumulative before, cumulative after)."));
    notes.append(el("p", "", (most > k
      ? "This page keeps each step's first " + k + " candidates and the chosen token (the trace has up to " + most + "); "
      : "This page keeps every candidate of the trace (" + most + " at most per step; a long run keeps fewer: min(20, max(3, 10000 / steps))); ") +
      "the model's logits are left out. Values show 4 decimals; hover a value for its exact value."));
    if (run.prompt === null) {
      notes.append(el("p", "", "The trace does not hold the prompt's text; its length is the first step's position. " +
        "Pass --start (and --seed) to python -m nanosample.explain to show them."));
    }
  }

  // ---------------------------------------------------------------------------------------
  // The samples, side by side: a strip over the steps, then the text

  const tokens = new Map();    // "sample:step" -> {record, span}
  const strips = new Map();    // sample -> {svg, recs, marker}
  const divergedAt = new Map(); // sample -> first step where it differs from the first sample
  const key = (s, t) => s + ":" + t;

  function findDivergence() {
    const base = bySample.get(sampleIds[0]);
    for (const s of sampleIds.slice(1)) {
      const recs = bySample.get(s);
      let t = 0;
      while (t < recs.length && t < base.length && recs[t].chosen_id === base[t].chosen_id) t++;
      divergedAt.set(s, t);
    }
  }

  function buildSamples() {
    const container = $("samples");
    const base = sampleIds[0];
    for (const s of sampleIds) {
      const recs = bySample.get(s);
      const card = el("article", "sample");
      card.dataset.sample = s;
      const head = el("div", "sample-head");
      head.append(el("h2", "", "sample " + s));
      card.append(head);
      const meanQ = recs.reduce((a, r) => a + r.chosen.q, 0) / recs.length;
      const meanH = recs.reduce((a, r) => a + r.entropy_bits, 0) / recs.length;
      let meta = recs.length + " tokens · mean q " + meanQ.toFixed(2) + " · mean entropy " + meanH.toFixed(2) + " bits";
      if (DATA.settings.length > 1) meta += " · " + settingsParts(recs[0].settings, recs[0].vocab_size).join(" · ");
      if (divergedAt.has(s)) {
        const d = divergedAt.get(s);
        meta += d === 0 ? " · differs from sample " + base + " from its first token"
          : d >= recs.length ? " · the same tokens as sample " + base
          : " · the same first " + (d === 1 ? "token" : d + " tokens") + " as sample " + base + ", then differs (red mark)";
      }
      card.append(el("p", "meta", meta));

      const svg = svgEl("svg", { class: "strip", role: "img", "aria-label": "entropy and chosen probability over the steps" });
      card.append(svg);
      const legend = el("div", "strip-legend");
      legend.append(el("span", "line"), "entropy of q, 0–" + maxEntropy.toFixed(2) + " bits", el("span", "dot"), "q of the chosen token, 0–1");
      card.append(legend);
      strips.set(s, { svg, recs, marker: null });
      svg.addEventListener("click", (ev) => {
        const box = svg.getBoundingClientRect();
        const i = Math.round((ev.clientX - box.left) / box.width * (recs.length - 1));
        select(s, recs[Math.max(0, Math.min(recs.length - 1, i))].step, true);
      });

      const text = el("div", "text");
      text.append(el("span", "prompt-label", "prompt"));
      const prompt = el("span", "prompt");
      if (DATA.run.prompt !== null) {
        prompt.textContent = DATA.run.prompt;
        prompt.title = "the prompt: " + recs[0].position + " tokens";
      } else {
        prompt.textContent = "[" + recs[0].position + " prompt tokens]";
        prompt.title = "the trace does not hold the prompt's text";
      }
      text.append(prompt);
      for (const r of recs) {
        const span = el("span", "tok");
        span.dataset.sample = r.sample;
        span.dataset.step = r.step;
        span.dataset.id = r.chosen_id;
        span.dataset.q = String(r.chosen.q);
        span.dataset.entropy = String(r.entropy_bits);
        if (r.chosen_text === "\n") {
          span.append(el("span", "nl", "↵"), "\n");
        } else {
          span.textContent = r.chosen_text;
        }
        span.title = "step " + r.step + ": " + visible(r.chosen_text) + " · q " + p4(r.chosen.q) + " · rank " + r.chosen_rank;
        if (divergedAt.get(s) === r.step) span.classList.add("diverged");
        tokens.set(key(r.sample, r.step), { record: r, span });
        text.append(span);
      }
      text.addEventListener("click", (ev) => {
        const span = ev.target.closest(".tok");
        if (!span) return;
        const same = selected && selected.pinned && selected.sample === +span.dataset.sample && selected.step === +span.dataset.step;
        select(+span.dataset.sample, +span.dataset.step, !same);
      });
      text.addEventListener("mouseover", (ev) => {
        const span = ev.target.closest(".tok");
        if (span && !(selected && selected.pinned)) select(+span.dataset.sample, +span.dataset.step, false);
      });
      card.append(text);
      container.append(card);
    }
  }

  function drawStrip(s) {
    const strip = strips.get(s), svg = strip.svg, recs = strip.recs;
    const w = Math.max(120, Math.round(svg.getBoundingClientRect().width) || 300), h = 54, pad = 4;
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    svg.replaceChildren();
    const n = recs.length;
    const x = (i) => (n <= 1 ? w / 2 : pad + (w - 2 * pad) * i / (n - 1));
    const y = (v) => h - pad - (h - 2 * pad) * v;
    svg.append(svgEl("rect", { x: 0, y: 0, width: w, height: h, fill: "#fafaf9" }));
    svg.append(svgEl("line", { x1: 0, x2: w, y1: y(0.5), y2: y(0.5), stroke: "#ececec" }));
    let line = "";
    recs.forEach((r, i) => { line += (i ? "L" : "M") + x(i).toFixed(1) + " " + y(r.entropy_bits / maxEntropy).toFixed(1); });
    svg.append(svgEl("path", { d: line + `L${x(n - 1).toFixed(1)} ${h - pad}L${x(0).toFixed(1)} ${h - pad}Z`, fill: "rgba(78,121,167,0.16)" }));
    svg.append(svgEl("path", { d: line, fill: "none", stroke: "#4e79a7", "stroke-width": 1.3, "stroke-linejoin": "round" }));
    let dots = "";
    recs.forEach((r, i) => { dots += "M" + x(i).toFixed(1) + " " + y(r.chosen.q).toFixed(1) + "h0.01"; });
    svg.append(svgEl("path", { d: dots, fill: "none", stroke: "#f28e2b", "stroke-width": n > 300 ? 2.2 : 3.6, "stroke-linecap": "round" }));
    strip.marker = svgEl("line", { y1: 0, y2: h, stroke: "#1f2328", "stroke-width": 1.5, visibility: "hidden" });
    strip.x = x;
    svg.append(strip.marker);
    if (selected && selected.sample === s) moveMarker(s, selected.step);
  }
  function moveMarker(s, step) {
    for (const [other, strip] of strips) {
      if (!strip.marker) continue;
      const i = strip.recs.findIndex((r) => r.step === step);
      const show = other === s && i >= 0;
      strip.marker.setAttribute("visibility", show ? "visible" : "hidden");
      if (show) { strip.marker.setAttribute("x1", strip.x(i)); strip.marker.setAttribute("x2", strip.x(i)); }
    }
  }

  // ---------------------------------------------------------------------------------------
  // The detail of one step

  let selected = null;   // {sample, step, pinned}

  function select(s, step, pinned) {
    const t = tokens.get(key(s, step));
    if (!t) return;
    if (selected) {
      const old = tokens.get(key(selected.sample, selected.step));
      if (old) old.span.classList.remove("selected");
    }
    selected = { sample: s, step, pinned };
    t.span.classList.add("selected");
    moveMarker(s, step);
    $("detail").classList.remove("closed");   // shown first, so that the charts measure its width
    document.body.classList.add("sheet-open");
    showStep(t.record);
  }

  function showStep(r) {
    const c = r.chosen, s = r.settings;
    $("d-title").textContent = "sample " + r.sample + " · step " + r.step + " · position " + r.position;
    $("d-settings").textContent = settingsParts(s, r.vocab_size).join(" · ");
    const why = $("why");
    why.replaceChildren();
    why.dataset.u = r.u === null ? "" : String(r.u);
    why.dataset.rank = String(r.chosen_rank);
    const token = el("code", "", '"' + visible(c.text) + '"');
    if (r.greedy) {
      why.append("greedy (temperature 0): no draw; ", token,
        " is the most likely token (rank " + c.rank + ", p = " + p3(c.p_raw) + ")");
    } else {
      why.append("kept " + r.n_kept + " of " + r.vocab_size + " tokens; u = ");
      const u = el("span", "", p3(r.u));
      u.id = "u";
      u.title = String(r.u);
      why.append(u, " fell in [" + p3(c.cum_before) + ", " + p3(c.cum_after) + ") → ", token, " (rank " + c.rank + ")");
    }
    const reshape = $("reshape");
    reshape.replaceChildren();
    if (!r.greedy) {
      const stages = [p3(c.p_raw) + " raw"];
      if (c.p_adjusted !== null) stages.push(p3(c.p_adjusted) + " after bias and penalties");
      stages.push(p3(c.p_tempered) + " after temperature " + num(s.temperature));
      const filters = filtersOn(s, r.vocab_size);
      stages.push(p3(c.q) + " final" + (filters.length ? ", after " + filters.join(", ") : " (no filter on)"));
      reshape.textContent = "Its probability: " + stages.join(" → ") + ".";
    }
    showDivergence(r);
    drawBars(r);
    drawCumulative(r);
    fillTable(r);
    let foot = r.n_kept + " of " + r.vocab_size + " tokens kept · entropy " + r.entropy_bits.toFixed(2) + " bits";
    if (r.entropy_tempered_bits !== null) foot += " (" + r.entropy_tempered_bits.toFixed(2) + " bits after temperature, before the filters)";
    $("d-foot").textContent = foot;
  }

  function showDivergence(r) {
    const box = $("diverge");
    box.replaceChildren();
    const base = sampleIds[0];
    const others = r.sample === base ? [...divergedAt].filter(([, d]) => d === r.step).map(([s]) => s)
      : divergedAt.get(r.sample) === r.step ? [base] : [];
    for (const s of others) {
      const o = tokens.get(key(s, r.step));
      if (!o) continue;
      const a = r.sample < s ? r : o.record, b = r.sample < s ? o.record : r;
      const drew = (x) => (x.greedy ? "took the most likely token " : "drew u = " + p3(x.u) + " → ");
      box.append((r.step ? "Samples " + a.sample + " and " + b.sample + " wrote the same " + r.step + " tokens until here. " : "") +
        "Here sample " + a.sample + " " + drew(a), el("code", "", '"' + visible(a.chosen_text) + '"'),
        " (rank " + a.chosen_rank + ") and sample " + b.sample + " " + drew(b), el("code", "", '"' + visible(b.chosen_text) + '"'),
        " (rank " + b.chosen_rank + "). ");
    }
  }

  function drawBars(r) {
    const svg = $("bars");
    svg.replaceChildren();
    const w = Math.max(260, Math.round(svg.getBoundingClientRect().width) || 460);
    const rows = [];
    let previous = 0;
    for (const c of r.candidates) {
      if (c.rank !== previous + 1) rows.push(null);   // ranks left out
      rows.push(c);
      previous = c.rank;
    }
    const rowH = 15, top = 2, labelW = 96, valueW = 46;
    const h = top + rows.length * rowH + 2;
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    svg.setAttribute("height", h);
    const barW = w - labelW - valueW;
    const most = Math.max(...r.candidates.map((c) => Math.max(c.p_raw, c.p_tempered || 0, c.q)));
    const X = (v) => barW * v / most;
    rows.forEach((c, i) => {
      const y = top + i * rowH;
      if (c === null) {
        svg.append(svgEl("text", { x: 26, y: y + 11, "text-anchor": "end", fill: "#888", "font-size": 11 }, "…"));
        return;
      }
      if (c.rank === r.chosen_rank) svg.append(svgEl("rect", { x: 0, y, width: w, height: rowH - 1, fill: "#fbe3e3", rx: 2 }));
      const color = c.rank === r.chosen_rank ? "#d62728" : c.kept ? "#1f2328" : "#9a9aa2";
      const weight = c.rank === r.chosen_rank ? 700 : 400;
      svg.append(svgEl("text", { x: 26, y: y + 11, "text-anchor": "end", fill: color, "font-size": 11, "font-weight": weight }, String(c.rank)));
      const label = svgEl("text", { x: 32, y: y + 11, fill: color, "font-size": 12, "font-weight": weight, "font-family": "ui-monospace, Menlo, Consolas, DejaVu Sans Mono, monospace" }, short(c.text, 8));
      if (!c.kept) label.setAttribute("text-decoration", "line-through");
      svg.append(label);
      const bar = (v, dy, fill) => {
        if (v === null || v === 0) return;
        svg.append(svgEl("rect", { x: labelW, y: y + dy, width: Math.max(0.8, X(v)), height: 4, fill, opacity: c.kept || fill === "#b8b8b8" ? 1 : 0.45 }));
      };
      bar(c.p_raw, 1, "#b8b8b8");
      bar(c.p_tempered, 5.5, "#4e79a7");
      bar(c.q, 10, "#f28e2b");
      const value = c.kept ? p3(c.q) : "dropped";
      svg.append(svgEl("text", { x: w - 2, y: y + 11, "text-anchor": "end", fill: c.kept ? "#656d76" : "#9a9aa2", "font-size": 10.5 }, value));
    });
  }

  function drawCumulative(r) {
    const svg = $("cumulative");
    svg.replaceChildren();
    const w = Math.max(260, Math.round(svg.getBoundingClientRect().width) || 460), h = 62;
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    svg.setAttribute("height", h);
    const x0 = 10, x1 = w - 10, X = (v) => x0 + (x1 - x0) * v, y = 20, bh = 20;
    svg.append(svgEl("rect", { x: x0, y, width: x1 - x0, height: bh, fill: "#ececec" }));   // the kept tokens not listed
    const kept = r.candidates.filter((c) => c.kept && c.cum_before !== null);
    kept.forEach((c, i) => {
      const chosen = c.rank === r.chosen_rank;
      const a = X(c.cum_before), b = X(c.cum_after);
      const rect = svgEl("rect", { x: a, y, width: Math.max(0.5, b - a), height: bh, fill: chosen ? "#d62728" : i % 2 ? "#f7b267" : "#f28e2b", stroke: "#fff", "stroke-width": 0.7 });
      rect.append(svgEl("title", {}, visible(c.text) + ": [" + c.cum_before + ", " + c.cum_after + ")"));
      svg.append(rect);
      if (b - a > 16) svg.append(svgEl("text", { x: (a + b) / 2, y: y + 14, "text-anchor": "middle", fill: chosen ? "#fff" : "#1f2328", "font-size": 11, "font-family": "ui-monospace, Menlo, Consolas, DejaVu Sans Mono, monospace" }, short(c.text, Math.max(1, Math.floor((b - a) / 8)))));
    });
    for (const t of [0, 0.25, 0.5, 0.75, 1]) {
      svg.append(svgEl("line", { x1: X(t), x2: X(t), y1: y + bh, y2: y + bh + 4, stroke: "#999" }));
      svg.append(svgEl("text", { x: X(t), y: y + bh + 15, "text-anchor": t === 0 ? "start" : t === 1 ? "end" : "middle", fill: "#656d76", "font-size": 10 }, String(t)));
    }
    if (r.u === null) {
      svg.append(svgEl("text", { x: x0, y: 13, fill: "#656d76", "font-size": 11 }, "greedy: no draw, the most likely token"));
      return;
    }
    const ux = X(r.u);
    svg.append(svgEl("line", { x1: ux, x2: ux, y1: 14, y2: y + bh + 2, stroke: "#1f2328", "stroke-width": 2 }));
    svg.append(svgEl("text", { x: Math.min(Math.max(ux, x0 + 30), x1 - 30), y: 11, "text-anchor": "middle", fill: "#1f2328", "font-size": 11, "font-weight": 700 }, "u = " + p3(r.u)));
  }

  function fillTable(r) {
    const table = $("step-table");
    table.replaceChildren();
    const adjusted = r.bias_or_penalties;
    const penalties = r.candidates.some((c) => c.penalized !== null);
    const columns = [["rank", "rank"], ["token", "token"], ["raw p", "p_raw"]];
    if (adjusted) columns.push(["adj p", "p_adjusted"]);
    columns.push(["temp p", "p_tempered"], ["top-k", "top_k"], ["top-p", "top_p"], ["min-p", "min_p"]);
    if (penalties) columns.push(["pen", "penalized"]);
    columns.push(["final q", "q"], ["cumulative", "cum"]);
    const head = el("tr");
    for (const [name, field] of columns) head.append(el("th", field === "text" || field === "token" ? "token" : "", name));
    const thead = el("thead");
    thead.append(head);
    const body = el("tbody");
    let previous = 0;
    for (const c of r.candidates) {
      if (c.rank !== previous + 1) {
        const gap = el("tr", "gap");
        const td = el("td", "", "…");
        td.colSpan = columns.length;
        gap.append(td);
        body.append(gap);
      }
      previous = c.rank;
      const tr = el("tr", c.rank === r.chosen_rank ? "chosen" : c.kept ? "" : "dropped");
      tr.dataset.rank = c.rank;
      for (const [, field] of columns) {
        let td;
        if (field === "rank") td = el("td", "", String(c.rank));
        else if (field === "token") { td = el("td", "token", visible(c.text)); td.title = "id " + c.id; }
        else if (field === "top_k" || field === "top_p" || field === "min_p") td = el("td", c[field] === null ? "" : c[field] ? "yes" : "no", verdict(c[field]));
        else if (field === "penalized") td = el("td", "", c.penalized === null ? "–" : c.penalized ? "yes" : "no");
        else if (field === "cum") {
          td = el("td", "", c.cum_before === null ? "–" : "[" + p3(c.cum_before) + ", " + p3(c.cum_after) + ")");
          if (c.cum_before !== null) td.title = "[" + c.cum_before + ", " + c.cum_after + ")";
        } else {
          td = el("td", "", p4(c[field]));
          if (c[field] !== null) td.title = String(c[field]);
        }
        tr.append(td);
      }
      body.append(tr);
    }
    table.append(thead, body);
  }

  // ---------------------------------------------------------------------------------------
  // Controls

  function setShade(mode) {
    shadeBy = mode;
    $("by-q").setAttribute("aria-pressed", String(mode === "q"));
    $("by-entropy").setAttribute("aria-pressed", String(mode === "entropy"));
    drawRamp();
  }
  $("by-q").addEventListener("click", () => setShade("q"));
  $("by-entropy").addEventListener("click", () => setShade("entropy"));
  $("d-close").addEventListener("click", () => {
    $("detail").classList.add("closed");
    document.body.classList.remove("sheet-open");
    if (selected) selected.pinned = false;
  });
  document.addEventListener("keydown", (ev) => {
    if (!selected) return;
    if (ev.key === "ArrowRight" || ev.key === "ArrowLeft") {
      const step = selected.step + (ev.key === "ArrowRight" ? 1 : -1);
      if (tokens.has(key(selected.sample, step))) {
        select(selected.sample, step, true);
        tokens.get(key(selected.sample, step)).span.scrollIntoView({ block: "nearest" });
        ev.preventDefault();
      }
    } else if (ev.key === "Escape") {
      selected.pinned = false;
    }
  });
  let resizing = 0;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => {
      for (const s of sampleIds) drawStrip(s);
      if (selected) showStep(tokens.get(key(selected.sample, selected.step)).record);
    }, 100);
  });

  // ---------------------------------------------------------------------------------------
  // Start: #s<sample>-t<step> in the address picks a token; wide screens show the first step

  fillHeader();
  findDivergence();
  buildSamples();
  setShade("q");
  for (const s of sampleIds) drawStrip(s);
  const wanted = /^#s(\d+)-t(\d+)$/.exec(location.hash);
  if (wanted && tokens.has(key(+wanted[1], +wanted[2]))) {
    select(+wanted[1], +wanted[2], true);
  } else if (window.matchMedia("(min-width: 1001px)").matches) {
    select(sampleIds[0], bySample.get(sampleIds[0])[0].step, false);
  }
  document.body.dataset.ready = "true";
})();
