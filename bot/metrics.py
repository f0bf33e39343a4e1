"""Health and metrics for the people who run the bot: `/healthz` and Prometheus `/metrics` on METRICS_PORT.

Served by a tiny aiohttp app inside the bot's own event loop (aiohttp comes with discord.py), not by
prometheus-client's server: that one runs in a thread of its own and serves nothing but the registry,
while `/healthz` and the gauges read the queue and the adapters, which belong to the event loop. Here
every read happens on that loop, so nothing needs a lock, and the server stops with the service.

Each service gets a `CollectorRegistry` of its own (not prometheus-client's global one), so several
services in one process, and tests, never see each other's counts.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from bot.core.messages import ReplyStatus
from bot.errors import BotError

if TYPE_CHECKING:
    from bot.config import Settings
    from bot.core.queue import Job, JobResult
    from bot.core.service import ChatService

log = logging.getLogger(__name__)

HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"
# Whole replies: a few words on a GPU up to the 300 s REPLY_TIMEOUT_S on a slow CPU.
REPLY_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
# Prompt processing until the first token: tens of ms on a GPU, seconds for a long prompt on a CPU.
FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
NO_MODEL = "no model is loaded (starting up, switching models, or none loads)"


class Connected(Protocol):
    """What /healthz asks of an adapter: is it connected to its platform right now?"""

    @property
    def connected(self) -> bool: ...


class BotMetrics(Collector):
    """One service's metrics and health.

    The queue reports each finished reply (`reply_finished`, its observer hook); the queue length, the
    loaded model and the adapters' connections are read when someone asks, so they are never stale.
    """

    def __init__(self, service: ChatService, adapters: Mapping[str, Connected]) -> None:
        self.service = service
        self.adapters = dict(adapters)
        self.registry = CollectorRegistry()
        self.replies = Counter("quantbot_replies", "Replies finished, by how they ended", ["status"],
                               registry=self.registry)
        for status in (ReplyStatus.COMPLETE, ReplyStatus.CANCELLED, ReplyStatus.FAILED):
            self.replies.labels(status.value)  # shown as 0 before the first one
        self.tokens = Counter("quantbot_generated_tokens", "Tokens generated in replies", registry=self.registry)
        self.reply_seconds = Histogram("quantbot_reply_seconds", "Time from a reply's start to its end",
                                       buckets=REPLY_BUCKETS, registry=self.registry)
        self.first_token_seconds = Histogram(
            "quantbot_time_to_first_token_seconds", "Time from the start of generation to the first token",
            buckets=FIRST_TOKEN_BUCKETS, registry=self.registry)
        Gauge("quantbot_queue_waiting", "Replies waiting for their turn", registry=self.registry) \
            .set_function(lambda: service.queue.waiting_count())
        self.registry.register(self)

    # --- what the queue reports ---------------------------------------------------------------
    def reply_finished(self, job: Job, result: JobResult) -> None:
        """Count a reply that ended (stored or not); never raises into the queue."""
        try:
            self.replies.labels(result.status.value).inc()
            self.tokens.inc(result.stats.completion_tokens)
            if job.started_at is not None:  # not for replies cancelled or refused while waiting
                self.reply_seconds.observe(time.monotonic() - job.started_at)
            if result.stats.first_token_s is not None:
                self.first_token_seconds.observe(result.stats.first_token_s)
        except Exception:  # noqa: BLE001 - a metrics bug must not cost anyone their reply
            log.warning("counting a reply failed", exc_info=True)

    # --- read when asked ----------------------------------------------------------------------
    @property
    def model_loaded(self) -> bool:
        engine = self.service.queue.engine
        return engine is not None and engine.loaded

    def describe(self) -> Iterable[Metric]:
        return self._families(read=False)

    def collect(self) -> Iterable[Metric]:
        return self._families(read=True)

    def _families(self, read: bool) -> list[Metric]:
        models = GaugeMetricFamily("quantbot_model_loaded", "1 for the model loaded now, 0 for the others",
                                   labels=["model"])
        adapters = GaugeMetricFamily("quantbot_adapter_connected", "1 while the adapter is connected to its platform",
                                     labels=["adapter"])
        if read:
            current = self.service.current_model if self.model_loaded else ""
            for name in self.service.model_names():
                models.add_metric([name], float(name == current))
            for name, adapter in self.adapters.items():
                adapters.add_metric([name], float(adapter.connected))
        return [models, adapters]

    def health(self) -> tuple[bool, dict[str, object]]:
        """(healthy, what /healthz says): a model is loaded and every configured adapter is connected."""
        connected = {name: adapter.connected for name, adapter in self.adapters.items()}
        problems = [] if self.model_loaded else [NO_MODEL]
        problems += [f"{name} is not connected" for name, up in connected.items() if not up]
        body: dict[str, object] = {"status": "unavailable" if problems else "ok",
                                   "model": self.service.current_model if self.model_loaded else None,
                                   "adapters": connected}
        if problems:
            body["reason"] = "; ".join(problems)
        return not problems, body

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The registry in the format the scraper asked for (Prometheus text unless it wants OpenMetrics)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class MetricsServer:
    """The HTTP endpoint: `/healthz` and `/metrics`, on the running event loop."""

    def __init__(self, metrics: BotMetrics, host: str, port: int) -> None:
        self.metrics = metrics
        self.host, self.port = host, port
        app = web.Application()
        app.router.add_get(HEALTH_PATH, self._healthz)
        app.router.add_get(METRICS_PATH, self._metrics)
        self._runner = web.AppRunner(app, access_log=None)  # a health check every few seconds is not news

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where it listens (host, port), as the sockets say."""
        return [tuple(a[:2]) for a in self._runner.addresses]

    async def start(self) -> None:
        """Listen, and become the queue's observer; a port in use is one clear BotError."""
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except OSError as exc:
            await self._runner.cleanup()
            raise BotError(f"cannot serve health and metrics on {self.host}:{self.port} "
                           f"(METRICS_HOST, METRICS_PORT): {exc.strerror or exc}") from None
        self.metrics.service.queue.observer = self.metrics
        log.info("health and metrics on %s%s and %s", self.url, HEALTH_PATH, METRICS_PATH)

    async def stop(self) -> None:
        if self.metrics.service.queue.observer is self.metrics:
            self.metrics.service.queue.observer = None
        await self._runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        healthy, body = self.metrics.health()
        return web.Response(status=200 if healthy else 503, text=json.dumps(body), content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        output, content_type = self.metrics.exposition(request.headers.get("Accept"))
        return web.Response(body=output, headers={"Content-Type": content_type})


async def start_metrics(settings: Settings, service: ChatService,
                        adapters: Mapping[str, Connected]) -> MetricsServer | None:
    """With METRICS_PORT set: count the service's replies and serve the endpoint (until `stop()`); else None."""
    if settings.metrics_port is None:
        return None
    server = MetricsServer(BotMetrics(service, adapters), settings.metrics_host, settings.metrics_port)
    await server.start()
    return server
