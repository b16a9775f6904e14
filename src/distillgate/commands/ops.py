"""`distillgate ops ...`: operations drills and checks that feed the G-O / G-P4 gates.

- ``ops rollback-drill RUN [--out FILE]``: G-O5, roll the served arm back to each of the last three stable
  versions under load (real backends from the store's weights);
- ``ops soak --student DIR --seconds N [--out FILE]``: G-P4 through the gateway (the backend's RSS under load);
- ``ops teachers add PATH --date D [--version V] [--reference]`` / ``list`` / ``check --student DIR``: G-O3.

Each writes the JSON report that ``distillgate gates --rollback-report / --soak-report / --teacher-compat-report``
reads (the gate table shows the value with the report's provenance).
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("ops", help="operations drills and checks: rollback drill (G-O5), gateway soak (G-P4), "
                                   "teacher versions (G-O3)")
    ops = p.add_subparsers(dest="ops_command", required=True)

    d = ops.add_parser("rollback-drill", help="G-O5: roll the served arm back to each of the last three stable "
                                              "versions of RUN under load")
    d.add_argument("run", help="run id")
    d.add_argument("--root", default="runs", help="folder holding the runs (default: ./runs)")
    d.add_argument("--versions", type=int, default=3, help="stable versions to roll back to (G-O5: 3)")
    d.add_argument("--window-s", type=float, default=10.0, help="seconds of traffic compared before / after each "
                                                                "rollback")
    d.add_argument("--users", type=int, default=None, help="locust users (default: loop.serving.load_users)")
    d.add_argument("--backend", default=None, help="transformers | vllm (default: loop.serving.backend)")
    d.add_argument("--out", default=None, metavar="FILE", help="write the report JSON here (also written to the "
                                                               "drill's folder under <run>/serve/)")
    d.set_defaults(func=run_drill)

    s = ops.add_parser("soak", help="G-P4: soak the student through the gateway, sampling its backend's RSS")
    s.add_argument("--student", required=True, help="student model folder")
    s.add_argument("--seconds", type=float, required=True, help="soak length (the SPEC: 48 h; >= 900 s for the gate)")
    s.add_argument("--users", type=int, default=4, help="locust users")
    s.add_argument("--max-tokens", type=int, default=8, help="tokens generated per request")
    s.add_argument("--backend", default="transformers", help="transformers | vllm")
    s.add_argument("--out", default=None, metavar="FILE", help="write the report JSON here")
    s.set_defaults(func=run_soak)

    t = ops.add_parser("teachers", help="G-O3: the teacher-version registry and the student's compatibility")
    t.add_argument("--registry", default=None, metavar="FILE", help="registry JSON (default: <run>/teachers.json "
                   "with --run, else $DISTILLGATE_HOME/teachers.json)")
    t.add_argument("--run", default=None, help="keep the registry in this run's folder")
    t.add_argument("--root", default="runs", help="folder holding the runs (with --run)")
    tt = t.add_subparsers(dest="teachers_command", required=True)
    a = tt.add_parser("add", help="register a teacher version (a local model folder)")
    a.add_argument("path")
    a.add_argument("--date", required=True, help="release date YYYY-MM-DD")
    a.add_argument("--version", default=None, help="version name (default: the date)")
    a.add_argument("--reference", action="store_true", help="the version the student was distilled from")
    tt.add_parser("list", help="list the registered versions")
    c = tt.add_parser("check", help="the student's compatibility with every version of the last twelve months")
    c.add_argument("--student", required=True, help="student model folder")
    c.add_argument("--window-days", type=float, default=365.0)
    c.add_argument("--max-top1-drop", type=float, default=0.05)
    c.add_argument("--max-kl-increase", type=float, default=0.05)
    c.add_argument("--out", default=None, metavar="FILE", help="write the report JSON here")
    t.set_defaults(func=run_teachers)


def _write(path, rep) -> None:
    if path:
        from ..io import atomic_write_json

        atomic_write_json(path, rep)
        print(f"report: {path}")


def _check_out(out) -> None:
    from pathlib import Path

    from ..errors import ConfigError

    if out and not Path(out).resolve().parent.is_dir():
        raise ConfigError("--out", out, "a path in an existing folder")


def run_drill(args) -> int:
    from ..errors import ConfigError
    from ..io import atomic_write_json
    from ..ops.recovery import drill_run, format_report
    from ..serve.spec import ServingSpec
    from ..store import RunStore

    _check_out(args.out)
    if args.versions < 1:
        raise ConfigError("--versions", args.versions, ">= 1")
    if not args.window_s > 0:
        raise ConfigError("--window-s", args.window_s, "> 0")
    with RunStore.open(args.root, args.run) as st:
        serving = dict((st.config.get("loop") or {}).get("serving") or {})
    if args.users is not None:
        serving["load_users"] = args.users
    if args.backend is not None:
        serving["backend"] = args.backend
    spec = ServingSpec(**serving)
    rep = drill_run(args.root, args.run, spec=spec, n_versions=args.versions, window_s=args.window_s, say=print)
    print(format_report(rep))
    from pathlib import Path

    atomic_write_json(Path(rep["work_dir"]) / "rollback-drill.json", rep)
    _write(args.out, rep)
    return 0 if rep["failed_requests"] == 0 and rep["complete"] else 1


def run_soak(args) -> int:
    from pathlib import Path

    from ..errors import ConfigError
    from ..models.load import resolve_model_path
    from ..ops.soak import soak_student
    from ..serve.spec import ServingSpec

    _check_out(args.out)
    if not args.seconds > 0:
        raise ConfigError("--seconds", args.seconds, "> 0")
    folder = Path(resolve_model_path(args.student))
    if not (folder / "config.json").is_file():
        raise ConfigError("--student", args.student, "a model folder (with config.json)")
    spec = ServingSpec(enabled=True, backend=args.backend, load_users=args.users, load_max_tokens=args.max_tokens)

    class S:
        path = str(folder)

    print(f"soaking {folder} through the gateway for {args.seconds:g} s ({args.users} locust users) ...")
    rep = soak_student(S, args.seconds, spec)
    print(f"  {rep['n_requests']} requests ({rep['requests_per_s']:.1f}/s), failed {rep['failed_requests']}; RSS "
          f"{rep['rss_start'] / 2**20:.1f} -> {rep['rss_end'] / 2**20:.1f} MiB over {rep['duration_s']:.0f} s; leak "
          f"{rep['pct_per_hour']:.4f} %/h, upper 95% {rep['pct_per_hour_upper95']:.4f} %/h (resolution "
          f"{rep['resolution_pct_per_hour']:.4f})")
    _write(args.out, rep)
    return 0


def run_teachers(args) -> int:
    from ..errors import ConfigError
    from ..ops import teachers as T

    if args.registry:
        reg = args.registry
    elif args.run:
        from ..store import RunStore

        with RunStore.open(args.root, args.run) as st:
            reg = T.registry_path(st.dir)
    else:
        reg = T.registry_path()
    if args.teachers_command == "add":
        e = T.register_teacher(reg, args.path, args.date, args.version, args.reference)
        print(f"registered teacher {e['version']} ({e['date']}, {e['fingerprint'][:12]}) in {reg}")
        return 0
    entries = T.load_registry(reg)
    if args.teachers_command == "list":
        for e in entries:
            print(f"{e['version']}\t{e['date']}\t{e['fingerprint'][:12]}\t{e['path']}"
                  + ("\t(reference)" if e.get("reference") else ""))
        if not entries:
            print(f"no teacher versions registered in {reg}")
        return 0
    _check_out(args.out)
    from ..models import load_model

    opts = T.CompatOptions(window_days=args.window_days, max_top1_drop=args.max_top1_drop,
                           max_kl_increase=args.max_kl_increase)
    if not entries:
        raise ConfigError("--registry", str(reg), "a registry with teacher versions (`distillgate ops teachers add`)")
    rep = T.check_compatibility(load_model(args.student), entries, opts)
    print(T.format_report(rep))
    _write(args.out, rep)
    return 0 if rep["teacher_version_compat_share"] == 1.0 else 1
