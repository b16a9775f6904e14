"""The report's benchmark section (SPEC S1.1, S1.3, L2): the latest benchmark iteration's teacher-vs-student
scores per task, the per-capability item diff and example items the student lost.

Its data is :attr:`ReportData.benchmark`: the ``benchmark.json`` the anchor stage commits (written by
:func:`distillgate.evaluate.benchmark.benchmark_provider`) without the student's full scorecard, plus
``iteration``. Every user string is escaped.
"""

from __future__ import annotations

import json
from html import escape

EMPTY = ('<section id="benchmark"><h2>Benchmark</h2><p class="muted">No benchmark in this run (the anchor '
         'stage\'s option <code>benchmark</code> names a suite to measure the teacher and every student on).'
         '</p></section>')


def esc(v: object) -> str:
    return escape(str(v), quote=True)


def _num(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return esc(v)


def _short(v, n: int = 60) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
        s = "[" + ", ".join(f"{x:.3g}" for x in v) + "]"
    return esc(s if len(s) <= n else s[: n - 1] + "…")


def _tail(v, n: int = 44) -> str:
    """An item id cut from the left (``…/blimp/x.jsonl:7``): its end is what tells items apart."""
    s = str(v)
    return esc(s if len(s) <= n else "…" + s[-(n - 1):])


def _scores(b: dict) -> str:
    t, s, hib = b.get("teacher_metrics") or {}, b.get("student_metrics") or {}, b.get("higher_is_better") or {}
    names = [n for n in sorted(set(t) | set(s)) if not n.endswith(("/ci_low", "/ci_high"))]
    rows = []
    for n in names:
        task, _, metric = n.partition("/")
        ci = (f' <span class="muted">[{_num(s.get(n + "/ci_low"))}, {_num(s.get(n + "/ci_high"))}]</span>'
              if n + "/ci_low" in s else "")
        delta = s[n] - t[n] if isinstance(s.get(n), (int, float)) and isinstance(t.get(n), (int, float)) else None
        arrow = {True: " ↑", False: " ↓"}.get(hib.get(n), "")
        rows.append(f"<tr><td><code>{esc(task.removeprefix('bench_'))}</code></td><td>{esc(metric)}{arrow}</td>"
                    f'<td class="num">{_num(t.get(n))}</td><td class="num">{_num(s.get(n))}{ci}</td>'
                    f'<td class="num">{"—" if delta is None else f"{delta:+.4g}"}</td></tr>')
    return ('<table class="gates"><tr><th>task</th><th>metric (↑ higher / ↓ lower is better)</th><th>teacher</th>'
            f'<th>student (95% CI)</th><th>student − teacher</th></tr>{"".join(rows)}</table>')


def _capabilities(b: dict) -> str:
    by_tag = (b.get("diff") or {}).get("by_tag") or {}
    rows = []
    for cap in b.get("capabilities") or []:
        r = by_tag.get(cap)
        if not r or not r["n"]:
            continue
        cls = ' class="g-fail"' if r["lost"] > r["gained"] else ""
        rows.append(f"<tr{cls}><td><code>{esc(cap)}</code></td><td class=\"num\">{r['n']}</td>"
                    f'<td class="num">{r["teacher_correct"] / r["n"]:.3f}</td>'
                    f'<td class="num">{r["student_correct"] / r["n"]:.3f}</td>'
                    f'<td class="num">{r["lost"]}</td><td class="num">{r["gained"]}</td></tr>')
    if not rows:
        return '<p class="muted">No per-item tasks in the suite (perplexity only): nothing to diff.</p>'
    return ('<table class="gates"><tr><th>capability</th><th>items</th><th>teacher acc</th><th>student acc</th>'
            '<th>lost (teacher ✓, student ✗)</th><th>gained (teacher ✗, student ✓)</th></tr>'
            f'{"".join(rows)}</table>')


def _examples(b: dict) -> str:
    ex = b.get("lost_examples") or {}
    if not ex:
        return ""
    rows = []
    for cap, items in ex.items():
        for e in items:
            rows.append(f"<tr><td><code>{esc(cap)}</code></td><td><code>{esc(e.get('task'))}</code></td>"
                        f"<td><code title=\"{esc(e.get('doc_id'))}\">{_tail(e.get('doc_id'))}</code></td><td>{_short(', '.join(map(str, e.get('tags') or [])))}</td>"
                        f"<td>{_short(e.get('gold'))}</td><td>{_short(e.get('teacher_pred'))}</td>"
                        f"<td>{_short(e.get('student_pred'))}</td>"
                        f"<td>{_short(e.get('teacher_loglikelihoods'))}</td>"
                        f"<td>{_short(e.get('student_loglikelihoods'))}</td></tr>")
    return ('<h3>Items the student lost (examples)</h3><div style="overflow-x:auto"><table class="gates"><tr>'
            '<th>capability</th><th>task</th><th>item</th><th>tags</th><th>gold</th><th>teacher</th><th>student</th>'
            '<th>teacher log-likelihoods</th><th>student log-likelihoods</th></tr>'
            f'{"".join(rows)}</table></div>')


def benchmark_section(b: dict) -> str:
    """The section's HTML for :attr:`ReportData.benchmark` (``{}``: a note that no benchmark was configured)."""
    if not b:
        return EMPTY
    share = b.get("lost_share")
    head = (f'<p>Suite <code>{esc(b.get("suite"))}</code> (limit {_num(b.get("limit"))} items per task), '
            f'iteration {esc(b.get("iteration"))}: the student loses <b>{_num(b.get("lost"))}</b> of '
            f'{_num(b.get("n"))} items the teacher gets right and gains {_num(b.get("gained"))}'
            f'{"" if share is None else f" (lost share {share:.3f})"}. The teacher\'s profile is its baseline '
            '(S1.3); the per-item diff is the version\'s <code>benchmark.json</code>.</p>')
    errors = b.get("errors") or {}
    err = ("".join(f'<p class="muted">task <code>{esc(k)}</code> failed: {esc(v)}</p>' for k, v in errors.items())
           if errors else "")
    return (f'<section id="benchmark"><h2>Benchmark</h2>{head}{err}<h3>Scores</h3>{_scores(b)}'
            f'<h3>By capability</h3>{_capabilities(b)}{_examples(b)}</section>')
