"""`distillgate serve RUN [--version V]`: start the backends a run's A/B needs and the gateway in front of
them (loopback), until Ctrl-C. The candidate arm serves version V (default: `current`); the control arm
serves the production model (`--control`: the `production` alias if set, else the run's teacher)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a run's version behind the A/B gateway (OpenAI-compatible, loopback)")
    p.add_argument("run", help="run id")
    p.add_argument("--version", default="current", help="candidate: a version id or alias (default: current)")
    p.add_argument("--control", default=None, help="control arm: a version id or alias, or 'teacher' "
                                                   "(default: the 'production' alias if set, else teacher)")
    p.add_argument("--root", default="runs", help="folder holding the runs (default: ./runs)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless --allow-remote + --token)")
    p.add_argument("--port", type=int, default=8000, help="gateway port (default: 8000)")
    p.add_argument("--backend", default=None, help="transformers | vllm | an http(s):// URL serving the candidate "
                                                   "(default: loop.serving.backend of the run)")
    p.add_argument("--control-url", default=None, help="an http(s):// URL serving the control arm instead")
    p.add_argument("--candidate-weight", type=float, default=None, help="share of users on the candidate")
    p.add_argument("--shadow", action="store_true", help="shadow-call the control model for candidate requests")
    p.add_argument("--token", default=None, help="bearer token the gateway requires (needed off loopback)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host (needs --token)")
    p.set_defaults(func=run)


def _upstream_model(url: str) -> str:
    import httpx

    try:
        data = httpx.get(url.rstrip("/") + "/v1/models", timeout=10).raise_for_status().json()["data"]
        return data[0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        from ..errors import InputError

        raise InputError(f"{url}: not an OpenAI-compatible server with a model ({type(e).__name__}: {e})") from None


def run(args) -> int:
    import asyncio
    from pathlib import Path

    from ..errors import ConfigError, DistillgateError, InputError
    from ..models.load import resolve_model_path
    from ..serve import backends
    from ..serve.assign import Assigner
    from ..serve.gateway import GatewayState, build_app
    from ..ops.detectors import Detector
    from ..serve.log import RequestLog, log_path
    from ..serve.server import check_host, serve_forever
    from ..serve.spec import ServingSpec
    from ..store import RunStore

    check_host(args.host, args.allow_remote, args.token)
    store = RunStore.open(args.root, args.run, writer=False)
    cfg = store.config
    spec = ServingSpec(**((cfg.get("loop") or {}).get("serving") or {}))
    if args.candidate_weight is not None:
        if not 0 <= args.candidate_weight <= 1:
            raise ConfigError("--candidate-weight", args.candidate_weight, "a share in [0, 1]")
        spec.candidate_weight = args.candidate_weight
    kind = args.backend or spec.backend
    serve_dir = store.dir / "serve"

    def folder_of(ref: str) -> tuple[str, str]:
        """(version label, model folder) of a version ref or 'teacher'."""
        if ref == "teacher":
            path = resolve_model_path(str((cfg.get("teacher") or {}).get("path", "default")))
            if not (Path(path) / "config.json").is_file():
                raise InputError(f"teacher {path}: not a local model folder; pass --control VERSION or --control-url")
            return "teacher", path
        v = store.resolve(int(ref) if ref.isdigit() else ref)
        return f"v{v.version_id}", str(v.checkout("student", serve_dir / "versions" / f"v{v.version_id}"))

    def label(ref: str) -> str:
        """``v<id>`` of a version ref served from a URL (the log's model_version), else the ref itself."""
        try:
            return f"v{store.resolve(int(ref) if ref.isdigit() else ref).version_id}"
        except DistillgateError:
            return ref

    def launch(ref: str) -> backends.Backend:
        version, folder = folder_of(ref)
        return backends.start(kind, folder, version, serve_dir / "logs", device=spec.device,
                              timeout=spec.startup_timeout_s, threads=spec.backend_threads)

    control_ref = args.control or ("production" if "production" in store.aliases() else "teacher")
    started: list[backends.Backend] = []
    log = None
    try:
        if kind.startswith(("http://", "https://")):
            candidate = backends.url_backend(kind, _upstream_model(kind), label(args.version))
        else:
            candidate = None
        if args.control_url:
            control = backends.url_backend(args.control_url, _upstream_model(args.control_url), label(control_ref))
        else:
            control = None
        todo = {}
        if candidate is None:
            todo["candidate"] = folder_of(args.version)
        if control is None:
            todo["control"] = folder_of(control_ref)
        if todo:
            print(f"starting {kind} backends: " + ", ".join(f"{arm} {v} ({f})" for arm, (v, f) in todo.items()))
            by_version = {v: f for v, f in todo.values()}
            made = {b.version: b for b in backends.start_many(kind, by_version, serve_dir / "logs",
                                                               device=spec.device, timeout=spec.startup_timeout_s,
                                                               threads=spec.backend_threads)}
            started += made.values()
            candidate = candidate or made[todo["candidate"][0]]
            control = control or made[todo["control"][0]]
        log = RequestLog(log_path(store.dir))

        async def launcher(ref: str) -> backends.Backend:
            b = await asyncio.get_running_loop().run_in_executor(None, launch, ref)
            started.append(b)
            return b

        state = GatewayState(arms={"control": control, "candidate": candidate},
                             assigner=Assigner(spec.experiment, {"control": 1 - spec.candidate_weight,
                                                                 "candidate": spec.candidate_weight}),
                             request_log=log, shadow=control if (args.shadow or spec.shadow) else None,
                             shadow_fraction=spec.shadow_fraction, token=args.token,
                             max_body_bytes=spec.max_body_bytes, max_tokens_limit=spec.max_tokens_limit,
                             launcher=launcher, stop_replaced=True, fallback=control if spec.breaker else None,
                             breaker={"fail_max": spec.breaker_fail_max, "reset_timeout_s": spec.breaker_reset_s,
                                      "timeout_s": spec.breaker_timeout_s} if spec.breaker else None,
                             detector=None if spec.detector == "off" else Detector(
                                 semantic="suspicious" if spec.detector == "rules+minilm" else "off",
                                 threshold=spec.detector_threshold))
        print(f"gateway on http://{args.host}:{args.port}/v1 (model 'distillgate'): candidate {candidate.version} "
              f"{spec.candidate_weight:.0%}, control {control.version} {1 - spec.candidate_weight:.0%}"
              + (", shadow on" if state.shadow else "") + (f", detector {spec.detector}" if state.detector else "")
              + (", breaker on (fallback: control)" if state.breaker else "") + f"; request log {log.path}; Ctrl-C stops")
        try:
            serve_forever(build_app(state), args.host, args.port)
        except KeyboardInterrupt as e:
            from ..signals import Terminated

            if isinstance(e, Terminated):
                raise
            print("gateway stopped (Ctrl-C)")
    finally:
        if log is not None:
            log.close()
        for b in started:
            b.stop()
        store.close()
    return 0
