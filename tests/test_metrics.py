"""Health and metrics (METRICS_PORT): the real bot, the real adapters and HTTP, platform fakes outside."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from telegram.error import InvalidToken

from bot.adapters.telegram import TelegramAdapter
from bot.app import run
from bot.core.service import ChatService
from bot.errors import BotError
from bot.metrics import NO_MODEL, MetricsServer, start_metrics
from tests.conftest import ToyEngines, toy_settings
from tests.fakes.telegram_api import FakeTelegram
from tests.test_discord_adapter import discord_world  # noqa: F401 - the fixture
from tests.test_remote_compose import COMPOSE, compose, parsed, project  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parents[1]
ALICE = 1001
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, str, str]:
    """(status, content type, body) of one GET."""
    async with aiohttp.ClientSession() as http, http.get(f"http://{host}:{port}{path}",
                                                         timeout=aiohttp.ClientTimeout(total=5)) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def health(port: int) -> tuple[int, dict[str, Any]]:
    status, content_type, body = await get(port, "/healthz")
    assert content_type.startswith("application/json")
    return status, json.loads(body)


async def scrape(port: int) -> Samples:
    """Every sample of /metrics, by name and labels, parsed with prometheus-client's own parser."""
    status, content_type, body = await get(port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


async def until_served(port: int, timeout: float = 15.0) -> tuple[int, dict[str, Any]]:
    """The first /healthz answer once the port listens."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        try:
            return await health(port)
        except aiohttp.ClientConnectionError:
            if loop.time() > end:
                raise
            await asyncio.sleep(0.02)


async def until_health(port: int, wanted: int, timeout: float = 15.0) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while (answer := await health(port))[0] != wanted:
        if loop.time() > end:
            raise AssertionError(f"/healthz never answered {wanted}; last: {answer}")
        await asyncio.sleep(0.05)
    return answer[1]


def lan_address() -> str | None:
    """This machine's address on its network (not loopback), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # picks the outgoing interface; sends nothing
            address = str(s.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


async def test_bot_run_serves_health_and_metrics_that_count_a_telegram_reply(tmp_path: Path) -> None:
    port = free_port()
    async with FakeTelegram() as fake:
        settings = toy_settings(tmp_path, telegram_bot_token=fake.token, telegram_api_base_url=fake.base_url,
                                telegram_edit_interval_private_s=0.05, metrics_port=port)
        service = ChatService(settings, engine_factory=ToyEngines(delay_s=0.01, load_s=1.5))
        stop = asyncio.Event()
        bot = asyncio.create_task(run(settings, stop, service))
        try:
            status, early = await until_served(port)
            assert status == 503 and NO_MODEL in early["reason"]  # up while the model loads, and says so
            assert early["model"] is None
            assert (await until_health(port, 200)) == {"status": "ok", "model": "toy-a", "adapters": {"telegram": True}}
            before = await scrape(port)
            assert before[("quantbot_replies_total", (("status", "complete"),))] == 0

            await fake.user_says("how are the metrics today")
            answer = "You said: how are the metrics today (turn 1)"
            await fake.wait_for(lambda: [m.text for m in fake.bot_messages(ALICE)] == [answer])

            assert (await health(port)) == (200, {"status": "ok", "model": "toy-a", "adapters": {"telegram": True}})
            after = await scrape(port)
            assert after[("quantbot_replies_total", (("status", "complete"),))] == 1
            assert after[("quantbot_replies_total", (("status", "failed"),))] == 0
            assert after[("quantbot_generated_tokens_total", ())] == len(answer.split())  # a toy token is a word
            assert after[("quantbot_reply_seconds_count", ())] == 1
            assert after[("quantbot_reply_seconds_sum", ())] > 0
            assert after[("quantbot_time_to_first_token_seconds_count", ())] == 1
            assert after[("quantbot_queue_waiting", ())] == 0
            assert after[("quantbot_model_loaded", (("model", "toy-a"),))] == 1
            assert after[("quantbot_model_loaded", (("model", "toy-b"),))] == 0
            assert after[("quantbot_adapter_connected", (("adapter", "telegram"),))] == 1
        finally:
            stop.set()
            assert await asyncio.wait_for(bot, 30) == 0
    with pytest.raises(aiohttp.ClientConnectionError):  # stopped with the bot
        await health(port)


async def test_healthz_is_503_when_telegram_refuses_the_token_while_running(make_toy_service: Any) -> None:
    async with FakeTelegram() as fake:
        port = free_port()
        async with make_toy_service(telegram_bot_token=fake.token, telegram_api_base_url=fake.base_url,
                                    metrics_port=port) as service:
            adapter = TelegramAdapter(service.settings, service, poll_timeout=1)
            server = await start_metrics(service.settings, service, {"telegram": adapter})
            assert server is not None
            try:
                status, body = await health(port)
                assert status == 503 and body["reason"] == "telegram is not connected"  # not polling yet
                await adapter.start()
                await until_health(port, 200)
                fake.token = "123456:revoked-in-botfather"  # every call of the old token now gets 401
                body = await until_health(port, 503)
                assert body["reason"] == "telegram is not connected" and body["adapters"] == {"telegram": False}
                assert body["model"] == "toy-a"  # the model is fine: the reason names what is not
                assert (await scrape(port))[("quantbot_adapter_connected", (("adapter", "telegram"),))] == 0
            finally:
                await server.stop()
                with contextlib.suppress(InvalidToken):  # PTB's dead polling task re-raises it at stop
                    await adapter.stop()


async def test_healthz_is_503_when_discord_closes_the_gateway_for_good(discord_world: Any) -> None:  # noqa: F811
    async with discord_world() as w:
        port = free_port()
        settings = w.service.settings.model_copy(update={"metrics_port": port})
        server = await start_metrics(settings, w.service, {"discord": w.adapter})
        assert server is not None
        try:
            assert (await health(port)) == (200, {"status": "ok", "model": "toy-a", "adapters": {"discord": True}})
            await w.fake.close_gateway(4004, "Authentication failed.")  # the token was reset in the portal
            body = await until_health(port, 503)
            assert body["reason"] == "discord is not connected"
        finally:
            await server.stop()


async def test_healthz_is_503_while_no_model_is_loaded_and_200_after(tmp_path: Path) -> None:
    port = free_port()
    service = ChatService(toy_settings(tmp_path, metrics_port=port), engine_factory=ToyEngines())
    server = await start_metrics(service.settings, service, {})
    assert server is not None
    try:
        status, body = await health(port)
        assert status == 503 and body == {"status": "unavailable", "model": None, "adapters": {}, "reason": NO_MODEL}
        samples = await scrape(port)
        assert samples[("quantbot_model_loaded", (("model", "toy-a"),))] == 0
        await service.start()
        assert (await health(port)) == (200, {"status": "ok", "model": "toy-a", "adapters": {}})
    finally:
        await server.stop()
        await service.close()


async def test_metrics_listen_on_loopback_only_unless_metrics_host_says_otherwise(tmp_path: Path) -> None:
    service = ChatService(toy_settings(tmp_path), engine_factory=ToyEngines())
    lan = lan_address()
    for host, outside in (("127.0.0.1", False), ("0.0.0.0", True)):
        port = free_port()
        overrides = {"metrics_port": port} if host == "127.0.0.1" else {"metrics_port": port, "metrics_host": host}
        server = await start_metrics(toy_settings(tmp_path, **overrides), service, {})
        assert server is not None
        try:
            assert server.addresses == [(host, port)]
            assert (await get(port, "/healthz"))[0] == 503
            if lan is not None:  # from the network: refused unless METRICS_HOST opened it
                if outside:
                    assert (await get(port, "/healthz", host=lan))[0] == 503
                else:
                    with pytest.raises(aiohttp.ClientConnectionError):
                        await get(port, "/healthz", host=lan)
        finally:
            await server.stop()
    await service.close()


async def test_metrics_are_off_without_metrics_port_and_a_busy_port_is_one_clear_error(tmp_path: Path) -> None:
    service = ChatService(toy_settings(tmp_path), engine_factory=ToyEngines())
    assert await start_metrics(service.settings, service, {}) is None
    assert toy_settings(tmp_path, metrics_port="").metrics_port is None  # `METRICS_PORT=` in .env: off
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BotError, match=f"cannot serve health and metrics on 127.0.0.1:{port}.*METRICS_PORT"):
            await start_metrics(toy_settings(tmp_path, metrics_port=port), service, {})
    await service.close()


def _compose_bot(name: str) -> dict[str, Any]:
    data = yaml.safe_load((ROOT / name).read_text())
    return data["services"]["bot"]


async def _healthcheck_exit(test: list[str], port: int) -> int:
    """Run the compose healthcheck's command as Docker would (exec form), with this Python."""
    assert test[0] == "CMD" and test[1] == "python"
    env = {"METRICS_PORT": str(port), "PATH": "/usr/bin:/bin"}
    proc = await asyncio.create_subprocess_exec(sys.executable, *test[2:], env=env,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return await asyncio.wait_for(proc.wait(), 30)


async def test_compose_healthcheck_passes_only_when_healthz_says_ok(tmp_path: Path) -> None:
    bot = _compose_bot("docker-compose.yml")
    check = bot["healthcheck"]
    assert "/healthz" in " ".join(check["test"])
    assert "METRICS_PORT" in bot["environment"]

    port = free_port()
    service = ChatService(toy_settings(tmp_path, metrics_port=port), engine_factory=ToyEngines())
    server: MetricsServer | None = await start_metrics(service.settings, service, {})
    assert server is not None
    try:
        assert await _healthcheck_exit(check["test"], port) != 0  # 503: no model yet
        await service.start()
        assert await _healthcheck_exit(check["test"], port) == 0
    finally:
        await server.stop()
        await service.close()
    assert await _healthcheck_exit(check["test"], port) != 0  # nothing listening


@pytest.mark.skipif(COMPOSE is None, reason="no docker compose CLI")
def test_compose_runs_the_same_check_on_gpu_with_more_time_to_start(project: Path) -> None:  # noqa: F811
    cpu = parsed(compose(project, "config"))["services"]["bot"]
    gpu = parsed(compose(project, "-f", str(project / "docker-compose.gpu.yml"), "config"))["services"]["bot"]
    assert cpu["environment"]["METRICS_PORT"] == "9108"
    assert gpu["healthcheck"]["test"] == cpu["healthcheck"]["test"]
    assert gpu["healthcheck"]["start_period"] != cpu["healthcheck"]["start_period"]
