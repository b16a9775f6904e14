"""G-O3 teacher-version compatibility on tiny models: a registry of versions (the reference teacher, a slightly
perturbed copy, an unrelated model, one with a different tokenizer, one older than twelve months) -> the share
of compatible versions with the reason for each incompatible one; the gate reads it with its provenance; the
target cache key follows the teacher version; a teacher upgrade in the gateway under load drops no request."""

import datetime as dt
import json
import threading
import time

import pytest
import torch

from distillgate.errors import ConfigError, InputError
from distillgate.models import load_model, save_model
from distillgate.ops import teachers as T
from distillgate.testing import save_tiny_model

pytestmark = pytest.mark.timeout(300)


def perturbed(src, dst, scale, seed, tokenizer=None):
    m = load_model(str(src))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std() * scale)
    return save_model(m.model, tokenizer or m.tokenizer, dst)


def day(days_ago: int) -> str:
    return str(dt.date.today() - dt.timedelta(days=days_ago))


@pytest.fixture(scope="module")
def versions(tmp_path_factory, tiny_teacher_dir, tiny_tokenizer):
    d = tmp_path_factory.mktemp("teacher-versions")
    from distillgate.testing import make_tiny_tokenizer

    other_tok = make_tiny_tokenizer()
    other_tok.add_tokens(["<|tool|>", "invoice"])  # a newer tokenizer: two tokens more
    return {
        "student": perturbed(tiny_teacher_dir, d / "student", 0.02, 1),  # distilled: close to its teacher
        "v1": tiny_teacher_dir,
        "v2": perturbed(tiny_teacher_dir, d / "v2", 0.01, 2),
        "v3": save_tiny_model(d / "v3", num_layers=4, hidden=32, intermediate=64, seed=7, tokenizer=tiny_tokenizer),
        "v4": perturbed(tiny_teacher_dir, d / "v4", 0.0, 3, tokenizer=other_tok),
        "old": perturbed(tiny_teacher_dir, d / "old", 0.5, 4),
    }


def test_registry_and_compatibility_share(versions, tmp_path):
    reg = tmp_path / "teachers.json"
    T.register_teacher(reg, versions["v1"], day(200), "v1", reference=True)
    T.register_teacher(reg, versions["v2"], day(100), "v2")
    T.register_teacher(reg, versions["v3"], day(50), "v3")
    T.register_teacher(reg, versions["v4"], day(10), "v4")
    T.register_teacher(reg, versions["old"], day(400), "old")
    with pytest.raises(ConfigError, match="not yet registered"):
        T.register_teacher(reg, versions["v2"], day(5), "again")
    with pytest.raises(ConfigError, match="--date"):
        T.register_teacher(reg, versions["v2"], "2026-13-01", "bad")
    entries = T.load_registry(reg)
    assert [e["version"] for e in entries] == ["v1", "v2", "v3", "v4", "old"] and entries[0]["reference"]

    rep = T.check_compatibility(load_model(str(versions["student"])), entries)
    by = {r["version"]: r for r in rep["versions"]}
    assert set(by) == {"v1", "v2", "v3", "v4"} and rep["outside_window"] == [{"version": "old", "date": day(400)}]
    assert rep["reference"] == "v1" and by["v1"]["compatible"] and by["v2"]["compatible"]
    assert by["v1"]["agreement"]["top1"] > 0.8 and by["v1"]["tokenizer"]["same"] and by["v1"]["chat_template"]["same"]
    # an unrelated model: its distributions are far from the student's (the tiny models' scaled tied embeddings
    # make every random model's argmax lean on the input token, so top-1 alone would not tell)
    assert not by["v3"]["compatible"] and by["v3"]["reasons"][0].startswith("probe KL")
    assert by["v3"]["agreement"]["kl"] > by["v1"]["agreement"]["kl"] + 0.05 >= by["v2"]["agreement"]["kl"]
    assert not by["v4"]["compatible"] and "agreement" not in by["v4"]
    tk = by["v4"]["tokenizer"]
    assert tk["n_only_teacher"] == 2 and tk["n_only_student"] == 0 and tk["mapping_coverage"] == 1.0
    assert "tokenizer differs" in by["v4"]["reasons"][0]
    assert rep["teacher_version_compat_share"] == 0.5 and rep["n_versions"] == 4

    from distillgate.evaluate.providers import GateContext, load_providers, measure

    load_providers()
    out = tmp_path / "compat.json"
    out.write_text(json.dumps(rep))
    ctx = GateContext(options={"teacher_compat": T.read_report(out)})
    vals, notes = measure(ctx, ["teacher_version_compat_share"])
    assert vals["teacher_version_compat_share"] == 0.5
    d = ctx.details["teacher_version_compat_share"]
    assert d["provenance"].startswith("teacher registry: 4 version(s)") and set(d["incompatible"]) == {"v3", "v4"}


def test_template_difference_is_listed_and_bad_registry_refused(versions, tmp_path, tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = tok.chat_template.replace("<|im_start|>assistant\n", "<|im_start|>assistant\n\n")
    r = T.template_check(tiny_tokenizer, tok)
    assert not r["same"] and len(r["differences"]) == 3 and "position" in r["differences"][0]
    (tmp_path / "r.json").write_text(json.dumps({"format_version": 1, "versions": [{"version": "a"}]}))
    with pytest.raises(InputError, match=r"versions\[0\].date"):
        T.load_registry(tmp_path / "r.json")
    with pytest.raises(InputError, match="no teacher version released"):
        T.check_compatibility(load_model(str(versions["student"])), [
            {"version": "x", "date": day(500), "path": str(versions["v1"]), "fingerprint": "f"}])


def test_target_cache_key_follows_the_teacher_version(versions):
    from types import SimpleNamespace

    from distillgate.targets import targets_key

    ex = [SimpleNamespace(id="a", input_ids=[5, 6, 7], loss_mask=[0, 1, 1])]
    k1, k2 = (targets_key(load_model(str(versions[v])), ex, k=8) for v in ("v1", "v2"))
    assert k1.teacher != k2.teacher and k1.digest != k2.digest and k1.tokenizer == k2.tokenizer


def test_teacher_upgrade_in_the_gateway_under_load_drops_no_request(versions, tmp_path):
    """The control arm (the production teacher) swapped to a newer registered version while four clients
    send requests: every request answered, the newer version serves after the swap."""
    from distillgate.serve.assign import Assigner
    from distillgate.serve.backends import Backend
    from distillgate.serve.client import GatewayClient
    from distillgate.serve.gateway import GatewayState, build_app
    from distillgate.serve.server import ThreadedServer
    from distillgate.testing.serve import transformers_serve

    reg = tmp_path / "teachers.json"
    v1 = T.register_teacher(reg, versions["v1"], day(200), "v1", reference=True)
    v2 = T.register_teacher(reg, versions["v2"], day(100), "v2")
    with transformers_serve(tmp_path / "serve-log") as url:
        state = GatewayState(arms={"control": Backend(url, v1["path"], "teacher@v1"),
                                   "candidate": Backend(url, str(versions["student"]), "v1")},
                             assigner=Assigner("exp", {"control": 1.0, "candidate": 0.0}), stop_replaced=False)
        with ThreadedServer(build_app(state)) as gw:
            results, stop = [], threading.Event()

            def hammer(i):
                with GatewayClient(gw.url) as c:
                    while not stop.is_set():
                        results.append(c.chat("hi", user_id=f"u{i}", max_tokens=2, stream=i % 2 == 0))

            threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            time.sleep(0.5)
            swapped = T.upgrade_teacher(gw.url, url, v2)
            time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join(30)
    assert swapped == {"arm": "control", "version": "teacher@v2", "replaced": "teacher@v1"}
    assert len(results) > 8 and all(r.ok for r in results), [r.error for r in results if not r.ok]
    vs = [r.version for r in results]
    assert "teacher@v1" in vs and vs[-1] == "teacher@v2"


def test_teachers_cli_add_list_check(versions, tmp_path, capsys):
    from distillgate.cli import main

    reg = str(tmp_path / "teachers.json")
    assert main(["ops", "teachers", "--registry", reg, "add", str(versions["v1"]), "--date", day(30),
                 "--reference"]) == 0
    assert main(["ops", "teachers", "--registry", reg, "add", str(versions["v2"]), "--date", day(3),
                 "--version", "v2"]) == 0
    assert main(["ops", "teachers", "--registry", reg, "add", str(versions["v2"]), "--date", "03/01/2026"]) == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err
    assert main(["ops", "teachers", "--registry", reg, "list"]) == 0
    assert "(reference)" in capsys.readouterr().out
    out = tmp_path / "compat.json"
    assert main(["ops", "teachers", "--registry", reg, "check", "--student", str(versions["student"]),
                 "--out", str(out)]) == 0
    assert "share compatible: 2/2" in capsys.readouterr().out
    assert T.read_report(out)["teacher_version_compat_share"] == 1.0
