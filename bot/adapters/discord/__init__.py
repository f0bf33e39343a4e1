"""Discord adapter: slash commands, mentions and DMs, replies streamed by editing messages."""

from bot.adapters.discord.adapter import DiscordAdapter

__all__ = ["DiscordAdapter"]
