"""Who may talk to the bot on Discord, and where: users, roles, channels and admins from config.

Rules (settings are lists of ids; roles may also be given by name, case-insensitive):
- DISCORD_ALLOWED_CHANNELS, when set, limits the guild channels the bot works in; a thread counts
  as its parent channel too. DMs are not channels of a guild and are not limited by it.
- ALLOWED_USERS, DISCORD_ALLOWED_ROLES and ALLOWED_CHATS together say who may use the bot, as on
  Telegram: a person is allowed when ALLOWED_USERS names them, they have a listed role (a DM has
  no roles), or the DM/channel/thread (or a thread's parent) is in ALLOWED_CHATS. All three
  empty: everyone is allowed. (The generic lists may mix Telegram and Discord ids.)
- ADMIN_USERS are always allowed (in allowed channels); when it is empty everyone counts as admin.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import discord

from bot.config import Settings


@dataclass(frozen=True)
class Access:
    channel_ok: bool  # the bot works in this channel (otherwise: stay silent where possible)
    allowed: bool  # this person may use the bot here
    admin: bool


def _ids(values: Iterable[str]) -> set[str]:
    return {v.strip() for v in values if v.strip()}


def channel_ids(channel: object) -> set[str]:
    """The channel's id, plus the parent channel's for a thread."""
    ids = {str(getattr(channel, "id", ""))}
    parent = getattr(channel, "parent_id", None)
    if parent:
        ids.add(str(parent))
    return ids


def judge(settings: Settings, user: discord.abc.User, channel: object, in_guild: bool) -> Access:
    """Decide what `user` may do in `channel` (a guild channel or thread when `in_guild`)."""
    user_id = str(user.id)
    admins = _ids(settings.admin_users)
    is_admin = not admins or user_id in admins

    allowed_channels = _ids(settings.discord_allowed_channels)
    channel_ok = not in_guild or not allowed_channels or bool(channel_ids(channel) & allowed_channels)

    users = _ids(settings.allowed_users)
    roles = {r.lower() for r in _ids(settings.discord_allowed_roles)}
    chats = _ids(settings.allowed_chats)
    if not users and not roles and not chats:
        allowed = True
    else:
        member_roles = getattr(user, "roles", []) if in_guild else []
        has_role = any(str(r.id) in roles or r.name.lower() in roles for r in member_roles)
        allowed = user_id in users or has_role or bool(channel_ids(channel) & chats)
    allowed = allowed or (bool(admins) and user_id in admins)
    return Access(channel_ok=channel_ok, allowed=channel_ok and allowed, admin=is_admin)
