"""Teacher-vs-student diff, item by item: which items the teacher gets right and the student gets wrong,
by task and by capability tag (SPEC L2: which capability regressed, with the items).

Both scorecards must come from the same suite on the same items (:func:`~distillgate.evaluate.suite.run_suite`
``details[<task>]["items"]``); items are matched by ``doc_id`` within a task. An item's tags are its task's
capability first, then its own (``subject:marketing``, ``paradigm:anaphor_gender_agreement``, ``task:bbh_x``).
"""

from __future__ import annotations

from ..errors import InputError
from .metrics import Scorecard


def item_diff(student: Scorecard | dict, teacher: Scorecard | dict, *, max_items: int | None = 50) -> dict:
    """``{"by_task": {task: row}, "by_tag": {tag: row}, "lost": n, "gained": n, "n": n}`` where a row is
    ``{n, teacher_correct, student_correct, lost, gained, lost_items: [doc_id, ...], gained_items}``.

    *lost* = teacher right, student wrong; *gained* = the reverse. ``max_items`` caps the id lists kept per
    row (None keeps all; the counts are always complete). Tasks without items (perplexity, teacher KL) and
    tasks only one side ran are skipped; an item id present on one side only raises (not the same items).
    """
    s_det = (student.details if isinstance(student, Scorecard) else student.get("details", {}))
    t_det = (teacher.details if isinstance(teacher, Scorecard) else teacher.get("details", {}))
    by_task: dict[str, dict] = {}
    by_tag: dict[str, dict] = {}
    for task in sorted(set(s_det) & set(t_det)):
        s_items, t_items = s_det[task].get("items"), t_det[task].get("items")
        if not s_items or not t_items:
            continue
        t_by_id = {it["doc_id"]: it for it in t_items}
        s_ids = [it["doc_id"] for it in s_items]
        if set(s_ids) != set(t_by_id):
            extra = sorted(set(s_ids) ^ set(t_by_id))[:3]
            raise InputError(f"task {task!r}: student and teacher scored different items (e.g. {extra}); "
                             "run both on the same suite, data and --limit")
        row = by_task[task] = _row()
        for s in s_items:
            t = t_by_id[s["doc_id"]]
            rows = [row] + [by_tag.setdefault(tag, _row()) for tag in dict.fromkeys(t.get("tags") or [task])]
            for r in rows:
                _count(r, s, t, max_items)
    total = _row()
    for r in by_task.values():
        for k in ("n", "teacher_correct", "student_correct", "lost", "gained"):
            total[k] += r[k]
    return {"by_task": by_task, "by_tag": by_tag, "n": total["n"], "lost": total["lost"], "gained": total["gained"]}


def _row() -> dict:
    return {"n": 0, "teacher_correct": 0, "student_correct": 0, "lost": 0, "gained": 0, "lost_items": [],
            "gained_items": []}


def _count(r: dict, s: dict, t: dict, max_items: int | None) -> None:
    r["n"] += 1
    r["teacher_correct"] += bool(t["correct"])
    r["student_correct"] += bool(s["correct"])
    for key, hit in (("lost", t["correct"] and not s["correct"]), ("gained", s["correct"] and not t["correct"])):
        if hit:
            r[key] += 1
            if max_items is None or len(r[f"{key}_items"]) < max_items:
                r[f"{key}_items"].append(s["doc_id"])


def regressed_capabilities(diff: dict, *, min_lost: int = 1) -> list[dict]:
    """Capability tags ordered by net loss (lost - gained), those with ``lost >= min_lost`` only:
    ``[{tag, lost, gained, n, teacher_acc, student_acc, lost_items}]`` (for attribution and reports)."""
    out = []
    for tag, r in diff["by_tag"].items():
        if r["lost"] >= min_lost:
            out.append({"tag": tag, "lost": r["lost"], "gained": r["gained"], "n": r["n"],
                        "teacher_acc": r["teacher_correct"] / r["n"], "student_acc": r["student_correct"] / r["n"],
                        "lost_items": r["lost_items"]})
    return sorted(out, key=lambda x: (-(x["lost"] - x["gained"]), -x["lost"], x["tag"]))


def student_vs_teacher(student, tokenizer, teacher_card: Scorecard, suite, *, data_dir=None, limit: int | None = None,
                       batch_size: int = 8, max_items: int | None = 50) -> tuple[Scorecard, dict]:
    """Run ``suite`` on ``student`` and diff it item by item against ``teacher_card`` (the teacher's baseline on
    the same suite, data and ``limit``, computed once: SPEC S1.3). Returns ``(student_card, item_diff)``; the
    loop's attribution reads :func:`regressed_capabilities` of the diff."""
    from .suite import prepare_suite, run_suite

    prepared = prepare_suite(suite, data_dir, limit)
    card = run_suite(student, tokenizer, prepared, data_dir=data_dir, limit=limit, batch_size=batch_size)
    return card, item_diff(card, teacher_card, max_items=max_items)
