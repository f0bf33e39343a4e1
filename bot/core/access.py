"""Who may do what, and where: the access rules every adapter shares, written once.

Adapters only gather platform facts (the person's id, the chat and its parents, Discord role ids,
whether the chat is shared, whether the platform calls the person an administrator of it) and
hand them to `AccessPolicy.judge`; the service asks `switch_refusal`, `reset_refusal` and
`stop_refusal` before acting on a command. A refusal is the polite text to show, `None` means go.

The rules (settings are lists of platform ids; role *names* are not accepted, since anyone can
create a role with any name in a server of their own):
- Bot admins (ADMIN_USERS) may do everything, everywhere the bot is reachable.
- When ALLOWED_USERS, DISCORD_ALLOWED_ROLES and ALLOWED_CHATS are all empty, everyone may chat.
  Otherwise a person may chat when one of them names the person, one of their roles, or the
  chat (or the chat's parent: a thread's channel, a topic's group).
- DISCORD_ALLOWED_CHANNELS limits the places: a shared chat outside it is ignored; a private
  chat (a DM) counts as outside it unless the DM itself is listed or ALLOWED_USERS names the person.
- `/model NAME` switches the model for everyone: bot admins only. With no ADMIN_USERS nobody may
  switch from a chat (the terminal, which only the owner can reach, still may).
- In shared chats `/reset` erases everyone's history: chat administrators (as the platform says)
  and bot admins only. `/stop` stops the caller's own reply (one whose request holds a message of
  theirs, running or waiting), whatever else waits; with none of their own, a reply to someone else
  only a chat administrator or a bot admin may stop. Changing the system prompt or
  persona (`/system TEXT`, `/system reset`, `/persona NAME`) in a shared chat: the same as `/reset`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bot.core.i18n import N_, _

if TYPE_CHECKING:
    from bot.config import Settings
    from bot.core.messages import IncomingMessage

log = logging.getLogger(__name__)

# Commands whose decision needs the "is this person an administrator of this chat" fact; adapters
# ask their platform for it only then (Telegram: one getChatMember call).
CHAT_ADMIN_COMMANDS = frozenset({"reset", "stop", "system", "persona"})

SWITCH_ADMINS_ONLY = N_("Only admins can switch the model.")
SWITCH_NO_ADMINS = N_("Only admins can switch the model. No admins are configured, so switching from a chat is off. "
                      "The bot's owner can allow it by adding ADMIN_USERS=%(user_id)s (this is your user id) "
                      "to the bot's .env and restarting it.")
RESET_ADMINS_ONLY = N_("In a shared chat only its administrators can /reset: it erases everyone's history "
                       "here.")
PROMPT_ADMINS_ONLY = N_("In a shared chat only its administrators can change the system prompt or persona: "
                        "it changes the bot for everyone here.")
STOP_NOT_YOURS = N_("That reply answers someone else; only they or an administrator of this chat can /stop it.")


def id_set(values: Iterable[str]) -> frozenset[str]:
    return frozenset(v.strip() for v in values if v.strip())


@dataclass(frozen=True)
class Verdict:
    """What one person may do in one chat."""

    place_ok: bool  # the bot works here at all (otherwise a shared chat gets silence)
    allowed: bool  # may chat with the bot here
    admin: bool  # a bot admin (ADMIN_USERS)


class AccessPolicy:
    """The allowlists from the settings, and the one `judge` every adapter calls."""

    def __init__(self, settings: Settings) -> None:
        self.users = id_set(settings.allowed_users)
        self.chats = id_set(settings.allowed_chats)
        self.admins = id_set(settings.admin_users)
        self.places = id_set(settings.discord_allowed_channels)
        roles = id_set(settings.discord_allowed_roles)
        self.roles = frozenset(r for r in roles if r.isdigit())
        self._listed = bool(self.users or roles or self.chats)  # a list of role names still closes the door
        for ignored in sorted(roles - self.roles):
            log.warning("DISCORD_ALLOWED_ROLES: %r is not a role id and is ignored (a role name can be created "
                        "by anyone; in Discord: Server Settings -> Roles -> right-click -> Copy Role ID)", ignored)

    def judge(self, user_id: str, chat_ids: Iterable[str], *, shared: bool,
              role_ids: Iterable[str] = (), limit_places: bool = False) -> Verdict:
        """`chat_ids`: the chat and its parents; `limit_places`: DISCORD_ALLOWED_CHANNELS applies here."""
        chats = frozenset(chat_ids)
        admin = user_id in self.admins
        place_ok = not (limit_places and self.places) or bool(chats & self.places)
        if not place_ok and not shared:  # a DM is a place too: only for the people named in the lists
            place_ok = user_id in self.users or admin
        allowed = (admin or not self._listed or user_id in self.users or bool(frozenset(role_ids) & self.roles)
                   or bool(chats & self.chats))
        # A DM outside the places is refused politely (it is the person's own chat), not with silence.
        return Verdict(place_ok=place_ok or not shared, allowed=place_ok and allowed, admin=admin)


# --- decisions the service asks for -----------------------------------------------------------
def switch_refusal(msg: IncomingMessage, settings: Settings) -> str | None:
    """`/model NAME` changes the model for everyone: bot admins only."""
    if msg.is_admin:
        return None
    if not id_set(settings.admin_users):
        return _(SWITCH_NO_ADMINS) % {"user_id": msg.user_id}
    return _(SWITCH_ADMINS_ONLY)


def _moderator(msg: IncomingMessage) -> bool:
    return msg.is_admin or msg.is_chat_admin


def reset_refusal(msg: IncomingMessage) -> str | None:
    """`/reset` in a shared chat erases everyone's history: its administrators and bot admins only."""
    if not msg.is_group or _moderator(msg):
        return None
    return _(RESET_ADMINS_ONLY)


def prompt_refusal(msg: IncomingMessage) -> str | None:
    """Changing a shared chat's system prompt changes the bot for everyone: moderators only."""
    if not msg.is_group or _moderator(msg):
        return None
    return _(PROMPT_ADMINS_ONLY)


def stop_refusal(msg: IncomingMessage) -> str | None:
    """`/stop` of a reply that answers someone else (the caller's own is always theirs to stop)."""
    if not msg.is_group or _moderator(msg):
        return None
    return _(STOP_NOT_YOURS)


def wants_chat_admin_fact(command: str | None) -> bool:
    """Whether an adapter should ask its platform if the sender administers the chat."""
    return command in CHAT_ADMIN_COMMANDS
