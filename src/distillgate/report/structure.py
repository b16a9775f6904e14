"""The student's structure per iteration (SPEC S3.3): what each iteration kept of the initial student, layer by
layer, and its FLOPs per token per component, read from each committed version's ``student/config.json``, its
layer map and ``metrics.json``. Shown by ``distillgate runs show`` and in the HTML report."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)
COMPONENTS = ("attention_projections", "attention_scores", "mlp", "lm_head")


@dataclass
class StructureSnapshot:
    iteration: int
    stage: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    hidden: int
    teacher_layers: list[int] = field(default_factory=list)  # the teacher block each student block came from
    params: float | None = None
    flops_ratio: float | None = None        # student / teacher FLOPs per token
    flops: dict = field(default_factory=dict)  # component -> FLOPs/token (analytic)
    ttft_ratio: float | None = None
    peak_memory_ratio: float | None = None
    cut: dict = field(default_factory=dict)  # a prune cut's method, source, kinds, fold-in, score distribution


def _student_config(version) -> tuple[dict, dict]:
    cfg = json.loads(version.path_of("student/config.json").read_text())
    meta = {}
    if "student/distillgate.json" in version.files:
        meta = json.loads(version.path_of("student/distillgate.json").read_text())
    return cfg, meta


def snapshots(store, by_iter: dict[int, dict]) -> list[StructureSnapshot]:
    """One snapshot per committed iteration (oldest first); versions without a student are skipped."""
    out = []
    for k in sorted(by_iter):
        v = store.get_version(by_iter[k]["version_id"])
        if "student/config.json" not in v.files:
            continue
        try:
            cfg, meta = _student_config(v)
        except (OSError, ValueError) as e:
            log.warning("structure of iteration %s left out: %s", k, e)
            continue
        nh = cfg.get("num_attention_heads")
        lm = (meta.get("meta") or meta).get("layer_map") or {}
        n = cfg.get("num_hidden_layers") or 0
        tl = [int(lm.get(str(i), lm.get(i, i))) if lm else i for i in range(n)]
        m = v.load_json("metrics.json").get("student", {}) if "metrics.json" in v.files else {}
        flops = {c: m[f"flops/{c}"] for c in COMPONENTS if isinstance(m.get(f"flops/{c}"), (int, float))}
        cut = {}
        if "prune.json" in v.files:
            p = v.load_json("prune.json")
            cut = {"method": p.get("method"), "source": p.get("source"), "kinds": p.get("kinds"),
                   "before": p.get("before"), "after": p.get("after"), "fold_in": p.get("fold_in"),
                   "scores": {k: {"n": x["n"], "quantiles": x["quantiles"]}
                              for k, x in (p.get("score_summary") or {}).items()},
                   "flops_saved_pct": (p.get("flops") or {}).get("flops_saved_pct"),
                   "counted_deviation_pct": (p.get("flops") or {}).get("counted", {}).get("analytic_vs_counted_pct")}
        out.append(StructureSnapshot(
            iteration=k, stage=str(v.meta.get("stage", "")), layers=n, heads=nh,
            kv_heads=cfg.get("num_key_value_heads", nh), head_dim=cfg.get("head_dim") or cfg["hidden_size"] // nh,
            mlp=cfg.get("intermediate_size"), hidden=cfg.get("hidden_size"), teacher_layers=tl,
            params=m.get("params_ratio"), flops_ratio=m.get("flops_ratio"), flops=flops,
            ttft_ratio=m.get("ttft_ratio"), peak_memory_ratio=m.get("peak_memory_ratio"), cut=cut))
    return out


def changed(snaps: list[StructureSnapshot]) -> bool:
    """Whether the structure changed during the run (the section is worth showing)."""
    keys = {(s.layers, s.heads, s.kv_heads, s.head_dim, s.mlp, s.hidden) for s in snaps}
    return len(keys) > 1


def kept_grid(snaps: list[StructureSnapshot]) -> tuple[list[int], list[list[float | None]], list[list[str]]]:
    """(teacher layer indices, z[iteration][layer] = share of the initial student's parameters in that block
    kept, hover text): 0 for a dropped block, None where the initial student had no block."""
    if not snaps:
        return [], [], []
    s0 = snaps[0]
    cols = sorted(set(s0.teacher_layers))

    def block_params(s: StructureSnapshot) -> float:
        h, d = s.hidden, s.head_dim
        return h * d * (2 * s.heads + 2 * s.kv_heads) + 3 * h * s.mlp

    base = block_params(s0)
    z, text = [], []
    for s in snaps:
        present = set(s.teacher_layers)
        share = block_params(s) / base if base else None
        z.append([(round(share, 4) if c in present else 0.0) for c in cols])
        text.append([(f"heads {s.heads}/{s0.heads} (KV {s.kv_heads}), MLP {s.mlp}/{s0.mlp}, hidden "
                      f"{s.hidden}/{s0.hidden}, head_dim {s.head_dim}" if c in present else "block removed")
                     for c in cols])
    return cols, z, text


def structure_chart(snaps: list[StructureSnapshot]):
    """Heat map: iterations (rows) x the teacher blocks the student came from (columns), colour = share of the
    initial student's block parameters kept; hover names the heads / MLP units / hidden kept."""
    import plotly.graph_objects as go

    from .charts import _style

    cols, z, text = kept_grid(snaps)
    if not cols:
        return None
    rows = [f"it {s.iteration} ({s.stage})" for s in snaps]
    fig = go.Figure(go.Heatmap(
        z=z, x=[str(c) for c in cols], y=rows, text=text, zmin=0.0, zmax=1.0, colorscale="Blues",
        colorbar={"title": {"text": "kept"}, "thickness": 12},
        hovertemplate="teacher block %{x}, %{y}: %{z:.0%} of the block kept<br>%{text}<extra></extra>"))
    fig.update_xaxes(title_text="teacher block (through the layer map)", type="category")
    fig.update_yaxes(autorange="reversed")
    return _style(fig, "Structure per iteration: share of each block kept", 120 + 26 * len(rows))


def _si(x: float | None) -> str:
    if x is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def flops_rows(snaps: list[StructureSnapshot]) -> list[list[str]]:
    """Table rows: iteration, stage, layers, heads (KV), head_dim, MLP, hidden, FLOPs/token total and per
    component, FLOPs saved vs the teacher, params ratio, TTFT ratio, memory ratio."""
    def f(x, fmt="{:.3g}"):
        return "-" if x is None else fmt.format(x)

    out = []
    for s in snaps:
        total = sum(s.flops.values()) if s.flops else None
        comps = [_si(s.flops.get(c)) for c in COMPONENTS]
        saved = None if s.flops_ratio is None else 100.0 * (1 - s.flops_ratio)
        out.append([str(s.iteration), s.stage, str(s.layers), f"{s.heads} ({s.kv_heads})", str(s.head_dim),
                    str(s.mlp), str(s.hidden), _si(total), *comps, f(saved, "{:.1f}%"), f(s.params),
                    f(s.ttft_ratio), f(s.peak_memory_ratio)])
    return out


FLOPS_HEADER = ["iter", "stage", "layers", "heads (KV)", "head_dim", "MLP", "hidden", "FLOPs/tok", "attn proj",
                "scores", "MLP FLOPs", "head", "saved vs teacher", "params ratio", "TTFT ratio", "memory ratio"]


def cut_rows(snaps: list[StructureSnapshot]) -> list[list[str]]:
    """One row per kind of each prune cut: iteration, method (source), kind, before -> after, the importance
    score distribution (min, 10%, 25%, median, 75%, 90%, max), the fold-in verdict, FLOPs saved by the cut."""
    out = []
    for s in snaps:
        c = s.cut
        if not c:
            continue
        fold = c.get("fold_in") or {}
        verdict = ("kept" if fold.get("kept") else "not kept") + (
            f" (KL {fold['kl_without']:.4g} -> {fold['kl_with']:.4g})" if "kl_with" in fold else "")
        for kind, sc in (c.get("scores") or {}).items():
            k = "rotary" if kind == "v_dims" else kind
            ba = f"{(c.get('before') or {}).get(k, '-')} -> {(c.get('after') or {}).get(k, '-')}"
            q = " / ".join(f"{x:.3g}" for x in sc["quantiles"])
            out.append([str(s.iteration), f"{c.get('method')} ({c.get('source')})", kind, ba, q, verdict,
                        "-" if c.get("flops_saved_pct") is None else f"{c['flops_saved_pct']:.1f}%"])
    return out


CUT_HEADER = ["iteration", "importance (on)", "kind", "count", "scores min / 10% / 25% / 50% / 75% / 90% / max",
              "fold-in", "FLOPs saved by the cut"]
