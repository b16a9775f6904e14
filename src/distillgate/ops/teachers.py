"""G-O3 teacher-version compatibility: a registry of teacher versions and the student's compatibility with each.

**Registry** (:func:`register_teacher`, :func:`load_registry`): a JSON file, ``<run>/teachers.json`` for a run,
else ``$DISTILLGATE_HOME/teachers.json`` (``distillgate ops teachers add PATH --date YYYY-MM-DD``). One entry per
version: ``version`` (a name, default the date), ``date`` (release day, ISO), ``path`` (a local model folder),
``fingerprint`` (:func:`~distillgate.models.load.fingerprint_folder`: the weights' and configs' sha256),
``tokenizer_fingerprint``, ``reference`` (the version the student was distilled from; at most one).

**Compatibility** (:func:`check_compatibility`), for every version released in the last ``window_days`` (365)
before ``now``, three checks against the student; a version is compatible when all three pass:

1. *tokenizer*: the same vocabulary (token -> id) and the same special tokens. Otherwise the differences are
   listed (tokens only on one side, tokens whose id moved, special tokens) with the coverage of a by-string
   mapping (share of the student's tokens the teacher has); the probe below needs one vocabulary, so a
   differing tokenizer is incompatible (agreement through a mapping is not built);
2. *chat template*: each probe conversation (system + user, multi-turn, user only) rendered with the
   generation prompt by both tokenizers gives the same token ids (both without a template: the same); the
   first differing position of each differing prompt is listed;
3. *agreement* on the probe prompts (rendered through the chat template): teacher-forced next-token
   predictions at every position; ``top1`` = share of positions where the student's argmax is the teacher's,
   ``kl`` = mean KL(teacher || student) in nats. Compatible when ``top1 >= ref_top1 - max_top1_drop`` and
   ``kl <= ref_kl + max_kl_increase`` against the reference version's values (no reference: the absolute
   ``min_top1`` / ``max_kl``, when set, else the oldest version in the window serves as the reference).

A registered version whose folder no longer has its fingerprint is incompatible ("changed since registered").
The G-O3 metric ``teacher_version_compat_share`` = compatible / versions in the window.

Teacher targets and profiles are keyed by teacher version already: the target cache key holds the teacher's
fingerprint and its tokenizer's (:func:`distillgate.targets.targets_key`), a profile records the fingerprint
it was built from (``distillgate gates --teacher PROFILE`` refuses a changed folder), so a new teacher version
never reads an older version's targets. In serving, a teacher upgrade is a swap of the control arm
(:func:`upgrade_teacher`: ``/admin/swap`` to the new version's backend; requests in flight finish on the old).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError, InputError
from ..io import read_json_report
from ..evaluate.providers import GateContext, register_metric_provider

FORMAT_VERSION = 1
REGISTRY_NAME = "teachers.json"
PROBE_PROMPTS = (
    "Summarise the quarterly report in two sentences.",
    "My order arrived damaged. What are my options?",
    "Explain what a fixed-rate loan is to a new customer.",
    "List three things to check before a flight to Lisbon.",
    "When does the contract terminate if nobody gives notice?",
    "Write a short reply thanking a student for the chapter summary.",
    "What does the function return when called with a list of integers?",
    "How long does the laptop battery last, and how much memory does it have?",
)
CONVERSATIONS = (
    [{"role": "system", "content": "You are a helpful support assistant."},
     {"role": "user", "content": "Where is my refund?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Check my invoice from March."}],
    [{"role": "user", "content": "Translate 'good morning' into French."}],
)
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class CompatOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    window_days: float = Field(365.0, gt=0, description="versions released this many days before `now` count")
    max_top1_drop: float = Field(0.05, ge=0, le=1, description="largest drop of probe top-1 agreement below the "
                                                              "reference version's")
    max_kl_increase: float = Field(0.05, ge=0, description="largest rise of the probe KL (nats) above the "
                                                           "reference version's")
    min_top1: float | None = Field(None, ge=0, le=1, description="absolute top-1 floor (used without a reference)")
    max_kl: float | None = Field(None, gt=0, description="absolute KL ceiling, nats (used without a reference)")
    prompts: list[str] = Field(default_factory=lambda: list(PROBE_PROMPTS), min_length=1,
                               description="probe prompts (held out from training)")


# ------------------------------------------------------------------------------------------------ registry

def registry_path(run_dir=None) -> Path:
    from ..io import distillgate_home

    return Path(run_dir) / REGISTRY_NAME if run_dir else distillgate_home() / REGISTRY_NAME


def load_registry(path) -> list[dict]:
    """The entries of the registry at ``path`` (an absent file: none), checked."""
    p = Path(path)
    if not p.exists():
        return []
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise InputError(f"teacher registry {p}: not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION or \
            not isinstance(data.get("versions"), list):
        raise InputError(f"teacher registry {p}: needs {{format_version: {FORMAT_VERSION}, versions: [...]}}")
    for i, e in enumerate(data["versions"]):
        for k in ("version", "date", "path", "fingerprint"):
            if not isinstance(e, dict) or not isinstance(e.get(k), str) or not e[k]:
                raise InputError(f"teacher registry {p}: versions[{i}].{k} must be a non-empty string")
        _parse_date(e["date"], f"teacher registry {p}: versions[{i}].date")
    return data["versions"]


def _parse_date(s: str, where: str) -> dt.date:
    if not isinstance(s, str) or not _DATE.match(s):
        raise ConfigError(where, s, "an ISO date YYYY-MM-DD")
    try:
        return dt.date.fromisoformat(s)
    except ValueError:
        raise ConfigError(where, s, "a real calendar date YYYY-MM-DD") from None


def register_teacher(registry, path, date: str, version: str | None = None, reference: bool = False) -> dict:
    """Add the model folder ``path`` released on ``date`` to the registry file (written atomically); returns
    the entry. A version name or fingerprint already registered is refused."""
    from transformers import AutoTokenizer

    from ..io import atomic_write_json
    from ..models.load import fingerprint_folder, fingerprint_tokenizer

    _parse_date(date, "--date")
    folder = Path(path).resolve()
    if not (folder / "config.json").is_file():
        raise InputError(f"{path}: not a model folder (no config.json)")
    version = version or date
    entries = load_registry(registry)
    fp = fingerprint_folder(folder)
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    tfp = fingerprint_tokenizer(tok)
    for e in entries:
        if e["version"] == version:
            raise ConfigError("--version", version, f"a version name not yet in {registry}")
        if e["fingerprint"] == fp and e.get("tokenizer_fingerprint") == tfp:
            raise ConfigError("path", str(folder), f"a model not yet registered (it is version {e['version']!r})")
    entry = {"version": version, "date": date, "path": str(folder), "fingerprint": fp,
             "tokenizer_fingerprint": tfp, "reference": bool(reference), "added": time.time()}
    if reference:
        for e in entries:
            e["reference"] = False
    Path(registry).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(registry, {"format_version": FORMAT_VERSION, "versions": entries + [entry]})
    return entry


# ------------------------------------------------------------------------------------------------ checks

def tokenizer_check(student_tok, teacher_tok) -> dict:
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    ss = {k: str(v) for k, v in student_tok.special_tokens_map.items()}
    ts = {k: str(v) for k, v in teacher_tok.special_tokens_map.items()}
    only_s, only_t = sorted(set(sv) - set(tv)), sorted(set(tv) - set(sv))
    moved = sorted(k for k in set(sv) & set(tv) if sv[k] != tv[k])
    special = {k: [ss.get(k), ts.get(k)] for k in sorted(set(ss) | set(ts)) if ss.get(k) != ts.get(k)}
    same = not (only_s or only_t or moved or special)
    out = {"same": same, "student_vocab": len(sv), "teacher_vocab": len(tv),
           "mapping_coverage": (len(sv) - len(only_s)) / max(len(sv), 1)}
    if not same:
        out.update(only_student=only_s[:20], n_only_student=len(only_s), only_teacher=only_t[:20],
                   n_only_teacher=len(only_t), moved_ids=moved[:20], n_moved=len(moved), special=special)
    return out


def template_check(student_tok, teacher_tok) -> dict:
    s_has, t_has = bool(getattr(student_tok, "chat_template", None)), bool(getattr(teacher_tok, "chat_template", None))
    if not s_has and not t_has:
        return {"same": True, "note": "neither tokenizer has a chat template"}
    if s_has != t_has:
        return {"same": False, "differences": [f"only the {'student' if s_has else 'teacher'} has a chat template"]}
    diffs = []
    for i, conv in enumerate(CONVERSATIONS):
        a = list(_ids(student_tok, conv))
        b = list(_ids(teacher_tok, conv))
        if a != b:
            at = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            diffs.append(f"conversation {i}: token ids differ from position {at} ({len(a)} vs {len(b)} tokens)")
    return {"same": not diffs, "differences": diffs, "n_conversations": len(CONVERSATIONS)}


def _ids(tok, messages) -> list[int]:
    if getattr(tok, "chat_template", None):
        r = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        return list(r["input_ids"] if isinstance(r, dict) or hasattr(r, "keys") else r)
    return tok(" ".join(m["content"] for m in messages))["input_ids"]


def agreement(student_model, teacher_model, tok, prompts) -> dict:
    """Teacher-forced next-token agreement of the two models on ``prompts`` (rendered through ``tok``'s chat
    template): top-1 agreement and mean KL(teacher || student) over every position."""
    import torch

    agree, kl, n = 0, 0.0, 0
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([_ids(tok, [{"role": "user", "content": p}])])
            lt = torch.log_softmax(teacher_model(input_ids=ids).logits[0].double(), -1)
            ls = torch.log_softmax(student_model(input_ids=ids).logits[0].double(), -1)
            if lt.shape[-1] != ls.shape[-1]:
                raise InputError(f"agreement: teacher vocabulary {lt.shape[-1]} != student {ls.shape[-1]}")
            agree += int((lt.argmax(-1) == ls.argmax(-1)).sum())
            kl += float((lt.exp() * (lt - ls)).sum())
            n += ids.shape[1]
    return {"top1": agree / n, "kl": kl / n, "n_positions": n, "n_prompts": len(prompts)}


def check_compatibility(student, entries: list[dict], options: CompatOptions | None = None,
                        now: float | None = None, load=None) -> dict:
    """The G-O3 report for a loaded ``student`` (``.model``, ``.tokenizer``) against the registry ``entries``
    (see the module docstring). ``load(path) -> LoadedModel`` loads a teacher version (default: load_model)."""
    from ..models import load_model
    from ..models.load import fingerprint_folder

    o = options or CompatOptions()
    load = load or load_model
    now = time.time() if now is None else float(now)
    today = dt.datetime.fromtimestamp(now, dt.timezone.utc).date()
    in_window, older = [], []
    for e in entries:
        age = (today - dt.date.fromisoformat(e["date"])).days
        (in_window if 0 <= age <= o.window_days else older).append(e)
    if not in_window:
        raise InputError(f"G-O3: no teacher version released in the {o.window_days:g} days before {today} "
                         f"(registered: {[e['version'] + ' ' + e['date'] for e in entries] or 'none'})")
    results = []
    for e in sorted(in_window, key=lambda e: e["date"]):
        r = {"version": e["version"], "date": e["date"], "fingerprint": e["fingerprint"],
             "reference": bool(e.get("reference")), "reasons": []}
        if not Path(e["path"]).is_dir() or fingerprint_folder(e["path"]) != e["fingerprint"]:
            r.update(compatible=False, reasons=[f"{e['path']}: missing or changed since registered (fingerprint)"])
            results.append(r)
            continue
        t = load(e["path"])
        r["tokenizer"] = tokenizer_check(student.tokenizer, t.tokenizer)
        r["chat_template"] = template_check(student.tokenizer, t.tokenizer)
        if not r["tokenizer"]["same"]:
            tk = r["tokenizer"]
            r["reasons"].append(f"tokenizer differs: {tk['n_only_student']} student tokens missing, "
                                f"{tk['n_only_teacher']} new, {tk['n_moved']} ids moved, special {tk['special']}; "
                                f"a by-string mapping covers {tk['mapping_coverage']:.1%} of the student's vocabulary "
                                f"(agreement through a mapping is not built)")
        else:
            r["agreement"] = agreement(student.model, t.model, student.tokenizer, o.prompts)
        if not r["chat_template"]["same"]:
            r["reasons"].append("chat template differs: " + "; ".join(r["chat_template"]["differences"]))
        results.append(r)
        del t
    refs = [r for r in results if r["reference"] and "agreement" in r]
    ref = refs[0] if refs else (None if (o.min_top1 is not None or o.max_kl is not None) else
                                next((r for r in results if "agreement" in r), None))
    for r in results:
        a = r.get("agreement")
        if a is not None:
            lo = ref["agreement"]["top1"] - o.max_top1_drop if ref else o.min_top1
            hi = ref["agreement"]["kl"] + o.max_kl_increase if ref else o.max_kl
            r["thresholds"] = {"min_top1": lo, "max_kl": hi, "against": ref["version"] if ref else "absolute"}
            if lo is not None and a["top1"] < lo:
                r["reasons"].append(f"probe top-1 agreement {a['top1']:.3f} < {lo:.3f}")
            if hi is not None and a["kl"] > hi:
                r["reasons"].append(f"probe KL {a['kl']:.4f} > {hi:.4f} nats")
        r["compatible"] = not r["reasons"]
    n_ok = sum(r["compatible"] for r in results)
    return {"teacher_version_compat_share": n_ok / len(results), "n_versions": len(results), "n_compatible": n_ok,
            "versions": results, "outside_window": [{"version": e["version"], "date": e["date"]} for e in older],
            "reference": ref["version"] if ref else None, "as_of": str(today), "options": o.model_dump(),
            "provenance": f"teacher registry: {len(results)} version(s) of the last {o.window_days:g} days, "
                          f"{len(o.prompts)} probe prompts"}


def format_report(rep: dict) -> str:
    out = []
    for r in rep["versions"]:
        a = r.get("agreement")
        ag = f"top-1 {a['top1']:.3f}, KL {a['kl']:.4f}" if a else "no probe"
        out.append(f"  {r['version']} ({r['date']}){' [reference]' if r['reference'] else ''}: "
                   f"{'compatible' if r['compatible'] else 'INCOMPATIBLE'}; {ag}"
                   + ("" if r["compatible"] else "; " + " | ".join(r["reasons"])))
    out.append(f"  share compatible: {rep['n_compatible']}/{rep['n_versions']} = "
               f"{rep['teacher_version_compat_share']:.3f} (as of {rep['as_of']})")
    return "\n".join(out)


def read_report(path) -> dict:
    p = Path(path)
    rep = read_json_report(p, "--teacher-compat-report", "`distillgate ops teachers check --out FILE`")
    v = rep.get("teacher_version_compat_share") if isinstance(rep, dict) else None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not 0 <= v <= 1 \
            or not isinstance(rep.get("provenance"), str) or not isinstance(rep.get("versions"), list):
        raise InputError(f"--teacher-compat-report {p}: needs teacher_version_compat_share in [0, 1], "
                         f"provenance and versions")
    return rep


# ------------------------------------------------------------------------------------------------ serving

def upgrade_teacher(gateway_url: str, backend_url: str, entry: dict, token: str | None = None,
                    arm: str = "control") -> dict:
    """Swap the gateway's ``arm`` (the production teacher) to the registry ``entry`` served at
    ``backend_url``: ``/admin/swap`` warms it up first, requests in flight finish on the old backend."""
    from ..serve.client import GatewayClient

    with GatewayClient(gateway_url, token=token) as c:
        return c.swap(arm, url=backend_url, model=entry["path"], version=f"teacher@{entry['version']}")


# ------------------------------------------------------------------------------------------------ G-O3 gate

def _compat_share(ctx: GateContext) -> float | None:
    rep = ctx.options.get("teacher_compat")
    if rep is None and ctx.options.get("teacher_registry"):
        rep = check_compatibility(ctx.student(), load_registry(ctx.options["teacher_registry"]))
    if not rep:
        ctx.details["teacher_version_compat_share"] = {
            "note": "requires a teacher registry: --teacher-registry FILE or --teacher-compat-report FILE "
                    "(`distillgate ops teachers check`)"}
        return None
    if isinstance(rep, (str, Path)):
        rep = read_report(rep)
    ctx.details["teacher_version_compat_share"] = {
        "provenance": rep["provenance"], "n_versions": rep["n_versions"], "n_compatible": rep["n_compatible"],
        "incompatible": {r["version"]: r["reasons"] for r in rep["versions"] if not r["compatible"]}}
    return float(rep["teacher_version_compat_share"])


register_metric_provider("teacher_version_compat_share", _compat_share, higher_is_better=True, regression=False,
                         description="G-O3: share of teacher versions of the last twelve months the student is "
                                     "compatible with (tokenizer, chat template, probe agreement)",
                         tier="high", module=__name__)
