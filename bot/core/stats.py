"""`/stats`: what a chat has used (from the database) and, for admins, the bot since it started.

The bot's totals live in memory only: they describe this process (replies by status, how long
requests waited in the queue, generation speed), and start again at zero after a restart.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from bot.core.i18n import N_, _
from bot.core.messages import MessageStatus

WAIT_SAMPLES = 10_000  # newest queue waits kept for the percentiles
STATUS_WORDS = {  # how /stats names the replies' statuses
    MessageStatus.COMPLETE: N_("complete"), MessageStatus.CANCELLED: N_("cancelled"),
    MessageStatus.FAILED: N_("failed"), MessageStatus.INCOMPLETE: N_("incomplete"),
    MessageStatus.PENDING: N_("pending"), MessageStatus.REJECTED: N_("rejected"),
    MessageStatus.SUPERSEDED: N_("superseded"),
}


@dataclass(frozen=True)
class ChatUsage:
    """One chat's stored history, summed: the rows say it all, so it survives restarts."""

    user_messages: int
    replies: int
    tokens_in: int  # of the people's messages, by the model's tokenizer when they were answered
    tokens_out: int  # of the bot's replies
    generation_s: float  # time spent writing the complete replies
    tokens_out_complete: int = 0  # of those complete replies (the speed's numerator)

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens_out_complete / self.generation_s if self.generation_s > 0 else None


def percentile(values: Sequence[float], share: float) -> float | None:
    """Nearest-rank percentile (`share` in 0..1) of `values`; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


@dataclass
class BotStats:
    """This process's totals, fed by the service as replies start and end."""

    started: float = field(default_factory=time.monotonic)
    by_status: Counter[str] = field(default_factory=Counter)
    waits: deque[float] = field(default_factory=lambda: deque(maxlen=WAIT_SAMPLES))
    tokens_in: int = 0  # prompt tokens the engine read
    tokens_out: int = 0
    generation_s: float = 0.0  # of the replies that produced tokens

    def waited(self, seconds: float) -> None:
        self.waits.append(max(0.0, seconds))

    def finished(self, status: MessageStatus, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        self.by_status[status.value] += 1
        self.tokens_in += prompt_tokens
        if completion_tokens and seconds > 0:
            self.tokens_out += completion_tokens
            self.generation_s += seconds


def _speed(tokens_per_s: float | None) -> str:
    return _("%(speed).1f tokens/s") % {"speed": tokens_per_s} if tokens_per_s else _("not measured yet")


def chat_text(usage: ChatUsage) -> str:
    return (_("This chat:") + "\n  "
            + _("messages: %(people)s from people, %(replies)s replies")
            % {"people": usage.user_messages, "replies": usage.replies} + "\n  "
            + _("tokens: %(tokens_in)s in, %(tokens_out)s out") % {"tokens_in": usage.tokens_in,
                                                                  "tokens_out": usage.tokens_out} + "\n  "
            + _("average speed: %(speed)s") % {"speed": _speed(usage.tokens_per_s)})


def bot_text(stats: BotStats, model: str) -> str:
    uptime = time.monotonic() - stats.started
    statuses = ", ".join(f"{n} {_(STATUS_WORDS.get(MessageStatus(s), s))}" for s, n in sorted(stats.by_status.items()))
    statuses = statuses or _("none yet")
    p50, p95 = percentile(stats.waits, 0.5), percentile(stats.waits, 0.95)
    waits = (_("p50 %(p50).1f s, p95 %(p95).1f s") % {"p50": p50, "p95": p95} if p50 is not None and p95 is not None
             else _("no requests yet"))
    speed = stats.tokens_out / stats.generation_s if stats.generation_s else None
    return (_("The bot since it started %(uptime)s ago:") % {"uptime": _duration(uptime)} + "\n  "
            + _("replies: %(statuses)s") % {"statuses": statuses} + "\n  "
            + _("queue wait: %(waits)s") % {"waits": waits} + "\n  "
            + _("tokens: %(tokens_in)s in, %(tokens_out)s out; speed %(speed)s")
            % {"tokens_in": stats.tokens_in, "tokens_out": stats.tokens_out, "speed": _speed(speed)} + "\n  "
            + _("model: %(model)s") % {"model": model or _("none loaded")})


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return _("%(hours)s h %(minutes)s min") % {"hours": hours, "minutes": minutes}
    if minutes:
        return _("%(minutes)s min %(seconds)s s") % {"minutes": minutes, "seconds": secs}
    return _("%(seconds)s s") % {"seconds": secs}


def usage_of(rows: Iterable[tuple[str, str, int | None, float | None]]) -> ChatUsage:
    """(role, status, token_count, seconds the row took to write) per stored message -> the chat's sums."""
    users = replies = tokens_in = tokens_out = complete_out = 0
    seconds = 0.0
    for role, status, tokens, took in rows:
        if role == "user":
            users += 1
            tokens_in += tokens or 0
            continue
        tokens_out += tokens or 0
        if status == MessageStatus.COMPLETE.value:
            replies += 1
            if tokens and took and took > 0:
                complete_out += tokens
                seconds += took
    return ChatUsage(users, replies, tokens_in, tokens_out, seconds, complete_out)
