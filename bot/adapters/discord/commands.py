"""The slash commands: /chat, /help, /reset, /model and /persona (with autocomplete), /system, /retry, /stats, /stop."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands

from bot.core import i18n
from bot.core.i18n import N_, _

if TYPE_CHECKING:
    from bot.adapters.discord.adapter import DiscordAdapter

# --- tuning ---
MAX_CHOICES = 25  # Discord's limit for autocomplete results
CURRENT_MARK = N_("(current)")
NOT_READY_MARK = N_("(not ready)")
# Translated: descriptions (of commands, their options) and choices; never names, which Discord keeps ASCII here.
TRANSLATED = frozenset({app_commands.TranslationContextLocation.command_description,
                        app_commands.TranslationContextLocation.parameter_description,
                        app_commands.TranslationContextLocation.choice_name})


class CatalogueTranslator(app_commands.Translator):
    """discord.py's hook for localized command descriptions: our gettext catalogue, per Discord locale.

    With LANGUAGE set every locale gets that language (the base descriptions stay the English ids).
    """

    def __init__(self, forced: str = "") -> None:
        self.forced = forced

    async def translate(self, string: app_commands.locale_str, locale: discord.Locale,
                        context: app_commands.TranslationContext) -> str | None:
        language = i18n.pick(self.forced, locale.value)
        if context.location not in TRANSLATED or language == i18n.ENGLISH:
            return None
        found = i18n.translator(language).gettext(string.message)
        return found if found != string.message else None


def locale_of(interaction: discord.Interaction, forced: str = "") -> str:
    """The language to answer an interaction in: LANGUAGE, else the person's Discord client's."""
    return i18n.pick(forced, interaction.locale.value)

COMMAND_NAMES = ("chat", "help", "reset", "model", "stop", "system", "persona", "retry", "stats")


def model_choices(names: list[str], current: str, typed: str,
                  not_ready: frozenset[str] = frozenset()) -> list[app_commands.Choice[str]]:
    """Models whose name contains what was typed, the current one first and marked, unbuilt ones marked."""
    typed = typed.strip().lower()
    found = [n for n in names if typed in n.lower()]
    found.sort(key=lambda n: n != current)
    return [app_commands.Choice(name=n + (" " + _(CURRENT_MARK) if n == current
                                          else " " + _(NOT_READY_MARK) if n in not_ready else ""), value=n)
            for n in found[:MAX_CHOICES]]


def persona_choices(personas: dict[str, str], typed: str) -> list[app_commands.Choice[str]]:
    """Personas (name -> description) whose name contains what was typed, described."""
    typed = typed.strip().lower()
    return [app_commands.Choice(name=f"{n} - {d}"[:100] if d else n, value=n)
            for n, d in personas.items() if typed in n.lower()][:MAX_CHOICES]


def build_tree(client: discord.Client, adapter: DiscordAdapter) -> app_commands.CommandTree:
    """A command tree on `client` whose commands hand over to `adapter`."""
    tree = app_commands.CommandTree(client)

    @tree.command(name="chat", description=N_("Ask the model something; the answer streams in"))
    @app_commands.describe(prompt=N_("Your message to the model"))
    async def chat(interaction: discord.Interaction, prompt: str) -> None:
        await adapter.run_interaction(interaction, prompt, private=False)

    @tree.command(name="help", description=N_("List the commands"))
    async def help_(interaction: discord.Interaction) -> None:
        await adapter.run_interaction(interaction, "/help", private=True)

    @tree.command(name="reset", description=N_("Forget this conversation's history"))
    async def reset(interaction: discord.Interaction) -> None:
        await adapter.run_interaction(interaction, "/reset", private=True)

    @tree.command(name="model", description=N_("Show the models, or switch to another one"))
    @app_commands.describe(name=N_("The model to switch to (leave empty to list them)"))
    async def model(interaction: discord.Interaction, name: str | None = None) -> None:
        await adapter.run_interaction(interaction, f"/model {name}" if name else "/model", private=True)

    @model.autocomplete("name")
    async def model_autocomplete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        with i18n.using(locale_of(interaction, adapter.settings.language)):
            return model_choices(adapter.service.model_names(), adapter.service.current_model, current,
                                 adapter.service.settings.not_ready())

    @tree.command(name="stop", description=N_("Stop your running or waiting reply"))
    async def stop(interaction: discord.Interaction) -> None:
        await adapter.run_interaction(interaction, "/stop", private=True)

    @tree.command(name="system", description=N_("Show this chat's system prompt, or set it ('reset': the default)"))
    @app_commands.describe(text=N_("The new system prompt, or 'reset' (leave empty to show it)"))
    async def system(interaction: discord.Interaction, text: str | None = None) -> None:
        await adapter.run_interaction(interaction, f"/system {text}" if text else "/system", private=True)

    @tree.command(name="persona", description=N_("List the personas, or choose one for this chat"))
    @app_commands.describe(name=N_("The persona to choose (leave empty to list them)"))
    async def persona(interaction: discord.Interaction, name: str | None = None) -> None:
        await adapter.run_interaction(interaction, f"/persona {name}" if name else "/persona", private=True)

    @persona.autocomplete("name")
    async def persona_autocomplete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return persona_choices({p.name: p.description for p in adapter.service.personas.values()}, current)

    @tree.command(name="retry", description=N_("Write the last reply in this conversation again"))
    async def retry(interaction: discord.Interaction) -> None:
        await adapter.run_interaction(interaction, "/retry", private=False)

    @tree.command(name="stats", description=N_("What this conversation has used (admins: the whole bot too)"))
    async def stats(interaction: discord.Interaction) -> None:
        await adapter.run_interaction(interaction, "/stats", private=True)

    @tree.error
    async def on_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        await adapter.command_failed(interaction, error)

    return tree
