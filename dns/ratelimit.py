"""Response rate limiting for DNS over UDP, per client address (``--dns-rate-limit``).

Off by default. In the spirit of BIND's RRL and CoreDNS' ratelimit plugin: each
client address has a token bucket of ``rate`` answers per second, holding at
most ``burst`` (a client may send that many at once after a pause). A query over
the limit is dropped, except every ``slip``-th one (the first included),
answered with an empty TC=1 reply (BIND's ``slip``, default 2).

Why drop and slip, not REFUSED: over UDP the source address can be forged, and
a limit exists mostly to stop the agent being used to flood a victim whose
address is forged (a reflection attack); any answer, REFUSED included, is
traffic sent to the victim, so most are dropped. The slipped TC=1 reply is
smaller than the query, and tells a real client behind that address to ask
again over TCP, which is never limited (a TCP client's address cannot be
forged, RFC 7766), so a real client is slowed, never cut off.

Pure logic: the caller passes the clock. ``check`` is on the hot path (one dict
lookup, a little arithmetic). Episodes (``LimitEpisode``) let the server log one
line when limiting starts and one when it has stopped for ``quiet`` seconds,
not one per dropped query.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from consulate.dns.wire import question_end

ANSWER, DROP, SLIP = "answer", "drop", "slip"
DEFAULT_SLIP = 2  # BIND's default: every second limited query gets a TC=1 reply
QUIET_SECONDS = 10.0  # no query limited for this long: the episode is over
MAX_CLIENTS = 65536  # buckets kept; beyond it the full (idle) ones are forgotten


class RateLimitError(ValueError):
    """The limit was given a value it cannot use; the message names the flag."""


@dataclass
class LimitEpisode:
    """A stretch of time during which queries were limited (any client)."""

    rate: float
    first_client: str
    started: float
    last: float
    limited: int = 0
    clients: set[str] = field(default_factory=set)


class ResponseRateLimit:
    """Per-client-address token buckets; ``check`` says what to do with a query."""

    def __init__(self, rate: float, *, burst: float | None = None, slip: int = DEFAULT_SLIP,
                 max_clients: int = MAX_CLIENTS) -> None:
        if not rate > 0:
            raise RateLimitError(f"--dns-rate-limit {rate} must be above 0 (answers per "
                                 "second per client address), or 0 to turn it off")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(self.rate, 1.0)
        if self.burst < 1:
            raise RateLimitError(f"burst {burst} must be at least 1 answer")
        if slip < 0:
            raise RateLimitError(f"slip {slip} must be 0 (drop every limited query) or more")
        self.slip = slip
        self.max_clients = max_clients
        self.limited = 0  # queries over the limit so far (dropped or slipped)
        self.episode: LimitEpisode | None = None
        # client -> [tokens, when they were counted, its queries limited so far]
        self._buckets: dict[str, list[float]] = {}

    def check(self, client: str, now: float) -> str:
        """ANSWER, DROP or SLIP (answer with an empty TC=1 reply) for one query."""
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._forget_idle(now)
            bucket = self._buckets[client] = [self.burst, now, 0.0]
        else:
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return ANSWER
        self._count_limited(client, now)
        limited_before = bucket[2]
        bucket[2] = limited_before + 1
        # The first limited query of a client slips, so one that is barely over
        # is told at once to come back over TCP.
        return SLIP if self.slip and limited_before % self.slip == 0 else DROP

    def episode_started(self) -> LimitEpisode | None:
        """The episode the last ``check`` started, if it started one (log it)."""
        episode = self.episode
        return episode if episode is not None and episode.limited == 1 else None

    def episode_over(self, now: float) -> LimitEpisode | None:
        """The running episode once ``quiet`` seconds passed with nothing limited
        (it is then closed: log it); None while it runs, or when none does."""
        episode = self.episode
        if episode is None or now - episode.last < QUIET_SECONDS:
            return None
        self.episode = None
        return episode

    def _count_limited(self, client: str, now: float) -> None:
        self.limited += 1
        episode = self.episode
        if episode is None or now - episode.last >= QUIET_SECONDS:
            episode = self.episode = LimitEpisode(self.rate, client, now, now)
        episode.limited += 1
        episode.last = now
        if len(episode.clients) < self.max_clients:
            episode.clients.add(client)

    def _forget_idle(self, now: float) -> None:
        """Drop the buckets that have refilled (their clients are under the limit,
        forgetting them changes nothing); if none has, drop them all: a flood
        from that many addresses is forged, and memory must stay bounded."""
        full = [c for c, (tokens, at, _) in self._buckets.items()
                if tokens + (now - at) * self.rate >= self.burst]
        for client in full:
            del self._buckets[client]
        if len(self._buckets) >= self.max_clients:
            self._buckets.clear()


def slip_reply(query: bytes) -> bytes | None:
    """The slipped reply to ``query``, built from its bytes (a flood must not cost a
    parse per query): its ID, opcode and RD, QR and TC set, NOERROR, its question
    and no records. None for what is no one-question query (short, or QR=1:
    answering a response could loop between two servers)."""
    if len(query) < 12 or query[2] & 0x80 or query[4:6] != b"\x00\x01":
        return None
    end = question_end(query)
    if end is None:
        return None
    flags = 0x8000 | (query[2] & 0x79) << 8 | 0x0200  # QR, opcode and RD kept, TC
    return query[:2] + flags.to_bytes(2, "big") + b"\x00\x01" + bytes(6) + query[12:end]


def started_line(episode: LimitEpisode) -> str:
    return (f"event=limit-reached limit=dns_rate_limit value={episode.rate:g} "
            f"client={episode.first_client} action=drop")


def over_line(episode: LimitEpisode) -> str:
    return (f"event=limit-cleared limit=dns_rate_limit value={episode.rate:g} "
            f"refused={episode.limited} clients={len(episode.clients)} "
            f"seconds={episode.last - episode.started:.3f}")
