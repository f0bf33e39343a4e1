"""Errors whose message is meant for the person at the keyboard (no traceback)."""


class BotError(Exception):
    """A clear, user-presentable failure: bad config, missing files, unknown model."""
