"""Telegram adapter on python-telegram-bot: `TelegramAdapter(settings, service)`."""

from bot.adapters.telegram.adapter import TelegramAdapter

__all__ = ["TelegramAdapter"]
