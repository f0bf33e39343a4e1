"""The Discord facts the shared access rules (`bot.core.access`) decide on.

- the chat: the channel's id, plus the parent channel's for a thread;
- roles by id: a guild member's roles; in a DM, the person's roles in the servers that own the
  roles DISCORD_ALLOWED_ROLES lists (fetched from Discord), so a DM is judged like a channel;
- chat administrator: the Manage Messages permission in that channel.
"""

from __future__ import annotations

import logging

import discord

from bot.core.access import AccessPolicy, Verdict

log = logging.getLogger(__name__)


def channel_ids(channel: object) -> set[str]:
    """The channel's id, plus the parent channel's for a thread."""
    ids = {str(getattr(channel, "id", ""))}
    parent = getattr(channel, "parent_id", None)
    if parent:
        ids.add(str(parent))
    return ids


async def _dm_role_ids(client: discord.Client, policy: AccessPolicy, user_id: int) -> set[str]:
    """The person's roles in the servers owning a listed role (a DM carries no roles itself)."""
    found: set[str] = set()
    for guild in client.guilds:
        if not any(guild.get_role(int(r)) for r in policy.roles):
            continue
        member = guild.get_member(user_id)
        if member is None:
            try:
                member = await guild.fetch_member(user_id)
            except discord.NotFound:  # not in that server
                continue
            except discord.HTTPException as exc:
                log.warning("Discord: could not look up a member's roles: %s", exc)
                continue
        found.update(str(r.id) for r in member.roles)
    return found


async def judge(policy: AccessPolicy, client: discord.Client, user: discord.abc.User,
                channel: object, in_guild: bool) -> Verdict:
    """What `user` may do in `channel` (a guild channel or thread when `in_guild`, else a DM)."""
    if in_guild:
        roles = {str(r.id) for r in getattr(user, "roles", [])}
    elif policy.roles and str(user.id) not in policy.users:
        roles = await _dm_role_ids(client, policy, user.id)
    else:
        roles = set()
    return policy.judge(str(user.id), channel_ids(channel), shared=in_guild, role_ids=roles, limit_places=True)


def manages_messages(channel: object, user: object) -> bool:
    """Manage Messages in this channel: Discord's mark of a channel moderator."""
    permissions_for = getattr(channel, "permissions_for", None)
    if permissions_for is None or not isinstance(user, discord.Member):
        return False
    return bool(permissions_for(user).manage_messages)
