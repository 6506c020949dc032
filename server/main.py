"""The HTTP server: create_app(settings) builds the FastAPI app; serve(args) runs it under uvicorn.

Startup (lifespan): Settings -> model -> AdapterSlab + AdapterRegistry (+ --adapters DIR) ->
Engine thread -> one warm-up request -> ready. app.state carries settings, lm, slab, registry,
engine, metrics, ready, draining.

Shutdown: SIGTERM makes /ready false and every new /v1 request a 503, lets in-flight requests run
up to settings.drain_grace_s, then aborts what is left and exits 0 (DrainingServer below).
A second SIGTERM or a SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import signal
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request

from .api.common import error_body, install_error_handlers, note_error
from .compile_watch import watch_compiles
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("scaleserve.server")


def _load_model(settings: Settings):
    from .loader import DEFAULT_MODEL_NAME, ensure_default_model, load_model

    if settings.model:
        return load_model(Path(settings.model), device=settings.resolved_device())
    # the embedded default answers to its own name, not to its cache directory's
    return load_model(ensure_default_model(settings.data_dir), device=settings.resolved_device(),
                      name=DEFAULT_MODEL_NAME)


def _compiled_while_serving(metrics: Metrics, kernel: str, spec: str) -> None:
    log.warning("kernel %s compiled while serving (every stream waited for it; warm-up missed this shape): %s",
                kernel, spec)
    metrics.kernel_compiles.labels(kernel=kernel).inc()


async def _maybe_await(x):
    if inspect.isawaitable(x):
        await x


async def _warm_up(app: FastAPI) -> None:
    """One short request through the engine: compiles the kernels (CUDA) and proves the path works."""
    from .scheduler import SamplingParams, Sequence

    st = app.state
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    seq = Sequence("warmup", list(st.lm.tokenizer.encode("Hello")) or [0],
                   SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                   sink=lambda out: out.finished and loop.call_soon_threadsafe(done.set))
    st.engine.add(seq)
    await asyncio.wait_for(done.wait(), timeout=600)


def create_app(settings: Settings | None = None, lm=None) -> FastAPI:
    """The app. `lm` (a LoadedModel) skips loading, for tests that share one model."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from scaleserve.adapters.registry import AdapterRegistry

        from . import auth
        from .engine import Engine

        st = app.state
        t0 = time.monotonic()
        # The engine thread and the event loop share the GIL. CPython hands it over only every
        # switch interval (5 ms by default) when both want it, which alone would cap a stream at
        # ~200 tokens/s; 0.5 ms keeps the hand-over well under a decode step.
        sys.setswitchinterval(min(sys.getswitchinterval(), 5e-4))
        auth.configure(app, settings)
        st.lm = lm if lm is not None else await asyncio.to_thread(_load_model, settings)
        st.served_model_name = settings.served_model_name or st.lm.name
        st.registry = AdapterRegistry.from_settings(st.lm, settings)
        st.slab = st.registry.slab
        st.registry.on_load = st.metrics.adapter_load.observe
        if settings.adapters:
            n = len(st.registry.load_dir(settings.adapters))
            log.info("loaded %d adapters from %s", n, settings.adapters)
        st.engine = Engine(st.lm, st.slab, st.registry, settings, st.metrics)
        st.engine.start()
        if hasattr(st.registry, "start"):  # the adapter store's sync task (adapters work)
            await _maybe_await(st.registry.start())
        await _warm_up(app)
        # Everything alive now (imports, model, engine, compiled kernels: ~500k objects) lives as long as the
        # server. A collection holds the GIL, so the engine thread stops and the GPU runs dry. A full collection
        # walked all of it (~300 ms on the GPU host, ~170 ms on a 2-core CPU), and the first gen-1 collection
        # after warm-up took 4 ms. Frozen, only what serving allocated since is walked (~1 ms). Collect first,
        # so startup's garbage cycles are freed, not kept. See docs/serving.md.
        gc.collect()
        gc.freeze()
        st.unwatch_compiles = watch_compiles(lambda kernel, spec: _compiled_while_serving(st.metrics, kernel, spec))
        st.started_at = time.time()
        st.ready = True
        log.info("ready: model %s on %s, max_model_len %d, %d KV blocks, in %.1f s", st.served_model_name,
                 st.lm.device, st.engine.max_model_len, st.engine.kv.num_blocks, time.monotonic() - t0)
        try:
            yield
        finally:
            st.ready = False
            st.unwatch_compiles()
            if hasattr(st.registry, "stop"):
                await _maybe_await(st.registry.stop())
            st.engine.stop()

    app = FastAPI(title="scaleserve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible multi-tenant int4 LLM server")
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.ready = False
    app.state.draining = False
    app.state.inflight = 0
    app.state.tenant_inflight = {}
    app.state.started_at = time.time()
    install_error_handlers(app)
    from .auth import OpenAIError, openai_error_handler

    async def _openai_error(request, e: OpenAIError):
        note_error(request, e.code or e.type, e.status_code, e.message)
        return await openai_error_handler(request, e)

    app.add_exception_handler(OpenAIError, _openai_error)

    from .api import adapters, chat, completions, health, models

    app.include_router(health.router)
    app.include_router(completions.router)
    app.include_router(chat.router)
    app.include_router(models.router)
    app.include_router(adapters.router)
    app.add_middleware(GateMiddleware)
    return app


class GateMiddleware:
    """503 (OpenAI error shape, Retry-After) for /v1 requests while starting up or draining."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            st = scope["app"].state
            if st.draining or not st.ready:
                import json

                msg = "the server is shutting down" if st.draining else "the server is starting up"
                body = json.dumps(error_body(503, msg, code="unavailable")).encode()
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                note_error(Request(scope), "unavailable", 503, msg)
                return
        await self.app(scope, receive, send)


# --- running under uvicorn ------------------------------------------------------------------------


def _uvicorn_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn.Server whose first SIGTERM drains instead of closing the listener at once.

        Draining: app.state.draining -> /ready 503, new /v1 requests 503; the listener stays open (a
        load balancer keeps routing for a moment after readiness flips). When no request is in
        flight, or settings.drain_grace_s has passed (in-flight sequences are then aborted), the
        normal uvicorn shutdown runs. Signals are not re-raised afterwards, so the exit code is 0.
        """

        def __init__(self, config, app: FastAPI):
            super().__init__(config)
            self.app = app
            self.drain_deadline: float | None = None

        def handle_exit(self, sig, frame) -> None:
            st = self.app.state
            if sig == signal.SIGTERM and self.drain_deadline is None and st.ready:
                grace = st.settings.drain_grace_s
                log.info("SIGTERM: draining (%d in flight, grace %.0f s)", st.inflight, grace)
                st.draining = True
                self.drain_deadline = time.monotonic() + grace
                return
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True

        async def on_tick(self, counter: int) -> bool:
            if await super().on_tick(counter):
                return True
            if self.drain_deadline is None:
                return False
            st = self.app.state
            engine = getattr(st, "engine", None)
            busy = st.inflight > 0 or (engine is not None and (engine.num_running or engine.num_waiting))
            if not busy:
                log.info("drained; shutting down")
                return True
            if time.monotonic() >= self.drain_deadline:
                log.warning("drain grace over: aborting %d in-flight requests", st.inflight)
                if engine is not None:
                    for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
                        engine.abort(seq)
                await asyncio.sleep(0.5)  # let the aborted streams send their last event
                return True
            return False

    return DrainingServer


def settings_from_args(args) -> Settings:
    """CLI flags (those given: not None) over SCALESERVE_* environment variables over defaults. Any
    `serve` flag whose dest is a Settings field is picked up, so new flags need no change here."""
    over = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**over)


def serve(args) -> int:
    import uvicorn

    settings = settings_from_args(args)
    if settings.model:  # a missing or foreign --model: the CLI's one-line error (exit 2), before uvicorn's lifespan
        from .loader import read_meta  # loads it and would print its startup traceback instead

        read_meta(settings.model)
    level = settings.log_level.upper()
    logging.getLogger().setLevel(level)
    logging.getLogger("scaleserve").setLevel(level)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                            timeout_graceful_shutdown=5, access_log=False, lifespan="on")
    server = _uvicorn_server_class()(config, app)
    server.run()
    if not getattr(server, "started", False) and not server.should_exit:
        return 1
    return 0


class ThreadedServer:
    """The app under a real uvicorn on a free loopback port, in a daemon thread: for tests,
    benchmarks and notebooks that need a live HTTP server beside them in one process.

        with ThreadedServer(create_app(settings)) as srv:
            httpx.get(srv.url + "/ready")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1"):
        import socket
        import threading

        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 300.0, wait_ready: bool = True) -> "ThreadedServer":
        """Start, and wait until uvicorn listens (and, by default, /ready would say true)."""
        if self.thread.ident is not None:  # already started (e.g. start() then `with`)
            return self
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not (self.server.started and (not wait_ready or getattr(self.app.state, "ready", False))):
            if not self.thread.is_alive():
                raise RuntimeError("server thread died during startup")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not start within {timeout:.0f} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()

    def __enter__(self) -> "ThreadedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
