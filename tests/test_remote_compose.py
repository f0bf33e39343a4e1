"""docker-compose.yml validates with the real compose CLI, and wires what the README promises.

No container engine runs in CI, so images are not built; `compose config` parses, validates and
interpolates the file exactly as `up` would. Uses `docker compose` (v2 plugin) when present, else
Debian's `docker-compose` (v1.29, which `.ci/run` installs).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


COMPOSE = _compose_cli()
pytestmark = pytest.mark.skipif(COMPOSE is None, reason="no docker compose CLI (apt-get install docker-compose)")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The compose files in a folder of their own, with a user's .env (compose requires env_file)."""
    for name in ("docker-compose.yml", "docker-compose.gpu.yml", "Dockerfile", ".dockerignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / ".env").write_text(
        "TELEGRAM_BOT_TOKEN=123456:test-token-not-real\n"
        "DATABASE_URL=postgresql+asyncpg://quantbot:pw@postgres:5432/quantbot\n"
        "POSTGRES_PASSWORD=pw\n"
    )
    return tmp_path


def compose(project: Path, *args: str, env: dict[str, str] | None = None) -> str:
    assert COMPOSE is not None
    import os

    result = subprocess.run([*COMPOSE, "--project-directory", str(project), "-f", str(project / "docker-compose.yml"),
                             *args], capture_output=True, text=True, cwd=project,
                            env={**{k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")},
                                 **(env or {})}, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def parsed(out: str) -> dict:
    import yaml  # PyYAML comes with accelerate/transformers

    data = yaml.safe_load(out)
    assert isinstance(data, dict)
    return data


def test_compose_config_validates_and_runs_only_the_bot_by_default(project: Path) -> None:
    cfg = parsed(compose(project, "config"))
    bot = cfg["services"]["bot"]
    assert bot["image"] == "quantbot:cpu" and bot["build"]["args"]["VARIANT"] == "cpu"  # CPU image by default
    assert {v.split(":")[1] for v in bot["volumes"]} == {"/models", "/data"}  # models and database volumes
    assert bot["environment"]["TELEGRAM_BOT_TOKEN"] == "123456:test-token-not-real"  # .env is the env_file
    assert "profiles" not in bot
    # vLLM and PostgreSQL only start when their profile is asked for
    assert cfg["services"]["postgres"]["profiles"] == ["postgres"]
    assert cfg["services"]["vllm"]["profiles"] == ["vllm"]


def test_compose_profiles_add_postgres_and_vllm_wired_to_the_bot(project: Path) -> None:
    cfg = parsed(compose(project, "--profile", "postgres", "--profile", "vllm", "config"))
    assert set(cfg["services"]) == {"bot", "postgres", "vllm"}
    bot, pg, vllm = (cfg["services"][n] for n in ("bot", "postgres", "vllm"))
    # the bot reaches PostgreSQL by service name with the password both sides read from .env
    assert bot["environment"]["DATABASE_URL"] == "postgresql+asyncpg://quantbot:pw@postgres:5432/quantbot"
    assert pg["environment"]["POSTGRES_PASSWORD"] == "pw" and pg["environment"]["POSTGRES_USER"] == "quantbot"
    assert any(v.startswith("pgdata:") for v in pg["volumes"])
    # vLLM reserves a GPU and reads the same models volume the bot downloads into
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert any(v.startswith("models:/models") for v in vllm["volumes"])
    assert "--served-model-name" in vllm["command"]


def test_compose_without_postgres_keeps_sqlite_on_the_data_volume(project: Path) -> None:
    (project / ".env").write_text("TELEGRAM_BOT_TOKEN=\n")
    cfg = parsed(compose(project, "config"))
    assert cfg["services"]["bot"]["environment"]["DATABASE_URL"] == "sqlite+aiosqlite:////data/quantbot.db"


def test_gpu_override_builds_the_cuda_variant_with_a_gpu_reservation(project: Path) -> None:
    cfg = parsed(compose(project, "-f", str(project / "docker-compose.gpu.yml"), "config"))
    bot = cfg["services"]["bot"]
    assert bot["image"] == "quantbot:cuda" and bot["build"]["args"]["VARIANT"] == "cuda"
    assert bot["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_compose_config_rejects_a_broken_file(project: Path) -> None:
    """The check can fail: an invalid key is reported, so the tests above do mean something."""
    broken = (project / "docker-compose.yml").read_text().replace("restart: unless-stopped", "restart: [oops]", 1)
    (project / "docker-compose.yml").write_text(broken)
    assert COMPOSE is not None
    result = subprocess.run([*COMPOSE, "-f", str(project / "docker-compose.yml"), "config"], capture_output=True,
                            text=True, cwd=project, timeout=60)
    assert result.returncode != 0
