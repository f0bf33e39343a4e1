"""Settings from the environment and `.env` (every field is listed in `.env.example`)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ModelFormat = Literal["gptq", "awq", "gguf", "hf", "openai"]


class GenerationDefaults(BaseModel):
    """Sampling defaults of one model profile; temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.1


class ModelProfile(BaseModel):
    """One model the bot can serve: where it lives and how to run it."""

    name: str
    format: ModelFormat
    path: str | None = None  # local folder/file; relative paths are under MODELS_DIR
    hub_id: str | None = None
    gguf_file: str | None = None
    base_url: str | None = None  # format "openai"
    remote_model: str | None = None
    api_key: SecretStr | None = None
    tokenizer: str | None = None  # local tokenizer for counting (format "openai")
    context_length: int | None = None
    # GPTQModel kernel: auto (on a GPU: marlin, then exllama_v2, triton, torch as each fails), or one by name
    backend: str = "auto"
    generation: GenerationDefaults = Field(default_factory=GenerationDefaults)
    description: str = ""

    def resolved_path(self, models_dir: Path) -> Path | None:
        if self.path is None:
            return None
        p = Path(self.path).expanduser()
        return p if p.is_absolute() else models_dir / p


def embedded_profiles() -> list[ModelProfile]:
    """The three builds `python -m bot models prepare` makes from the SmolLM2 GGUF."""
    greedy = GenerationDefaults(max_new_tokens=256, temperature=0.3, top_p=0.9, repetition_penalty=1.1)
    return [
        ModelProfile(name="smollm2-gptq", format="gptq", path="smollm2-135m-gptq", generation=greedy,
                     description="SmolLM2-135M-Instruct, GPTQ 4-bit (Transformers)"),
        ModelProfile(name="smollm2-awq", format="awq", path="smollm2-135m-awq", generation=greedy,
                     description="SmolLM2-135M-Instruct, AWQ 4-bit GEMM (Transformers)"),
        ModelProfile(name="smollm2-gguf", format="gguf", path="smollm2-135m-gguf/SmolLM2-135M-Instruct.Q4_1.gguf",
                     generation=greedy, description="SmolLM2-135M-Instruct, GGUF Q4_1 (llama.cpp)"),
    ]


def is_embedded(profile: ModelProfile) -> bool:
    """One of the builds `models prepare` makes (not a MODELS_FILE profile of the same name)."""
    return any(profile == p for p in embedded_profiles())


def build_hint(profile: ModelProfile) -> str:
    """How to build an embedded profile's missing files, for people told it is not ready."""
    from bot.core.i18n import _

    return _("build it with `%(command)s`, then try again.") % {
        "command": f"python -m bot models prepare --only {profile.format}"}


def read_profiles(path: Path) -> list[ModelProfile]:
    """A MODELS_FILE's profiles; a mistake is one BotError line naming the file and the field.

    Pydantic's own message quotes the offending values (an API key among them), so only the
    field's location and what was expected are kept.
    """
    from bot.errors import BotError
    from bot.logs import register_secret

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BotError(f"MODELS_FILE {path}: cannot read it ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f"line {exc.lineno}, column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else \
            "not UTF-8 text"
        raise BotError(f"MODELS_FILE {path}: not valid JSON ({where})") from None
    if not isinstance(raw, list):
        raise BotError(f"MODELS_FILE {path}: should be a JSON list of model profiles, like "
                       '[{"name": "my-model", "format": "gptq", "path": "..."}]')
    profiles = []
    for i, entry in enumerate(raw, 1):
        try:
            profile = ModelProfile.model_validate(entry)
        except ValidationError as exc:
            error = exc.errors(include_input=False, include_url=False)[0]
            field = ".".join(str(part) for part in error["loc"]) or "(the whole entry)"
            name = entry.get("name") if isinstance(entry, dict) else None
            label = f"profile {i}" + (f" ({name!r})" if isinstance(name, str) and len(name) <= 64 else "")
            raise BotError(f"MODELS_FILE {path}: {label}, field {field!r}: {error['msg']}") from None
        if profile.api_key is not None:
            register_secret(profile.api_key.get_secret_value())
        profiles.append(profile)
    return profiles


def _csv(value: object) -> object:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


CsvList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # --- models ---
    models_dir: Path = Path("~/.cache/quantbot/models").expanduser()
    default_model: str = "smollm2-gptq"
    models_file: Path | None = None  # JSON list of extra ModelProfile objects
    include_embedded_models: bool = True  # offer the smollm2-* builds alongside MODELS_FILE's
    max_new_tokens: int | None = None  # overrides every profile when set
    temperature: float | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    torch_threads: int | None = None  # torch and llama.cpp threads; unset: torch picks, llama.cpp every core (<= 8)
    torch_compile: Literal["auto", "on", "off"] = "auto"  # compile the Transformers decode step; auto = on CPU
    max_context: int = 8192  # caps every model's context (KV cache) whatever the model or profile declares
    # replies a local Transformers model decodes at once (continuous batching); the terminal chat uses 1
    max_batch: int = Field(8, ge=1, le=64)
    # tokens of finished replies kept (their KV) for prompts that start the same way: a chat's next turn, the
    # system prompt; at most a quarter of the KV cache budget; 0: none
    prefix_cache_tokens: int = Field(4096, ge=0)
    # QUANTBOT_CPU_KERNELS=off: torch's int4 kernel and the 16-bit head instead of ours (a fallback, comparisons)
    cpu_kernels: Literal["on", "off"] = Field(
        "on", validation_alias=AliasChoices("quantbot_cpu_kernels", "cpu_kernels"))

    # --- core ---
    database_url: str = "sqlite+aiosqlite:///data/quantbot.db"
    system_prompt: str = "You are a helpful, concise assistant."
    personas_file: Path | None = None  # JSON list of {name, prompt, description}; unset: bot/data/personas.json
    queue_max: int = 32  # waiting requests across all chats; more get "busy, try again"
    reply_timeout_s: float = 300.0  # the whole reply: building the prompt and generating
    user_max_waiting: int = 1  # waiting requests (replies, model switches) per user across all their chats
    user_max_running: int = 1  # replies generating at once per user (matters when the engine runs several)
    partial_save_s: float = 3.0  # a streaming reply's text so far is stored this often (survives kill -9)
    delivery_retry_s: float = 300.0  # how long a reply that cannot reach the chat (network, 5xx) is retried
    log_level: str = "WARNING"
    # The language of everything the bot writes ("zh" or "en"; like GNU gettext's LANGUAGE, "zh_CN:en" lists
    # several, the first available wins). Unset: each person's own (Telegram language, Discord locale).
    language: str = ""
    log_json: bool = False

    # --- health and metrics (bot/metrics.py) ---
    metrics_port: int | None = Field(None, ge=1, le=65535)  # serve /healthz and /metrics on it; unset: off
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 lets another machine or container (Prometheus) reach it

    # --- access (platform user ids / chat ids; empty = everyone allowed) ---
    allowed_users: CsvList = Field(default_factory=list)
    allowed_chats: CsvList = Field(default_factory=list)
    admin_users: CsvList = Field(default_factory=list)

    # --- telegram ---
    telegram_bot_token: SecretStr | None = None
    telegram_api_base_url: str = "https://api.telegram.org/bot"
    telegram_edit_interval_private_s: float = 1.0
    telegram_edit_interval_group_s: float = 3.0
    telegram_drafts: Literal["auto", "off"] = "auto"  # private chats stream with sendMessageDraft (Bot API 9.5+)

    # --- discord ---
    discord_bot_token: SecretStr | None = None
    discord_guild_ids: CsvList = Field(default_factory=list)
    discord_allowed_roles: CsvList = Field(default_factory=list)
    discord_allowed_channels: CsvList = Field(default_factory=list)
    discord_edit_interval_s: float = 1.0

    # --- remote engine ---
    remote_concurrency: int = 4
    remote_extra_sampling: bool = True  # send repetition_penalty/repeat_penalty (vLLM, TGI, llama.cpp, Ollama)

    _csv_fields = field_validator(
        "allowed_users", "allowed_chats", "admin_users", "discord_guild_ids",
        "discord_allowed_roles", "discord_allowed_channels", mode="before",
    )(_csv)

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        """`METRICS_PORT=` (as in .env.example) means off, not an invalid port."""
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def profiles_file(self) -> Path:
        """MODELS_FILE, or MODELS_DIR/profiles.json (where `models download` registers profiles)."""
        return Path(self.models_file).expanduser() if self.models_file else self.models_dir / "profiles.json"

    @cached_property
    def profiles(self) -> dict[str, ModelProfile]:
        """Embedded builds plus any from MODELS_FILE (same name overrides)."""
        found = {p.name: p for p in embedded_profiles()} if self.include_embedded_models else {}
        models_file = self.profiles_file
        if models_file.exists():
            for p in read_profiles(models_file):
                found[p.name] = p
        return found

    def profile_ready(self, profile: ModelProfile) -> bool:
        """False for an embedded build not built yet (MODELS_FILE profiles: their load says what is wrong)."""
        from bot.models.catalog import profile_files_present

        return not is_embedded(profile) or profile_files_present(profile, self.models_dir)

    def not_ready(self) -> frozenset[str]:
        """Names of the embedded builds not built yet (shown as such, refused by /model)."""
        return frozenset(n for n, p in self.profiles.items() if not self.profile_ready(p))

    def generation_for(self, profile: ModelProfile) -> GenerationDefaults:
        """A profile's sampling defaults with the global overrides applied."""
        overrides = {
            k: v for k, v in {
                "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "repetition_penalty": self.repetition_penalty,
            }.items() if v is not None
        }
        return profile.generation.model_copy(update=overrides)
