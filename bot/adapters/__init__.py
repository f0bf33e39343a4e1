"""Chat platform adapters (Telegram, Discord, terminal) and the helpers they share."""
