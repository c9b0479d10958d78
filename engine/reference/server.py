"""`tidal serve`: the CPU reference server speaking SGLang's HTTP API (docs/sglang.md §9).

Its own process (it may import torch; the engine never does). Serves a transformers causal LM
(`--model PATH`) or, with `--simulate`, the cost model of simulate.py. Once listening it prints one
line, `tidal serve ready http://HOST:PORT`, which launch.py waits for (port 0 picks a free port).
It binds before it loads the model, and every start-up failure (a busy port, a bad host, a missing
or broken checkpoint, a bad config) is one line on stderr and exit code 2 (`--debug`: the
traceback too). Logs go to stderr: each request at debug level, each rejection and failure always;
libraries' progress bars and info lines are left out unless `--debug`.

    tidal serve --model /path/to/checkpoint --port 30000
    tidal serve --simulate --port 0 --set simulate.max_running=512
"""

import argparse
import asyncio
import hmac
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid

import msgspec
from aiohttp import web
from tidal.engine.reference import control, openai
from tidal.engine.reference.api import ApiError, Sampling, json_encode
from tidal.engine.reference.config import STATE, ServeConfig, ServerState
from tidal.engine.reference.generate import handle_generate
from tidal.engine.reference.scheduler import Scheduler, Seq
from tidal.protocol.config import add_config_args, config_from_args
from tidal.protocol.errors import ConfigError
from tidal.protocol.model_source import ModelSource, resolve_model
from tidal.protocol.sglang import Abort, ErrorResponse, ModelCard, ModelInfo, ModelList
from tidal.protocol.startup import add_debug_arg, freeze_startup_heap, quiet_gc, run_main, starting

__all__ = ["main", "build_app", "build_state", "READY_PREFIX"]

log = logging.getLogger("tidal.serve")

READY_PREFIX = "tidal serve ready "
"""The readiness line on stdout is this prefix followed by the bound URL."""

_BACKLOG = 4096
"""Listen backlog: thousands of clients connecting at once must not overflow it (aiohttp's default
128 makes the rest retry their SYN after 1, 3, 7 s), as SGLang's uvicorn uses 2048."""
_OPEN_PATHS = ("/health", "/ready", "/metrics")
_ADMIN_PATHS = frozenset({
    "/update_weights_from_disk", "/update_weights_from_distributed", "/update_weights_from_tensor",
    "/init_weights_update_group", "/destroy_weights_update_group", "/update_weight_version",
    "/begin_weight_update", "/end_weight_update", "/pause_generation", "/continue_generation",
    "/abort_request", "/flush_cache",
})


@web.middleware
async def _auth_and_errors(request: web.Request, handler):
    """§0: bearer keys (admin key alone on control endpoints), ApiError as its JSON envelope, and
    the log: every request at debug level, a rejected one at warning with its reason, a failed
    handler at error with its traceback."""
    started = time.perf_counter()
    response = await _answer(request, handler)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s %s -> %d in %.1f ms", request.method, request.path, response.status,
                  (time.perf_counter() - started) * 1e3)
    return response


def _rejected(request: web.Request, status: int, body, why: str) -> web.Response:
    """An error answer, always a JSON body (§0), logged with its reason."""
    log.warning("%s %s -> %d: %s", request.method, request.path, status, why)
    return web.Response(status=status, body=json_encode(body), content_type="application/json")


async def _answer(request: web.Request, handler) -> web.StreamResponse:
    cfg = request.app[STATE].cfg.server
    if (cfg.api_key or cfg.admin_api_key) and not request.path.startswith(_OPEN_PATHS):
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        admin = request.path in _ADMIN_PATHS and cfg.admin_api_key
        expected = cfg.admin_api_key if admin else cfg.api_key
        if expected and not hmac.compare_digest(given.encode(), expected.encode()):
            if given and any(k and hmac.compare_digest(given.encode(), k.encode())
                             for k in (cfg.api_key, cfg.admin_api_key)):
                return _rejected(request, 403, {"error": "Forbidden"}, "a key that is not this endpoint's")
            return _rejected(request, 401, {"error": "Unauthorized"}, "no or an unknown bearer key")
    try:
        return await handler(request)
    except ApiError as err:
        request.app[STATE].count("rejected_requests")
        return _rejected(request, err.status, err.body, err.message)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:  # JSON, as SGLang's FastAPI answers them
        return _rejected(request, exc.status, {"detail": exc.reason}, exc.reason)
    except web.HTTPException:
        raise
    except Exception as exc:  # a bug answers a counted 500 envelope; the server keeps serving
        log.exception("%s %s failed", request.method, request.path)
        request.app[STATE].count("internal_errors")
        body = ErrorResponse(message=f"internal error: {exc!r}", type="InternalServerError", code=500)
        return web.Response(status=500, body=json_encode(body), content_type="application/json")


def _json(data) -> web.Response:
    return web.Response(body=json_encode(data), content_type="application/json")


# --- health and information (§4) ----------------------------------------------------------------


async def _probe(state: ServerState) -> bool:
    """A one-token generation that must finish within health_timeout_s (it waits while paused)."""
    sched = state.scheduler
    seq = Seq(rid=f"HEALTH_CHECK_{uuid.uuid4().hex}", prompt=[1], sampling=Sampling(max_new_tokens=1),
              stop_ids=frozenset())
    sched.submit(seq)
    try:
        async with asyncio.timeout(state.cfg.server.health_timeout_s):
            await seq.done.wait()
    except TimeoutError:
        return False
    finally:
        sched.cancel(seq)
    return not isinstance(seq.finish, Abort)


async def health(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    if request.path == "/health" and state.scheduler.running and not state.scheduler.paused:
        return web.Response(status=200)
    return web.Response(status=200 if await _probe(state) else 503)


async def ready(request: web.Request) -> web.Response:
    return web.Response(status=503 if request.app[STATE].scheduler.paused else 200)


async def model_info(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    if request.path == "/get_model_info":
        log.warning("/get_model_info is deprecated; use /model_info")
    return _json(ModelInfo(
        model_path=state.model_path, served_model_name=state.served_model_name,
        tokenizer_path=state.cfg.model.path, weight_version=state.scheduler.version, load_format="auto",
        model_type=state.stepper.model_type, architectures=state.stepper.architectures,
    ))


async def server_info(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    cfg = state.cfg
    info = {f"sim_{k}": v for k, v in msgspec.to_builtins(cfg.simulate).items()} if state.simulated else {}
    info.update(msgspec.to_builtins(cfg.server))
    info["port"] = state.bound_port
    info.pop("api_key", None)
    info.pop("admin_api_key", None)
    sched = state.scheduler
    info.update({
        "mode": cfg.mode, "model_path": cfg.model.path, "tokenizer_path": cfg.model.path,
        "served_model_name": state.served_model_name, "dtype": cfg.model.dtype,
        "device": str(getattr(state.stepper, "device", cfg.model.device)),  # resolved: "auto" -> where it runs
        "random_seed": cfg.model.seed, "max_running_requests": sched.max_running,
        "context_length": state.stepper.context_length, "max_total_num_tokens": None,
        "max_req_input_len": state.stepper.context_length - 1, "version": "tidal-reference-0.1.0",
        "launch_command": state.launch_command, "startup_time": state.startup_time,
        "internal_states": [sched.internal_state()], "counters": dict(state.counters),
    })
    return _json(info)


def _model_card(state: ServerState) -> ModelCard:
    return ModelCard(id=state.served_model_name, created=int(state.startup_time), root=state.served_model_name,
                     max_model_len=state.stepper.context_length)


async def list_models(request: web.Request) -> web.Response:
    return _json(ModelList([_model_card(request.app[STATE])]))


async def get_model(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    name = request.match_info["model"]
    if name != state.served_model_name:
        return web.Response(status=404, content_type="application/json", body=json_encode({"error": {
            "message": f"The model '{name}' does not exist", "type": "invalid_request_error",
            "param": "model", "code": "model_not_found"}}))
    return _json(_model_card(state))


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text: every counter of `internal_states` and the request counters, prefixed `sglang:`."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily

    state: ServerState = request.app[STATE]

    class _Collector:
        def collect(self):
            values = state.scheduler.internal_state() | state.counters
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    yield GaugeMetricFamily(f"sglang:{key}", key.replace("_", " "), value=float(value))

    registry = CollectorRegistry()
    registry.register(_Collector())
    return web.Response(body=generate_latest(registry), content_type="text/plain")


# --- assembly ------------------------------------------------------------------------------------


def build_stepper(cfg: ServeConfig, source: ModelSource | None = None):
    """The token source: the cost model (no torch imported) or the transformers runner, loading
    from `source` (default: `resolve_model(cfg.model.path)`)."""
    if cfg.mode == "simulate":
        from tidal.engine.reference.simulate import Simulator

        return Simulator(cfg.simulate)
    source = source or resolve_model(cfg.model.path)
    import torch
    from tidal.engine.reference.runner import ModelRunner

    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    return ModelRunner(source.path, device=cfg.model.device, dtype=cfg.model.dtype, seed=cfg.model.seed,
                       prefix_cache_tokens=cfg.model.prefix_cache_tokens, local_files_only=source.local_files_only)


def build_state(cfg: ServeConfig, stepper) -> ServerState:
    max_running = cfg.simulate.max_running if cfg.mode == "simulate" else cfg.model.max_running
    name = cfg.server.served_model_name or cfg.model.path or "tidal-simulated"
    scheduler = Scheduler(stepper, max_running=max_running, version=cfg.server.weight_version)
    return ServerState(cfg=cfg, stepper=stepper, scheduler=scheduler, model_path=cfg.model.path or name,
                       served_model_name=name, launch_command=_redacted(sys.argv))


def _redacted(argv: list[str]) -> str:
    """The command line /server_info shows, with every key replaced: the normal key's holder may read it."""
    out, hide = [], False
    for arg in argv:
        name, eq, _ = arg.partition("=")
        secret = any(k in name for k in ("api-key", "api_key"))
        out.append("***" if hide else f"{name}=***" if secret and eq else arg)
        hide = secret and not eq
    return " ".join(out)


def build_app(state: ServerState) -> web.Application:
    """The aiohttp application; the scheduler task lives (and is cancelled and awaited) with it."""
    app = web.Application(middlewares=[_auth_and_errors], client_max_size=64 * 1024 * 1024)
    app[STATE] = state

    async def scheduler_task(app: web.Application):
        task = asyncio.create_task(state.scheduler.run(), name="scheduler")
        yield
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    async def abort_in_flight(app: web.Application):
        """Staged shutdown: the sites stopped accepting; in-flight requests end as aborted (partial
        output, then [DONE]) instead of holding the shutdown or being cut mid-stream."""
        state.scheduler.paused = True
        state.scheduler.abort(abort_all=True)

    app.cleanup_ctx.append(scheduler_task)
    app.on_shutdown.append(abort_in_flight)
    app.router.add_route("POST", "/generate", handle_generate)
    app.router.add_route("PUT", "/generate", handle_generate)
    for path, handler in [
        ("/health", health), ("/health_generate", health), ("/ready", ready),
        ("/model_info", model_info), ("/get_model_info", model_info),
        ("/server_info", server_info), ("/get_server_info", server_info),
        ("/v1/models", list_models), ("/v1/models/{model}", get_model), ("/metrics", metrics),
    ]:
        app.router.add_get(path, handler)
    app.router.add_routes(control.routes)
    app.router.add_routes(openai.routes)
    return app


def _listen(host: str, port: int) -> socket.socket:
    """Bind before the model loads, so a busy port or a bad host fails in a moment, not after it."""
    with starting(f"cannot listen on {host}:{port}"):
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a busy port still fails: EADDRINUSE
            sock.bind(address)
        except BaseException:
            sock.close()
            raise
    return sock


async def serve(cfg: ServeConfig, source: ModelSource | None = None) -> None:
    """Bind, load, listen until SIGTERM/SIGINT, then stop accepting, cancel the scheduler and close.
    A failure before the readiness line is a `StartupError` naming what could not be done."""
    sock = _listen(cfg.server.host, cfg.server.port)
    try:
        with starting(f"cannot load the model {cfg.model.path}"):
            stepper = build_stepper(cfg, source)
    except BaseException:
        sock.close()
        raise
    state = build_state(cfg, stepper)
    runner = web.AppRunner(build_app(state), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.SockSite(runner, sock, backlog=_BACKLOG)
    with starting(f"cannot listen on {cfg.server.host}:{cfg.server.port}"):
        await site.start()
    host, port = sock.getsockname()[:2]
    state.bound_port = port
    freeze_startup_heap()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving %s on http://%s:%d", "the cost model" if cfg.mode == "simulate" else cfg.model.path, host, port)
    print(f"{READY_PREFIX}http://{host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)  # a repeated SIGTERM while stopping changes nothing:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # without this it would kill the staged shutdown
        await runner.cleanup()
        if hasattr(stepper, "close"):
            stepper.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidal serve", description=__doc__.splitlines()[0])
    add_config_args(parser, ServeConfig)
    parser.add_argument("--model", help="checkpoint directory or hub id (model.path); `tidal model tiny DIR` "
                                        "writes a tiny test checkpoint")
    parser.add_argument("--simulate", action="store_true", help="serve the cost model, no model (mode=simulate)")
    parser.add_argument("--fast", action="store_true", help="with --simulate: zero costs (simulate.fast)")
    parser.add_argument("--host", help="address to bind (server.host, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind, 0 = any free one (server.port)")
    parser.add_argument("--incremental-streaming-output", action="store_true",
                        help="stream deltas instead of cumulative chunks")
    parser.add_argument("--weight-version", help="initial weight version (server.weight_version)")
    parser.add_argument("--api-key", help="bearer key for normal endpoints")
    parser.add_argument("--admin-api-key", help="bearer key for weight and control endpoints")
    add_debug_arg(parser)
    return parser


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """The usual flags as dotted overrides (applied after --set, so flags win)."""
    out = []
    strings = {"model": "model.path", "host": "server.host", "weight_version": "server.weight_version",
               "api_key": "server.api_key", "admin_api_key": "server.admin_api_key"}
    for attr, key in strings.items():
        value = getattr(args, attr)
        if value is not None:
            out.append(f"{key}={json.dumps(value)}")
    if args.port is not None:
        out.append(f"server.port={args.port}")
    if args.simulate:
        out.append('mode="simulate"')
    if args.fast:
        out.append("simulate.fast=true")
    if args.incremental_streaming_output:
        out.append("server.incremental_streaming_output=true")
    return out


def _check_flags(args: argparse.Namespace, cfg: ServeConfig) -> None:
    """Flags that mean nothing in the chosen mode are refused, not silently ignored."""
    if args.fast and cfg.mode != "simulate":
        raise ConfigError("--fast zeroes the costs of the simulated model: it needs --simulate "
                          '(or mode = "simulate" in the config)')


def _quiet_libraries(debug: bool) -> None:
    """Libraries' chatter stays out of the server's stderr unless --debug: transformers' and the
    hub's progress bars and info lines, bm25s's debug logger. Their warnings and errors still show."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if debug:
        return
    for name in ("transformers", "huggingface_hub", "bm25s", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _start(args: argparse.Namespace) -> int:
    cfg = config_from_args(ServeConfig, args)
    if cfg is None:
        return 0
    cfg.check()
    _check_flags(args, cfg)
    source = resolve_model(cfg.model.path) if cfg.mode == "model" else None
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    run(serve(cfg, source))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    args.overrides = list(args.overrides) + _flag_overrides(args)
    _quiet_libraries(args.debug)
    quiet_gc()
    return run_main("tidal serve", lambda: _start(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
