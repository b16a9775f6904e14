"""G-O4 spot checks of explanations: the human workflow (export a sample as HTML + CSV, import the verdicts,
pass rate with a Wilson CI) and the gate provider ``explanation_spot_check_pct``.

The CSV has one row per explanation: ``id, model, prompt, answer, premises, steps, confidences,
auto_check, verdict, comment``; a reviewer fills ``verdict`` with ``pass`` or ``fail`` (case and surrounding
spaces ignored) and may write a ``comment``. :func:`read_verdicts` rejects anything else, naming the line,
the row's id and the column, before counting.

The gate reads a verdict CSV when one is given (``--explanation-verdicts``; provenance ``human spot check,
n=...``), else runs the automatic spot check on a bounded probe set of built-in prompts (``explain_prompts``,
CPU preset 8; provenance ``automatic spot check, n=...``). The value is a percentage; its Wilson 95% CI goes
into the gate table, which marks the verdict uncertain when the CI contains 96.8.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..evaluate.providers import GateContext, register_metric_provider, report_size, wilson_ci
from ..io import MAX_INPUT_FILE_BYTES, atomic_write_json, atomic_write_text
from .explain import Explanation, ExplainOptions, explain, spot_check

COLUMNS = ("id", "model", "prompt", "answer", "premises", "steps", "confidences", "auto_check", "verdict", "comment")
VERDICTS = ("pass", "fail")
MIN_PROMPT_WORDS = 10  # a probe prompt needs spans besides its premises for the random comparison


# ------------------------------------------------------------------------------------------------ building

def explain_all(model, tokenizer, prompts: list[tuple[str, str, str | None]], options: ExplainOptions,
                progress=None) -> list[Explanation]:
    """Explain and auto-check each ``(id, prompt, answer or None)``; ``progress(i, n, explanation)``."""
    out = []
    for i, (pid, prompt, answer) in enumerate(prompts):
        ex = explain(model, tokenizer, prompt, answer, id=pid, options=options)
        spot_check(model, tokenizer, ex, options)
        out.append(ex)
        if progress:
            progress(i + 1, len(prompts), ex)
    return out


def probe_prompts(n: int, seed: int = 0) -> list[tuple[str, str, None]]:
    """``n`` built-in prompts of at least :data:`MIN_PROMPT_WORDS` words (levels 2-3), answered by the model."""
    from ..data.prompts import builtin_prompts

    out = []
    for rec in builtin_prompts(max(8 * n, 24), seed=seed):
        text = rec.messages[-1]["content"]
        if len(text.split()) >= MIN_PROMPT_WORDS:
            out.append((rec.id, text, None))
        if len(out) == n:
            break
    return out


def read_prompt_file(path: str | Path) -> list[tuple[str, str, str | None]]:
    """Prompts of a JSONL file (the ``data`` prompt format: ``{"prompt": ...}`` or ``{"messages": [...]}``);
    an optional ``answer`` field is explained as given instead of the model's own answer."""
    from ..data.prompts import load_jsonl_prompts

    recs = load_jsonl_prompts(path)
    answers = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        obj = json.loads(line) if line.strip() else None
        if isinstance(obj, dict) and "answer" in obj:
            if not isinstance(obj["answer"], str) or not obj["answer"].strip():
                raise InputError(f"{path}:{lineno}: field 'answer' must be a non-empty string")
            answers[lineno] = obj["answer"]
    out = []
    for r in recs:
        users = [m["content"] for m in r.messages if m.get("role") == "user"]
        if not users:
            raise InputError(f"{path}:{r.meta.get('line')}: no user message to explain")
        out.append((r.id, users[-1], answers.get(r.meta.get("line"))))
    return out


# ------------------------------------------------------------------------------------------------ export

def _premises_cell(ex: Explanation) -> str:
    return " | ".join(f'[{i + 1}] "{p.quote}"' for i, p in enumerate(ex.premises))


def _steps_cell(ex: Explanation) -> str:
    rank = {p.span: i + 1 for i, p in enumerate(ex.premises)}
    out = []
    for i, s in enumerate(ex.steps):
        rests = ", ".join(f'[{rank[j]}]' if j in rank else f'"{ex.spans[j].text}"' for j in s.premises) or "-"
        out.append(f"{i + 1}. {s.text} (rests on {rests})")
    return " || ".join(out)


def to_rows(explanations: list[Explanation], model: str) -> list[dict]:
    return [{"id": ex.id, "model": model, "prompt": ex.prompt, "answer": ex.answer, "premises": _premises_cell(ex),
             "steps": _steps_cell(ex), "confidences": "; ".join(f"{s.confidence:.3f}" for s in ex.steps),
             "auto_check": "" if ex.check is None else ("pass" if ex.check["passed"] else
                                                        "fail: " + "; ".join(ex.check["reasons"])),
             "verdict": "", "comment": ""} for ex in explanations]


def export(explanations: list[Explanation], out_dir: str | Path, model: str, meta: dict | None = None) -> dict:
    """Write ``explanations.csv`` (for verdicts), ``explanations.html`` (to read) and ``explanations.json``
    (everything) into ``out_dir``, each atomically. Returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(to_rows(explanations, model))
    paths = {"csv": out / "explanations.csv", "html": out / "explanations.html", "json": out / "explanations.json"}
    atomic_write_json(paths["json"], {"model": model, "meta": meta or {},
                                      "explanations": [e.to_dict() for e in explanations]})
    atomic_write_text(paths["html"], render_html(explanations, model, meta or {}))
    atomic_write_text(paths["csv"], buf.getvalue())
    return {k: str(v) for k, v in paths.items()}


def _marked_prompt(ex: Explanation) -> str:
    from ..report.html import esc

    rank = {p.span: i + 1 for i, p in enumerate(ex.premises)}
    parts, pos = [], 0
    for j, s in enumerate(ex.spans):
        if j in rank:
            parts += [esc(ex.prompt[pos:s.start]), f'<mark title="premise {rank[j]}: {ex.span_scores[j]:+.3g} nats">'
                      f'{esc(s.text)}<sup>[{rank[j]}]</sup></mark>']
            pos = s.end
    parts.append(esc(ex.prompt[pos:]))
    return "".join(parts)


def render_html(explanations: list[Explanation], model: str, meta: dict) -> str:
    """A self-contained page: per explanation the prompt with its premises marked, the answer, the reasoning
    chain (step, confidence, premises) and the automatic check."""
    from ..report.html import esc
    from ..report.style import CSS

    n_pass = sum(bool(e.check and e.check["passed"]) for e in explanations)
    cards = []
    for ex in explanations:
        rank = {p.span: i + 1 for i, p in enumerate(ex.premises)}
        rows = "".join(
            f"<tr><td>{i + 1}</td><td>{esc(s.text)}</td><td class='num'>{s.confidence:.3f}</td><td>"
            + ", ".join(f"[{rank[j]}]" if j in rank else f"&ldquo;{esc(ex.spans[j].text)}&rdquo;" for j in s.premises)
            + "</td></tr>" for i, s in enumerate(ex.steps))
        chk = ex.check or {}
        badge = ("" if not chk else f'<span class="badge {"g-pass" if chk["passed"] else "g-fail"}">automatic check: '
                 f'{"pass" if chk["passed"] else "fail"}</span>')
        why = "".join(f"<li>{esc(r)}</li>" for r in chk.get("reasons", []))
        drop = (f"<p class='muted'>deleting the premises: log p(answer) &minus;{chk['drop_premises']:.3g} nats; random "
                f"same-length deletions: " + ", ".join(f"&minus;{x:.3g}" for x in chk["drop_random"]) + "</p>"
                if chk.get("drop_premises") is not None else "")
        cards.append(f"""<section id="{esc(ex.id)}"><h2>{esc(ex.id)} {badge}</h2>
<h3>Prompt (premises marked)</h3><p>{_marked_prompt(ex)}</p>
<h3>Premises</h3><ol>{"".join(f"<li>&ldquo;{esc(p.quote)}&rdquo; <span class='muted'>({p.score:+.3g} nats)</span></li>"
                              for p in ex.premises) or "<li class='muted'>none</li>"}</ol>
<h3>Answer</h3><p>{esc(ex.answer)}</p>
<h3>Reasoning chain</h3><table><tr><th>#</th><th>step</th><th>confidence</th><th>rests on</th></tr>{rows}</table>
{drop}<ul>{why}</ul></section>""")
    return f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>explanations · {esc(model)}</title>
<style>{CSS} mark {{ background:#fff3bf; }} sup {{ color:var(--muted); }}</style></head><body><main class="wrap">
<h1>Explanations of {esc(model)}</h1>
<p>{len(explanations)} explanations; the automatic spot check passes {n_pass}. Attribution:
{esc(explanations[0].method if explanations else "-")}; confidence: {esc(explanations[0].confidence_method if explanations else "-")}.
Review each one and write <code>pass</code> or <code>fail</code> in the <code>verdict</code> column of
<code>explanations.csv</code>, then run <code>distillgate explain import explanations.csv</code>.</p>
{"".join(cards)}</main></body></html>
"""


# ------------------------------------------------------------------------------------------------ import

@dataclass
class VerdictSummary:
    path: str
    n: int
    passed: int
    unreviewed: int
    pct: float
    ci95: tuple[float, float]  # percent
    models: list[str]

    def to_dict(self) -> dict:
        return {"path": self.path, "n": self.n, "passed": self.passed, "failed": self.n - self.passed,
                "unreviewed": self.unreviewed, "pass_pct": self.pct, "ci95_pct": list(self.ci95),
                "ci_method": "Wilson score interval (scipy)", "models": self.models}


def read_verdicts(path: str | Path, allow_unreviewed: bool = False) -> VerdictSummary:
    """The pass rate of a reviewed CSV (:data:`COLUMNS`; ``id`` and ``verdict`` required). Every bad cell is
    reported at once (line, id, column, value, what is allowed); nothing is counted from a bad file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: verdict file not found (write one with `distillgate explain export`)")
    if p.stat().st_size > MAX_INPUT_FILE_BYTES:
        raise InputError(f"{p}: {p.stat().st_size:,} bytes, over the input file limit of {MAX_INPUT_FILE_BYTES:,}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{p}: not UTF-8 ({e})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    missing = [c for c in ("id", "verdict") if c not in header]
    if missing:
        raise InputError(f"{p}: missing column(s) {missing}; the header is {header} (expected {list(COLUMNS)})")
    errors, seen, verdicts, models = [], {}, [], set()
    rows, lines = [], []
    try:
        for row in reader:
            rows.append(row)
            lines.append(reader.line_num)  # the row's last line (a quoted cell may span lines)
    except csv.Error as e:
        raise InputError(f"{p}: not a valid CSV at line {reader.line_num} ({e})") from None
    for i, row in enumerate(rows):
        where = f"row {i + 1} (line {lines[i]}, id {row.get('id')!r})"
        if None in row:
            errors.append(f"{where}: {len(row[None])} cell(s) beyond the {len(header)} columns of the header")
        rid = (row.get("id") or "").strip()
        if not rid:
            errors.append(f"{where}, column 'id': empty; every row needs the explanation's id")
        elif rid in seen:
            errors.append(f"{where}, column 'id': {rid!r} repeats row {seen[rid]}")
        else:
            seen[rid] = i + 1
        v = (row.get("verdict") or "").strip().lower()
        if v in VERDICTS:
            verdicts.append(v == "pass")
        elif v or not allow_unreviewed:
            errors.append(f"{where}, column 'verdict': {row.get('verdict')!r} is not one of {', '.join(VERDICTS)}"
                          + ("" if v else " (empty: not reviewed; pass --allow-unreviewed to leave it out)"))
        if row.get("model"):
            models.add(row["model"].strip())
    if errors:
        more = f" (and {len(errors) - 20} more)" if len(errors) > 20 else ""
        raise InputError(f"{p}: {len(errors)} bad cell(s): " + "; ".join(errors[:20]) + more)
    if not verdicts:
        raise InputError(f"{p}: no row has a verdict (pass or fail)")
    k, n = sum(verdicts), len(verdicts)
    lo, hi = wilson_ci(k, n)
    return VerdictSummary(str(p), n, k, len(rows) - n, 100.0 * k / n, (100.0 * lo, 100.0 * hi), sorted(models))


# ------------------------------------------------------------------------------------------------ gate

METRIC = "explanation_spot_check_pct"


def automatic_report(explanations: list[Explanation], method: str) -> dict:
    """The G-O4 report of auto spot-checked ``explanations`` (what the provider and the ``explain`` drill give)."""
    k, n = sum(e.check["passed"] for e in explanations), len(explanations)
    lo, hi = wilson_ci(k, n)
    return {"provenance": f"automatic spot check, n={n}", "kind": "automatic", "n": n, "passed": k,
            "pass_pct": 100.0 * k / n, "ci95_pct": [100.0 * lo, 100.0 * hi], "method": method,
            "failures": {e.id: e.check["reasons"] for e in explanations if not e.check["passed"]}}


def spot_check_provider(ctx: GateContext) -> float | None:
    """G-O4: the human verdicts (``options['explanation_verdicts']``: a CSV path or a :class:`VerdictSummary`),
    else the operations stage's ``explain`` drill report (``options['explanation_report']``), else the automatic
    spot check of the student on ``explain_prompts`` built-in prompts."""
    given = ctx.options.get("explanation_verdicts")
    if given:
        s = given if isinstance(given, VerdictSummary) else read_verdicts(given)
        prov = f"human spot check, n={s.n}"
        ctx.details[METRIC] = {"provenance": prov, "kind": "human", **s.to_dict()}
        report_size(ctx, METRIC, s.n, s.ci95, "Wilson score interval (scipy)")
        return s.pct
    rep = ctx.options.get("explanation_report")  # the operations stage's ``explain`` drill, this iteration
    if not rep:
        if "student" not in ctx.cache and ctx.student_spec is None:
            ctx.details[METRIC] = {"note": "needs a student for the automatic spot check, or a human verdict file "
                                           "(--explanation-verdicts CSV from `distillgate explain export`)"}
            return None
        st = ctx.student()
        opts = ExplainOptions(seed=int(ctx.opt("seed")))
        rep = automatic_report(explain_all(st.model, st.tokenizer, probe_prompts(int(ctx.opt("explain_prompts")),
                                                                                 seed=int(ctx.opt("seed"))), opts),
                               opts.method)
    ctx.details[METRIC] = {k: rep[k] for k in ("provenance", "kind", "n", "passed", "method", "failures",
                                               "review_files") if k in rep}
    report_size(ctx, METRIC, rep["n"], tuple(rep["ci95_pct"]), "Wilson score interval (scipy)")
    return rep["pass_pct"]


register_metric_provider(METRIC, spot_check_provider, higher_is_better=True, regression=False, tier="high",
                         description="G-O4: spot-check pass rate of three-part explanations, % (human verdicts "
                                     "when given, else the automatic check)", module=__name__)
