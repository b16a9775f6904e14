"""Derive a smaller student from a teacher: drop whole decoder blocks and shrink the MLP width.

The student keeps the teacher's embeddings, final norm and LM head (tied stays tied) and its tokenizer,
so it starts as a sub-network of the teacher and is a plain HF model of the same class on disk.

Layer selection (``layer_selection``):
* ``greedy_fast`` (default): the greedy removal below, at a fraction of its cost. Three changes, each measured
  (bench/derive_quality.py --compare): (1) a trial is scored by the NLL over a restricted vocabulary (the
  targets plus the teacher's top-32 tokens at each position, ~3.8k of SmolLM2's 49k) instead of the full LM
  head, which on SmolLM2 costs as much as ~8 decoder blocks per evaluation and dominated greedy's trials;
  (2) lazy greedy: every block keeps the removal cost of its last trial (before its first trial: the
  first-order estimate -dL/dg of a gate g on its residual update, one forward + backward), trials run in
  order of that stale cost, and a step stops when the best fresh cost is below the next stale one, after
  2..6 trials (up to 8 in the first step); (3) a winning trial's recorded hidden states become the new cached
  inputs (no tail re-run). On SmolLM2 the gate gradients alone rank blocks poorly (a trained model sits
  near a stationary point of each gate: block 0, whose removal multiplies calibration PPL by ~3,700, has a
  gradient near 0), so they only order the first trials; the measured trials decide. The pick is judged by exact
  calibration PPL and compared with the block-influence pick, as greedy's is.
* ``block_influence``: BI_l = 1 - mean_t cos(h_in, h_out) of block l on calibration text (ShortGPT); keep the
  blocks with the largest BI. One forward.
* ``greedy_ppl``: remove, one block at a time, the block whose removal raises calibration perplexity least.
  Each trial re-runs only the blocks after the candidate, from the cached hidden input of the candidate
  (removing block l does not change what blocks < l see). After the first step only the
  ``greedy_candidates`` blocks that were cheapest to remove in the previous step are re-tried: removing an
  early SmolLM2 block costs ~10^3x in perplexity, so re-trying them each step is wasted suffix compute.
  Greedy is a heuristic; it finishes by comparing its pick with the block-influence pick and keeps the
  better, so the default is never worse than block influence on the calibration text.
* ``uniform``: keep blocks floor(i * L / n), i = 0..n-1 (every other block for 30 -> 15).

MLP width (``mlp_selection``), same width in every kept block (HF configs hold one ``intermediate_size``):
* ``activation``: score_j = mean_t |act(gate_j x) * up_j x| * ||down[:, j]||, measured in the layer-pruned
  model on the calibration tokens (the inputs the student will actually see);
* ``magnitude``: score_j = ||gate_j|| * ||up_j|| * ||down[:, j]||.
Kept units stay in teacher order, so keeping everything reproduces the teacher's logits exactly.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field

import torch

from ..errors import ConfigError, InputError
from .info import param_counts

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LAYER_SELECTIONS = ("greedy_fast", "greedy_ppl", "block_influence", "uniform")
MLP_SELECTIONS = ("activation", "magnitude")
log = logging.getLogger(__name__)
_LOGIT_CHUNK_BYTES = 256 << 20  # cap on one chunk of [rows, T, V] float32 logits


@dataclass
class DerivationReport:
    """What ``derive_student`` did, JSON-able (``to_dict``). Layer indices are in teacher numbering."""

    selection: str
    selection_used: str
    mlp_selection: str | None
    teacher_layers: int
    kept_layers: list[int]
    dropped_layers: list[int]
    layer_scores: dict[str, list[float]]
    greedy_trace: list[dict]
    selection_ppl: dict[str, float]
    teacher_mlp_width: int
    mlp_width: int
    mlp_units_kept: list[list[int]]
    params_teacher: dict[str, int]
    params_student: dict[str, int]
    calib_tokens: int
    teacher_ppl: float | None
    student_ppl: float | None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def layer_map(report: DerivationReport | dict) -> dict[int, int]:
    """student layer index -> teacher layer index (store it in the student's ``distillgate.json``)."""
    kept = report["kept_layers"] if isinstance(report, dict) else report.kept_layers
    return {i: int(t) for i, t in enumerate(kept)}


# ----------------------------------------------------------------------------------------------- checks
def check_supported(model) -> torch.nn.ModuleList:
    """Return the decoder blocks of a supported Llama-style model; InputError naming the model_type otherwise."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"student derivation supports model_type in {list(SUPPORTED_MODEL_TYPES)}; "
                         f"got model_type={mt!r} ({type(model).__name__})")
    layers = getattr(getattr(model, "model", None), "layers", None)
    mlp_names = ("gate_proj", "up_proj", "down_proj")
    ok = isinstance(layers, torch.nn.ModuleList) and len(layers) > 0 and all(
        hasattr(b, "self_attn") and all(hasattr(getattr(b, "mlp", None), n) for n in mlp_names) for b in layers)
    if not ok:
        raise InputError(f"{type(model).__name__} (model_type={mt!r}): expected model.layers[*] with self_attn and "
                         "mlp.gate_proj/up_proj/down_proj (Llama-style blocks)")
    return layers


def check_same_vocab(teacher_tok, student_tok, where: str) -> None:
    """InputError unless both tokenizers have the same token -> id map (cross-vocabulary KD is not supported yet)."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if len(tv) != len(sv):
        raise InputError(f"{where}: teacher tokenizer has {len(tv)} tokens, student tokenizer has {len(sv)}; "
                         "the student must share the teacher's vocabulary (cross-vocabulary distillation is not "
                         "supported yet)")
    if tv != sv:
        diff = sorted(set(tv.items()) ^ set(sv.items()), key=lambda kv: kv[1])[0]
        raise InputError(f"{where}: teacher and student tokenizers both have {len(tv)} tokens but map them "
                         f"differently (first difference: {diff[0]!r} -> id {diff[1]}); the student must share "
                         "the teacher's vocabulary (cross-vocabulary distillation is not supported yet)")


def check_not_larger(teacher, student) -> None:
    """ConfigError when the student has as many parameters as the teacher or more."""
    nt, ns = param_counts(teacher)["total"], param_counts(student)["total"]
    if ns >= nt:
        raise ConfigError("student", f"{ns:,} parameters", f"fewer than the teacher's {nt:,} parameters")


def student_from_config(teacher, overrides: dict, seed: int | None = 0):
    """A randomly initialised model of the teacher's class from its config with ``overrides`` applied."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(teacher.config)
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ConfigError(f"overrides.{k}", v, f"a field of the teacher's {cfg.model_type} config")
        setattr(cfg, k, v)
    lt = getattr(cfg, "layer_types", None)
    if lt is not None and "layer_types" not in overrides and len(lt) != cfg.num_hidden_layers:
        if cfg.num_hidden_layers > len(lt):
            raise ConfigError("overrides.layer_types", None,
                              f"a list of {cfg.num_hidden_layers} layer types (the teacher has {len(lt)})")
        cfg.layer_types = list(lt[: cfg.num_hidden_layers])
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=teacher.dtype)
    model.generation_config = copy.deepcopy(teacher.generation_config)
    return model.to(teacher.device).eval()


def _check_calib(calib_ids, vocab_size: int) -> torch.Tensor:
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.dtype != torch.long:
        raise InputError(f"calib_ids: expected a [B, T] long tensor, got "
                         f"{getattr(calib_ids, 'shape', type(calib_ids))} {getattr(calib_ids, 'dtype', '')}")
    if calib_ids.shape[1] < 2 or calib_ids.numel() == 0:
        raise InputError(f"calib_ids: need T >= 2 tokens per row, got shape {tuple(calib_ids.shape)}")
    if int(calib_ids.min()) < 0 or int(calib_ids.max()) >= vocab_size:
        raise InputError(f"calib_ids: token ids must lie in [0, {vocab_size}), got [{int(calib_ids.min())}, "
                         f"{int(calib_ids.max())}]")
    return calib_ids


def calib_ids_from_text(tokenizer, text: str, n_tokens: int = 2048, seq_len: int = 512) -> torch.Tensor:
    """The first ``n_tokens`` tokens of ``text`` as ``[n_tokens // seq_len, seq_len]`` rows (no padding)."""
    if n_tokens < seq_len or seq_len < 2:
        raise ConfigError("calib_tokens", n_tokens, f">= seq_len ({seq_len}) and seq_len >= 2")
    ids: list[int] = []
    for n_chars in (n_tokens * 8, len(text)):  # ~4 chars/token on English: tokenise a prefix, not the whole file
        ids = tokenizer(text[:n_chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            break
    rows = min(len(ids), n_tokens) // seq_len
    if rows == 0:
        raise InputError(f"calibration text holds {len(ids)} tokens; need at least seq_len={seq_len}")
    return torch.tensor(ids[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


# ------------------------------------------------------------------------------------ calibration forward
@contextlib.contextmanager
def _only_layers(model, idx: list[int]):
    """Temporarily make the model's decoder run only blocks ``idx`` (in that order)."""
    base, cfg = model.model, model.config
    saved = (base.layers, cfg.num_hidden_layers, getattr(cfg, "layer_types", None))
    base.layers = torch.nn.ModuleList([saved[0][i] for i in idx])
    cfg.num_hidden_layers = len(idx)
    if saved[2] is not None:
        cfg.layer_types = [saved[2][i] for i in idx]
    try:
        yield
    finally:
        base.layers, cfg.num_hidden_layers = saved[0], saved[1]
        if saved[2] is not None:
            cfg.layer_types = saved[2]


@torch.inference_mode()
def _run_suffix(model, idx: list[int], h: torch.Tensor, record: bool = False):
    """Run blocks ``idx`` from hidden ``h`` [B,T,H] (the input of block idx[0]).

    Returns (final-normed hidden [B,T,H], inputs of each block in idx, pre-norm output of the last block).
    """
    inputs: list[torch.Tensor] = []
    out: list[torch.Tensor] = []
    handles = []
    if record:
        layers = model.model.layers
        for i in idx:
            handles.append(layers[i].register_forward_pre_hook(
                lambda m, a, kw: inputs.append(a[0] if a else kw["hidden_states"]), with_kwargs=True))
        if idx:
            handles.append(layers[idx[-1]].register_forward_hook(
                lambda m, a, o: out.append(o[0] if isinstance(o, tuple) else o)))
    try:
        with _only_layers(model, idx):
            final = model.model(inputs_embeds=h, use_cache=False).last_hidden_state
    finally:
        for hd in handles:
            hd.remove()
    return final, inputs, (out[0] if out else h)


@torch.inference_mode()
def _nll(model, final_hidden: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token NLL (nats) from final-normed hidden [B,T,H] and ids [B,T]; logits chunked by rows."""
    head = model.get_output_embeddings()
    B, T, _ = final_hidden.shape
    rows = max(1, _LOGIT_CHUNK_BYTES // (T * head.weight.shape[0] * 4))
    total = 0.0
    for s in range(0, B, rows):
        logits = head(final_hidden[s:s + rows, :-1]).float()
        total += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[s:s + rows, 1:].reshape(-1), reduction="sum"))
    return total / (B * (T - 1))


def calibration_ppl(model, calib_ids: torch.Tensor) -> float:
    """Perplexity of ``model`` on ``calib_ids`` [B,T] (every next-token prediction, no padding)."""
    with torch.inference_mode():
        ids = calib_ids.to(model.device)
        final = model.model(input_ids=ids, use_cache=False).last_hidden_state
        return math.exp(_nll(model, final, ids))


def _embed(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.get_input_embeddings()(ids.to(model.device))


# ---------------------------------------------------------------------------------------- layer selection
def block_influence(model, calib_ids: torch.Tensor) -> tuple[list[float], float]:
    """BI per block [L] (1 - mean cosine of block input and output over all B*T tokens) and the model's NLL."""
    bi, nll, _ = _block_influence_recorded(model, calib_ids)
    return bi, nll


def _block_influence_recorded(model, calib_ids: torch.Tensor):
    """(BI per block, NLL, (final-normed hidden, input of every block)) from one recorded forward."""
    L = len(model.model.layers)
    final, inputs, last = _run_suffix(model, list(range(L)), _embed(model, calib_ids), record=True)
    outs = inputs[1:] + [last]
    bi = [1.0 - float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean())
          for a, b in zip(inputs, outs)]
    return bi, _nll(model, final, calib_ids.to(model.device)), (final, inputs)


def block_influence_layers(bi: list[float], keep: int) -> list[int]:
    """The ``keep`` blocks with the largest BI (ties: lower index), in teacher order."""
    return sorted(sorted(range(len(bi)), key=lambda i: (-bi[i], i))[:keep])


def subset_ppl(model, kept: list[int], calib_ids: torch.Tensor) -> float:
    """Calibration PPL of ``model`` running only blocks ``kept`` (full MLP width), without building a student."""
    ids = calib_ids.to(model.device)
    return math.exp(_nll(model, _run_suffix(model, kept, _embed(model, ids))[0], ids))


def uniform_layers(n_layers: int, keep: int) -> list[int]:
    """Blocks floor(i * L / n) for i < n: every k-th block when n divides L."""
    return sorted({(i * n_layers) // keep for i in range(keep)})


def greedy_ppl_layers(model, calib_ids: torch.Tensor, keep: int, candidates: int | None = 8):
    """Greedy block removal by calibration NLL. Returns (kept, first-step removal PPL per block [L], trace).

    ``candidates``: after the first step (which tries every block) re-try only this many blocks, those with
    the lowest NLL in their last trial; None tries all every step (exact greedy, O(L^2) suffix blocks/step).
    """
    ids = calib_ids.to(model.device)
    S = list(range(len(model.model.layers)))
    _, inputs, _ = _run_suffix(model, S, _embed(model, ids), record=True)
    last_nll: dict[int, float] = {}
    first: list[float] = []
    trace = []
    while len(S) > keep:
        t0 = time.perf_counter()
        if candidates is None or not last_nll:
            tries = list(S)
        else:
            tries = sorted(S, key=lambda i: (last_nll[i], i))[:candidates]
        best = None
        for pos, blk in enumerate(S):
            if blk not in tries:
                continue
            final, _, _ = _run_suffix(model, S[pos + 1:], inputs[pos])
            last_nll[blk] = _nll(model, final, ids)
            if best is None or last_nll[blk] < best[1]:
                best = (blk, last_nll[blk], pos)
        if not first:
            first = [math.exp(last_nll[i]) for i in S]
        blk, nll, pos = best
        S.pop(pos)
        del last_nll[blk]
        # Blocks before `pos` see unchanged inputs; re-record the rest from the removed block's input.
        _, tail, _ = _run_suffix(model, S[pos:], inputs[pos], record=True)
        inputs = inputs[:pos] + tail
        trace.append({"removed": blk, "ppl": math.exp(nll), "trials": len(tries),
                      "seconds": round(time.perf_counter() - t0, 3)})
        log.info("greedy_ppl: removed block %d -> %d blocks, PPL %.3f (%d trials, %.1f s)", blk, len(S),
                 math.exp(nll), len(tries), trace[-1]["seconds"])
    return S, first, trace


class _ProxyHead:
    """NLL over a restricted vocabulary: the targets plus the full model's top-``top_k`` tokens at each position.

    proxy NLL = mean_t (logsumexp_{v in V'} z_tv - z_t,target). V' holds the tokens that carry the full model's
    probability mass, so a trial that perturbs the model moderately is ranked as the full-vocabulary NLL would
    rank it, at |V'| / V of the LM head's cost. With ``top_k >= V`` the proxy is the exact NLL.
    """

    def __init__(self, model, final_hidden: torch.Tensor, ids: torch.Tensor, top_k: int):
        head = model.get_output_embeddings()
        V = head.weight.shape[0]
        tgt = ids[:, 1:].reshape(-1)
        if top_k >= V:
            vocab = torch.arange(V, device=ids.device)
        else:
            B, T, _ = final_hidden.shape
            rows = max(1, _LOGIT_CHUNK_BYTES // (T * V * 4))
            tops = []
            with torch.inference_mode():
                for s in range(0, B, rows):
                    tops.append(head(final_hidden[s:s + rows, :-1]).float().topk(top_k, dim=-1).indices.reshape(-1))
            vocab = torch.unique(torch.cat(tops + [tgt]))  # sorted
        self.vocab = vocab
        self.weight = head.weight.detach().index_select(0, vocab)
        b = getattr(head, "bias", None)
        self.bias = None if b is None else b.detach().index_select(0, vocab)
        self.target = torch.searchsorted(vocab, tgt)
        self.n = tgt.numel()

    def nll(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """Mean proxy NLL (a 0-dim tensor; differentiable when ``final_hidden`` is)."""
        z = torch.nn.functional.linear(final_hidden[:, :-1], self.weight, self.bias)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        z = z.reshape(-1, z.shape[-1])
        return (torch.logsumexp(z, dim=-1) - z.gather(1, self.target[:, None])[:, 0]).sum() / self.n


def gate_gradients(model, h: torch.Tensor, proxy: _ProxyHead) -> list[float]:
    """dL/dg_l at g = 1 for a gate on every block's residual update, h_out = h_in + g_l * (f_l(h_in) - h_in).

    L is ``proxy``'s NLL; one forward and one backward (to the gates only). -dL/dg_l is the first-order
    estimate of the NLL increase when block l is removed (g_l: 1 -> 0); when L is convex in g_l it is a
    lower bound of the true increase, which is what the lazy greedy below assumes of its stale scores.
    """
    layers = model.model.layers
    gates = torch.ones(len(layers), dtype=h.dtype, device=h.device, requires_grad=True)

    def hook(l):
        def f(m, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            o = out[0] if isinstance(out, tuple) else out
            o = x + gates[l] * (o - x)
            return (o, *out[1:]) if isinstance(out, tuple) else o
        return f

    handles = [b.register_forward_hook(hook(l), with_kwargs=True) for l, b in enumerate(layers)]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            final = model.model(inputs_embeds=h.clone(), use_cache=False).last_hidden_state
            (g,) = torch.autograd.grad(proxy.nll(final), gates)
    finally:
        for hd in handles:
            hd.remove()
    return [float(x) for x in g]


def greedy_fast_layers(model, calib_ids: torch.Tensor, keep: int, candidates: int = 6, first_trials: int = 8,
                       min_trials: int = 2, proxy_top_k: int = 32, recorded=None):
    """Greedy block removal, seeded by gate gradients, with lazy re-evaluation and a restricted-vocabulary NLL.

    Returns (kept, first-order removal estimate per block [L] (nats), trace, |V'|). Each step removes the
    block whose removal raises the proxy NLL least, like ``greedy_ppl_layers``, but runs few trials: every
    block carries a *stale* removal cost (initially -dL/dg from ``gate_gradients``, later the cost measured in
    its last trial); trials run in order of stale cost, and a step stops once the best fresh cost is no larger
    than the next stale one (lazy greedy: exact when removal costs only grow as blocks are removed), after at
    least ``min_trials`` and at most ``first_trials`` (first step) / ``candidates`` (later steps) trials.
    Trials are scored by ``_ProxyHead`` (targets + the teacher's top-``proxy_top_k`` tokens per position) and
    record their blocks' inputs, so the winner's are reused instead of re-running the tail. ``recorded``:
    (final hidden, inputs of every block) of the full model, when the caller already has them. The caller
    judges the final pick by exact calibration PPL.
    """
    ids = calib_ids.to(model.device)
    S = list(range(len(model.model.layers)))
    h = _embed(model, ids)
    final, inputs = recorded if recorded is not None else _run_suffix(model, S, h, record=True)[:2]
    proxy = _ProxyHead(model, final, ids, proxy_top_k)
    est = [-g for g in gate_gradients(model, h, proxy)]
    stale = dict(enumerate(est))
    with torch.inference_mode():
        base = float(proxy.nll(final))
    trace = []
    while len(S) > keep:
        t0 = time.perf_counter()
        limit = first_trials if not trace else candidates
        fresh: dict[int, float] = {}
        best = None  # (removal cost, block, inputs of the blocks after it without it)
        while len(fresh) < limit:
            pending = sorted((b for b in S if b not in fresh), key=lambda b: (stale[b], b))
            if not pending or (len(fresh) >= min_trials and best[0] <= stale[pending[0]]):
                break
            blk = pending[0]
            pos = S.index(blk)
            with torch.inference_mode():
                # recorded: when this trial wins, its inputs are the new inputs of the blocks after it
                out, tail, _ = _run_suffix(model, S[pos + 1:], inputs[pos], record=True)
                fresh[blk] = stale[blk] = float(proxy.nll(out)) - base
            if best is None or (fresh[blk], blk) < best[:2]:
                best = (fresh[blk], blk, tail)
        cost, blk, tail = best
        pos = S.index(blk)
        base += cost
        S.pop(pos)
        inputs = inputs[:pos] + tail
        trace.append({"removed": blk, "proxy_nll": base, "trials": len(fresh),
                      "seconds": round(time.perf_counter() - t0, 3)})
        log.info("greedy_fast: removed block %d -> %d blocks, proxy NLL %.4f (%d trials, %.1f s)", blk, len(S),
                 base, len(fresh), trace[-1]["seconds"])
    return S, est, trace, int(proxy.vocab.numel())


# ------------------------------------------------------------------------------------------ MLP selection
@torch.no_grad()
def mlp_unit_scores(model, kept: list[int], method: str, calib_ids: torch.Tensor | None) -> list[torch.Tensor]:
    """Importance [I] of each MLP unit of each kept block (float64), measured with only ``kept`` blocks active."""
    layers = model.model.layers
    down_norms = [layers[i].mlp.down_proj.weight.double().norm(dim=0) for i in kept]
    if method == "magnitude":
        return [layers[i].mlp.gate_proj.weight.double().norm(dim=1) * layers[i].mlp.up_proj.weight.double().norm(dim=1)
                * dn for i, dn in zip(kept, down_norms)]
    sums = [torch.zeros_like(dn) for dn in down_norms]

    def hook(k):
        def f(m, a, kw):  # a[0]: act(gate x) * up x, [B,T,I]
            x = a[0] if a else kw["input"]
            sums[k].add_(x.detach().abs().double().sum(dim=(0, 1)))
        return f

    handles = [layers[i].mlp.down_proj.register_forward_pre_hook(hook(k), with_kwargs=True)
               for k, i in enumerate(kept)]
    try:
        _run_suffix(model, kept, _embed(model, calib_ids))
    finally:
        for hd in handles:
            hd.remove()
    n_tok = calib_ids.numel()
    return [s / n_tok * dn for s, dn in zip(sums, down_norms)]


def _top_units(score: torch.Tensor, width: int) -> list[int]:
    order = torch.argsort(score, descending=True, stable=True)[:width]
    return sorted(order.tolist())


# ------------------------------------------------------------------------------------------------- build
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _build_student(teacher, kept: list[int], units: list[list[int]] | None, width: int):
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(kept)
    cfg.intermediate_size = width
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    student = AutoModelForCausalLM.from_config(cfg, dtype=teacher.dtype)
    if type(student) is not type(teacher):
        raise InputError(f"rebuilding {type(teacher).__name__} from its config gave {type(student).__name__}")
    new_of = {t: s for s, t in enumerate(kept)}
    sd = {}
    for k, v in teacher.state_dict().items():
        m = _LAYER_KEY.match(k)
        if not m:
            sd[k] = v
            continue
        t, rest = int(m.group(1)), m.group(2)
        if t not in new_of:
            continue
        if units is not None:
            u = torch.tensor(units[new_of[t]], dtype=torch.long, device=v.device)
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.bias"):
                v = v.index_select(0, u)
            elif rest == "mlp.down_proj.weight":
                v = v.index_select(1, u)
        sd[f"model.layers.{new_of[t]}.{rest}"] = v
    load_sliced(student, sd, teacher, "derived student")
    return student.to(teacher.device).eval()


def load_sliced(new, sd: dict, source, what: str) -> None:
    """Load the sliced state dict ``sd`` into ``new`` (strict but for a tied LM head), tie, and copy the
    generation config of ``source``; InputError naming ``what`` when the weights do not fit its config."""
    missing, unexpected = new.load_state_dict(sd, strict=False)
    tied = getattr(new.config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise InputError(f"{what} weights do not match its config (missing={missing[:5]}, "
                         f"unexpected={unexpected[:5]})")
    if tied:
        new.tie_weights()
    new.generation_config = copy.deepcopy(source.generation_config)


def derive_student(teacher, tokenizer, calib_ids: torch.Tensor | None, *, num_layers: int | None,
                   mlp_width: int | None, layer_selection: str = "greedy_fast", keep_layers: list[int] | None = None,
                   mlp_selection: str = "activation", greedy_candidates: int | None = 8):
    """Derive a student sub-network of ``teacher``. Returns (student model, DerivationReport).

    calib_ids: [B, T] long token ids of calibration text (rows packed, no padding); needed unless
    layer_selection is 'uniform' (or keep_layers is given) and mlp_selection is 'magnitude'/width unchanged.
    num_layers: blocks to keep (None: all); keep_layers: explicit teacher block indices (overrides selection);
    mlp_width: MLP units to keep per block (None: all). ``tokenizer`` is checked against the embedding size.
    greedy_candidates: greedy_ppl's re-tries per step after the first; greedy_fast caps its trials per step
    at min(this, 6) (8 in the first step); None: no cap (greedy_ppl then tries every block every step).
    """
    t_start = time.perf_counter()
    layers = check_supported(teacher)
    L, I = len(layers), teacher.config.intermediate_size
    if layer_selection not in LAYER_SELECTIONS:
        raise ConfigError("layer_selection", layer_selection, f"one of {list(LAYER_SELECTIONS)}")
    if mlp_selection not in MLP_SELECTIONS:
        raise ConfigError("mlp_selection", mlp_selection, f"one of {list(MLP_SELECTIONS)}")
    if keep_layers is not None:
        if not keep_layers or len(set(keep_layers)) != len(keep_layers) or not all(0 <= i < L for i in keep_layers):
            raise ConfigError("keep_layers", keep_layers, f"distinct block indices in [0, {L})")
        if num_layers is not None and num_layers != len(keep_layers):
            raise ConfigError("num_layers", num_layers, f"None or len(keep_layers)={len(keep_layers)}")
        num_layers = len(keep_layers)
    n = L if num_layers is None else num_layers
    if not isinstance(n, int) or not 1 <= n <= L:
        raise ConfigError("num_layers", num_layers, f"an integer in [1, {L}] (the teacher has {L} blocks)")
    W = I if mlp_width is None else mlp_width
    if not isinstance(W, int) or not 1 <= W <= I:
        raise ConfigError("mlp_width", mlp_width, f"an integer in [1, {I}] (the teacher's intermediate_size)")
    if greedy_candidates is not None and greedy_candidates < 1:
        raise ConfigError("greedy_candidates", greedy_candidates, "None (try all) or an integer >= 1")
    vocab = teacher.get_input_embeddings().weight.shape[0]
    if tokenizer is not None and len(tokenizer) > vocab:
        raise InputError(f"tokenizer has {len(tokenizer)} tokens but the teacher's embedding has {vocab} rows")
    needs_calib = (keep_layers is None and n < L and layer_selection != "uniform") or (
        W < I and mlp_selection == "activation")
    if calib_ids is None and needs_calib:
        raise InputError("calib_ids: calibration tokens are required for layer_selection="
                         f"{layer_selection!r} / mlp_selection={mlp_selection!r}")
    if calib_ids is not None:
        calib_ids = _check_calib(calib_ids, vocab).to(teacher.device)

    secs: dict[str, float] = {}
    scores: dict[str, list[float]] = {}
    trace: list[dict] = []
    sel_ppl: dict[str, float] = {}
    teacher_ppl, recorded = None, None
    used = layer_selection if keep_layers is None else "keep_layers"
    t0 = time.perf_counter()
    if calib_ids is not None:
        bi, nll, recorded = _block_influence_recorded(teacher, calib_ids)
        scores["block_influence"], teacher_ppl = bi, math.exp(nll)
    if keep_layers is not None:
        kept = sorted(keep_layers)
    elif n == L:
        kept = list(range(L))
    elif layer_selection == "uniform":
        kept = uniform_layers(L, n)
    else:
        bi_kept = block_influence_layers(scores["block_influence"], n)
        kept = bi_kept
        if layer_selection == "greedy_fast":
            kept, est, trace, _ = greedy_fast_layers(
                teacher, calib_ids, n, L if greedy_candidates is None else min(greedy_candidates, 6),
                first_trials=L if greedy_candidates is None else 8, recorded=recorded)
            scores["removal_estimate"] = est
            sel_ppl["greedy_fast"] = subset_ppl(teacher, kept, calib_ids)
            sel_ppl["block_influence"] = subset_ppl(teacher, bi_kept, calib_ids)
            if sel_ppl["block_influence"] < sel_ppl["greedy_fast"]:
                kept, used = bi_kept, "block_influence"
        if layer_selection == "greedy_ppl":
            kept, first, trace = greedy_ppl_layers(teacher, calib_ids, n, greedy_candidates)
            scores["removal_ppl"] = first
            sel_ppl["greedy_ppl"] = trace[-1]["ppl"]
            sel_ppl["block_influence"] = subset_ppl(teacher, bi_kept, calib_ids)
            if sel_ppl["block_influence"] < sel_ppl["greedy_ppl"]:
                kept, used = bi_kept, "block_influence"
    recorded = None  # the teacher's recorded hidden states: free them before the MLP selection
    secs["layer_selection"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    units = None
    if W < I:
        unit_scores = mlp_unit_scores(teacher, kept, mlp_selection, calib_ids)
        units = [_top_units(s, W) for s in unit_scores]
    secs["mlp_selection"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    student = _build_student(teacher, kept, units, W)
    secs["build"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    student_ppl = calibration_ppl(student, calib_ids) if calib_ids is not None else None
    secs["student_ppl"] = time.perf_counter() - t0
    secs["total"] = time.perf_counter() - t_start
    report = DerivationReport(
        selection=layer_selection, selection_used=used, mlp_selection=mlp_selection if W < I else None,
        teacher_layers=L, kept_layers=kept, dropped_layers=[i for i in range(L) if i not in kept],
        layer_scores=scores, greedy_trace=trace, selection_ppl=sel_ppl, teacher_mlp_width=I, mlp_width=W,
        mlp_units_kept=units if units is not None else [list(range(I))] * len(kept),
        params_teacher=param_counts(teacher), params_student=param_counts(student),
        calib_tokens=0 if calib_ids is None else int(calib_ids.numel()), teacher_ppl=teacher_ppl,
        student_ppl=student_ppl, seconds={k: round(v, 3) for k, v in secs.items()})
    return student, report
