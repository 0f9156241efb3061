"""Server bootstrap shared by every service (after grpc's examples/python asyncio patterns).

A ServiceApp wires a grpc.aio server with health (driven by dependency checks), reflection,
the kit interceptor (auth, input checks, logs, metrics, error mapping), message-size and keepalive
options, Prometheus on its own port, and graceful shutdown: NOT_SERVING (health watches end),
stop accepting, drain in-flight RPCs within the grace period, then close the service's pools.

Each method's access level comes from its contract (the `(runops.common.v1.access)` option);
health and reflection are declared PUBLIC here. A method without one is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from runops.kit.auth import Access, ApiKeyResolver, Authenticator, resolve_service, service_access
from runops.kit.background import BackgroundTask
from runops.kit.background import Hook as StoppingHook
from runops.kit.dependencies import dependency_error
from runops.kit.health import HealthServicer
from runops.kit.interceptors import ErrorMapper, ServerInterceptor
from runops.kit.logging import configure_logging
from runops.kit.metrics import MetricsServer
from runops.kit.processes import Supervisor
from runops.kit.settings import ServerSettings, SettingsError, load_settings

log = structlog.get_logger("runops.server")

DependencyCheck = Callable[[], Awaitable[object]]
Hook = Callable[[], Awaitable[object]]
SettingsT = TypeVar("SettingsT", bound=ServerSettings)
# Health name for liveness probes: SERVING while the process serves at all, whatever its
# dependencies; NOT_SERVING only once shutdown begins (restarting cannot fix a database).
LIVENESS = "liveness"
# How long past the grace period stop() waits for grpc's own shutdown.
STOP_MARGIN_SECONDS = 5.0
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION_SERVICE = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
# Declared here, not in their contracts (grpc's own): anyone may ask whether we serve.
PUBLIC_SERVICES = {
    HEALTH_SERVICE: dict.fromkeys(("Check", "List", "Watch"), Access.PUBLIC),
    REFLECTION_SERVICE: {"ServerReflectionInfo": Access.PUBLIC},
}


@dataclass(frozen=True)
class _Registration:
    name: str
    register: Callable[[Any, grpc.aio.Server], None]
    servicer: Any


def server_options(settings: ServerSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_seconds * 1000)),
        # Accept client keepalive pings every 10 s or more, even without active calls.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Off unless RUNOPS_PROCESSES > 1: a second server on a taken port must fail, not share.
        ("grpc.so_reuseport", 1 if settings.processes > 1 else 0),
    ]


class ServiceApp:
    def __init__(
        self,
        name: str,
        settings: ServerSettings,
        *,
        api_key_resolver: ApiKeyResolver | None = None,
        error_mappers: Sequence[ErrorMapper] = (),
        transport_options: Sequence[tuple[str, int]] = (),
    ) -> None:
        """`transport_options`: grpc server options of this service besides the common ones
        (`server_options`), e.g. ingest's bounded read-ahead of client streams."""
        self.name = name
        self.settings = settings
        self.transport_options = list(transport_options)
        self._api_key_resolver = api_key_resolver
        self._error_mappers = (*error_mappers, dependency_error)
        self._services: list[_Registration] = []
        self._access: dict[str, Access | None] = {}
        for service, public in PUBLIC_SERVICES.items():
            self._access.update(service_access(service, public))
        self._checks: dict[str, DependencyCheck] = {}
        self._startup: list[Hook] = []
        self._shutdown: list[Hook] = []
        self._stopping_hooks: list[StoppingHook] = []
        self._background: list[tuple[BackgroundTask, float]] = []
        self._tasks: list[asyncio.Task[object]] = []
        self.health = HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._metrics: MetricsServer | None = None
        self._port: int | None = None
        self._serving: bool | None = None
        self._stopping = False
        self._stopped = asyncio.Event()
        # Set when shutdown begins: long-lived streams (watches) end on it instead of holding
        # the server for the whole grace period.
        self.shutting_down = asyncio.Event()

    # -- wiring -----------------------------------------------------------------------------
    def add_service(
        self,
        service: ServiceDescriptor | str,
        register: Callable[[Any, grpc.aio.Server], None],
        servicer: Any,
        *,
        method_access: Mapping[str, Access] | None = None,
    ) -> None:
        """Register a servicer for `service` (its descriptor, or its full name in the default
        descriptor pool). Access levels come from the contract's `(runops.common.v1.access)`
        method options; `method_access` overrides by method name, only for a contract that
        cannot carry them, and a name the service lacks raises AccessDeclarationError. A method
        left without a level is refused at call time."""
        descriptor = resolve_service(service)
        self._services.append(_Registration(descriptor.full_name, register, servicer))
        access = service_access(descriptor, method_access)
        self._access.update(access)
        undeclared = [method for method, level in access.items() if level is None]
        if undeclared:
            log.warning("methods without an access level will be refused", methods=undeclared)

    def add_dependency(self, name: str, check: DependencyCheck) -> None:
        """A check that raises (or times out) while `name` is down; health follows it."""
        self._checks[name] = check

    def on_startup(self, hook: Hook) -> None:
        self._startup.append(hook)

    def on_shutdown(self, hook: Hook) -> None:
        """Runs after in-flight RPCs drained, in reverse registration order (close pools here)."""
        self._shutdown.append(hook)

    def on_stopping(self, hook: StoppingHook) -> None:
        """Runs when shutdown begins, right after NOT_SERVING and before in-flight RPCs drain
        (end long-lived streams here, so they do not hold the server for the grace period)."""
        self._stopping_hooks.append(hook)

    def add_background(self, task: BackgroundTask, *, ready_timeout: float = 0.0) -> None:
        """Started before the server accepts RPCs (start-up waits up to `ready_timeout` for
        `task.ready`, then serves anyway); told `stopping()` when shutdown begins; stopped
        (bounded by its `stop_timeout`) after the drain, before the shutdown hooks."""
        self._background.append((task, ready_timeout))

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server has not started")
        return self._port

    @property
    def metrics_port(self) -> int | None:
        return None if self._metrics is None else self._metrics.port

    @property
    def target(self) -> str:
        host = self.settings.grpc_host
        return f"{'127.0.0.1' if host in ('0.0.0.0', '::', '[::]') else host}:{self.port}"

    async def start(self) -> int:
        for hook in self._startup:
            await hook()
        await self._start_background()
        interceptor = ServerInterceptor(
            Authenticator(
                admin_token=self.settings.admin_token,
                internal_token=self.settings.internal_token,
                api_key_resolver=self._api_key_resolver,
            ),
            self._access,
            self._error_mappers,
        )
        options = [*server_options(self.settings), *self.transport_options]
        server = grpc.aio.server(interceptors=[interceptor], options=options)
        for reg in self._services:
            reg.register(reg.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [reg.name for reg in self._services]
        reflection.enable_server_reflection(
            [*names, HEALTH_SERVICE.full_name, REFLECTION_SERVICE.full_name], server
        )
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        port = server.add_insecure_port(address)
        if port == 0:
            raise SettingsError(f"cannot listen on {address}: is the port in use?")
        await server.start()
        self._server, self._port = server, port
        if self.settings.metrics_port >= 0:
            self._metrics = MetricsServer(self.settings.metrics_host, self.settings.metrics_port)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self._check_dependencies()
        self._tasks.append(asyncio.create_task(self._watch_dependencies(), name="health-watch"))
        log.info(
            "serving",
            service=self.name,
            address=self.target,
            metrics_port=self.metrics_port,
            services=names,
        )
        return port

    async def _start_background(self) -> None:
        for task, _ in self._background:
            task.start()

        async def wait(task: BackgroundTask, seconds: float) -> None:
            if seconds > 0 and not await task.wait_ready(seconds):
                log.warning("background task not ready yet; serving without it", task=task.name)

        await asyncio.gather(*(wait(task, timeout) for task, timeout in self._background))

    async def _run_stopping_hooks(self) -> None:
        """Shutdown began: every stopping hook runs, whatever the others do."""
        hooks = [*self._stopping_hooks, *(task.stopping for task, _ in self._background)]
        for hook in hooks:
            try:
                result = hook()
                if result is not None:
                    await result
            except Exception:
                log.exception("stopping hook failed")

    async def _set_serving(self, serving: bool) -> None:
        if serving == self._serving or self._stopping:
            return
        self._serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *(reg.name for reg in self._services)):
            await self.health.set(name, status)

    async def _check_dependencies(self) -> None:
        if self._stopping:
            return  # NOT_SERVING for good; nothing to report
        timeout = self.settings.health_check_interval_seconds
        down: list[str] = []
        for name, check in self._checks.items():
            try:
                await asyncio.wait_for(check(), timeout=max(timeout, 0.5))
            except Exception as exc:
                down.append(name)
                log.warning("dependency down", dependency=name, error=repr(exc))
        if down and self._serving is not False:
            log.warning("health NOT_SERVING", down=down)
        elif not down and self._serving is False:
            log.info("health SERVING again")
        await self._set_serving(not down)

    async def _watch_dependencies(self) -> None:
        # Ends by itself once stopping: on 3.11 a check's wait_for can swallow the cancel.
        while not self._stopping:
            await asyncio.sleep(self.settings.health_check_interval_seconds)
            await self._check_dependencies()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop; safe to call more than once."""
        if self._stopping:
            await self._stopped.wait()
            return
        await self._set_serving(False)
        self._stopping = True
        self.shutting_down.set()
        await self.health.enter_graceful_shutdown()
        await self._run_stopping_hooks()
        grace = self.settings.grace_period_seconds if grace is None else grace
        log.info("shutting down", grace_seconds=grace)
        if self.settings.shutdown_delay_seconds:
            await asyncio.sleep(self.settings.shutdown_delay_seconds)
        if self._server is not None:
            # grpc.aio's stop has been seen to hang past its grace (gRPC issue 28999): the
            # rest of shutdown (pools, metrics) must still happen. (Not wait_for: it would
            # wait for the cancellation too.)
            stopping = asyncio.ensure_future(self._server.stop(grace))
            done, _ = await asyncio.wait({stopping}, timeout=grace + STOP_MARGIN_SECONDS)
            if not done:
                log.error(
                    "gRPC server did not stop within its grace period; going on",
                    tasks=[_describe(t) for t in asyncio.all_tasks() if not t.done()],
                )
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        # Background work outlives the drain (in-flight RPCs may need it), not the pools.
        await asyncio.gather(*(task.stop() for task, _ in self._background))
        for hook in reversed(self._shutdown):
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed")
        if self._metrics is not None:
            self._metrics.stop()
        log.info("stopped")
        self._stopped.set()

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()


def _describe(task: asyncio.Task[Any]) -> str:
    frames = task.get_stack(limit=1)
    where = f" at {frames[0].f_code.co_filename}:{frames[0].f_lineno}" if frames else ""
    return f"{task.get_name()} {task.get_coro()!r}{where}"


async def serve(app: ServiceApp, *, parent_pid: int | None = None) -> None:
    """Start, then stop gracefully on SIGTERM or SIGINT (or when `parent_pid`, the supervising
    process, is gone)."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    await app.start()
    orphaned = None
    if parent_pid is not None:
        orphaned = asyncio.create_task(_until_orphaned(parent_pid, stop_requested))
    await stop_requested.wait()
    if orphaned is not None:
        orphaned.cancel()
    await app.stop()


async def _until_orphaned(parent_pid: int, stop_requested: asyncio.Event) -> None:
    # Checks the flag itself: Python 3.11's wait_for can swallow a cancellation.
    while os.getppid() == parent_pid:
        if stop_requested.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_requested.wait(), 1)
    log.error("the supervising process is gone; stopping", parent_pid=parent_pid)
    stop_requested.set()


def run_service(
    settings_cls: type[SettingsT], build: Callable[[SettingsT], Awaitable[ServiceApp]]
) -> None:
    """Entry point of a service process: settings validated first (a bad one exits 2 with its
    reason), logs configured, then serve until SIGTERM: here, or with RUNOPS_PROCESSES > 1 in
    that many spawned processes on one port (`runops.kit.processes`). `build` must then be a
    module-level function: the children receive it pickled by name."""
    try:
        settings = load_settings(settings_cls)
        configure_logging(settings.log_level, settings.log_format)
        if settings.processes > 1:
            child = functools.partial(_serve_process, build)
            status = Supervisor(build.__module__, settings, child).run()
            if status:
                raise SystemExit(status)
        else:
            run_loop(_build_and_serve(build, settings), settings.event_loop)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run_loop(main: Coroutine[Any, Any, None], event_loop: str) -> None:
    """`asyncio.run(main)` on the event loop RUNOPS_EVENT_LOOP names."""
    if event_loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
    else:
        asyncio.run(main)


def _serve_process(
    build: Callable[[SettingsT], Awaitable[ServiceApp]],
    settings: SettingsT,
    index: int,
    parent_pid: int,
) -> None:
    """One of RUNOPS_PROCESSES children (a fresh interpreter): its own loop, server and pools."""
    try:
        configure_logging(settings.log_level, settings.log_format)
        log.info("process starting", index=index, pid=os.getpid(), parent_pid=parent_pid)
        run_loop(_build_and_serve(build, settings, parent_pid=parent_pid), settings.event_loop)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


async def _build_and_serve(
    build: Callable[[SettingsT], Awaitable[ServiceApp]],
    settings: SettingsT,
    *,
    parent_pid: int | None = None,
) -> None:
    await serve(await build(settings), parent_pid=parent_pid)
