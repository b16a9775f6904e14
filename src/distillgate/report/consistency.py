"""The report's S4 section: for the newest iteration of the ``consistency`` stage, the per-kind failure table
(generated, answered, failed, failed per check), the hard pool's pass rates before / after each iteration per
check and per kind, the semantic threshold's calibration, and example failures (request, teacher answer,
student answer, which check failed and why). Empty (no section) for runs without the stage."""

from __future__ import annotations

from html import escape

CHECKS = ("semantic", "logic", "quality")


def _e(s) -> str:
    return escape(str(s), quote=True)


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.0f}%"


def _kind_table(c: dict) -> str:
    head = "".join(f"<th>failed {_e(k)}</th>" for k in CHECKS)
    rows = []
    for kind, r in c["kinds"].items():
        cells = "".join(f'<td class="num">{r.get(f"failed_{k}", 0)}</td>' for k in CHECKS)
        rows.append(f'<tr><td>{_e(kind)}</td><td class="num">{r["generated"]}</td><td class="num">{r["answered"]}'
                    f'</td><td class="num">{r["failed"]}</td>{cells}</tr>')
    return (f'<table class="gates"><tr><th>kind</th><th>generated</th><th>answered</th><th>failed</th>{head}</tr>'
            f'{"".join(rows)}</table>')


def _pool_table(its) -> str:
    rows = []
    for it in its:
        c = it.consistency
        new, b, a = c["new"], c["pool_before"], c["pool_after"]
        per_check = (" · ".join(f"{k} {_pct(b['check'].get(k))} → {_pct(a['check'].get(k))}" for k in CHECKS)
                     if b["n"] or a["n"] else "—")  # an empty pool has no rates
        kinds = sorted(set(b["kind"]) | set(a["kind"]))
        per_kind = " · ".join(f"{k} {_pct(b['kind'].get(k))} → {_pct(a['kind'].get(k))}" for k in kinds) or "—"
        rows.append(f'<tr><td class="num">{it.index}</td><td class="num">{_pct(new["all"])}</td>'
                    + "".join(f'<td class="num">{_pct(new["check"].get(k))}</td>' for k in CHECKS)
                    + f'<td class="num">{b["n"]}: {_pct(b["all"])} → {_pct(a["all"])}</td><td>{per_check}</td>'
                    f'<td>{per_kind}</td><td class="num">{c["pool_size"]} (+{len(c["entered"])} / '
                    f'−{len(c["left"])})</td></tr>')
    head = "".join(f"<th>new: {k}</th>" for k in CHECKS)
    return (f'<table class="gates"><tr><th>iteration</th><th>new: all</th>{head}<th>pool before → after</th>'
            f'<th>pool per check</th><th>pool per kind</th><th>pool size</th></tr>{"".join(rows)}</table>')


def _example(x: dict) -> str:
    why = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in x["why"].items())
    return (f'<details><summary><b>{_e(x["kind"])}</b>: failed {_e(", ".join(x["failed"]))}</summary>'
            f'<table class="gates"><tr><th>request</th><td>{_e(x["request"])}</td></tr>'
            f'<tr><th>source prompt</th><td>{_e(x["source"])}</td></tr>'
            f'<tr><th>transformation</th><td><code style="white-space:pre-wrap;word-break:break-word">'
            f'{_e(x["transformation"])}</code></td></tr>'
            f'<tr><th>teacher</th><td>{_e(x["teacher"]) or "<i>(empty)</i>"}</td></tr>'
            f'<tr><th>student</th><td>{_e(x["student"]) or "<i>(empty)</i>"}</td></tr>'
            f'<tr><th>why</th><td><ul>{why}</ul></td></tr></table></details>')


def consistency_section(d) -> str:
    its = [it for it in d.iterations if it.consistency]
    if not its:
        return ""
    last = its[-1].consistency
    cal = last.get("calibration") or {}
    note = (f'<p class="muted">Semantic threshold {cal["threshold"]:.3f} (cosine), calibrated on the labelled set: '
            f'ROC AUC {cal["auc"]:.3f}, F1 {cal["f1"]:.3f}.</p>' if cal else "")
    examples = "".join(_example(x) for x in last["examples"]) or '<p class="muted">No failures.</p>'
    return (f'<section id="consistency"><h2>S4 behaviour consistency</h2>'
            f'<h3>Failures per kind (iteration {its[-1].index})</h3>{_kind_table(last)}{note}'
            f'<h3>Pass rates and the hard pool</h3>{_pool_table(its)}'
            f'<h3>Example failures (iteration {its[-1].index})</h3>{examples}</section>')
