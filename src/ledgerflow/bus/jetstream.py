"""The event bus on NATS JetStream (nats-py).

Messages are stored in one JetStream stream (``LEDGERFLOW`` by default, over the
subjects ``ledgerflow.>``), with the ledger event's id as ``Nats-Msg-Id``: JetStream
drops a message whose id it stored within its duplicate window, so a relay that
publishes a batch again after a crash stores nothing twice.

Each ledger stream's messages keep their order. By default (``pipelined``) a batch
goes out on a connection of the bus's own that never reconnects, without waiting for
each acknowledgement (they come back to one subscription, named by the message's
index in the batch): when that socket breaks, the later messages are lost with it
(TCP keeps their order, and nothing buffered is sent again on a new socket), so what
the server stored of each stream is a prefix; the rest then go one at a time on the
main connection, and the server drops what it has already. (nats-py's reconnecting
connection does send its buffer again after a reconnection, which can store a later
message before an earlier one the server lost: the broker-outage test caught that
with a first version.) ``pipelined=False`` waits for each acknowledgement before the
next message of a stream: slower, and order holds even if the server refused a single
message and accepted the next. A message over the server's ``max_payload`` or the
stream's ``max_msg_size`` is not sent, nor anything after it of its key
(``MessageTooLargeError``).

Consumers are durable pull consumers, acknowledged when their handler returns and
delivered again (``nak``, after a pause that doubles) when it raises; the fetched
messages not yet handled are kept in progress meanwhile. Headers that carry ledger
names are percent-encoded on the wire (``port.header_value``) and decoded here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from .._waiting import cancel_and_wait
from ..errors import BusUnavailableError, ConfigurationError
from .port import (
    MSG_ID,
    Delivery,
    Handler,
    Message,
    MessageRefusedError,
    MessageTooLargeError,
    Subscription,
    deliver,
    encoded,
    header_text,
    log_failed,
    log_given_up,
    redelivery_delay,
    subject_matches,
    wire_headers,
    wire_size,
)

__all__ = ["JetStreamBus"]

log = logging.getLogger("ledgerflow.bus")

PING_INTERVAL = 10
"""Seconds between the pings that tell a live server from a vanished one."""
MAX_OUTSTANDING_PINGS = 3

EXPECTED_STREAM = "Nats-Expected-Stream"

FETCH = 64
"""Messages a consumer fetches at once (kept in progress until handled)."""

# JetStream's error codes for a message refused for what it is: sent again, it is
# refused again until the stream's configuration changes.
_TOO_LARGE = 10054  # JSStreamMessageExceedsMaximumErr: over the stream's max_msg_size
_HEADER_TOO_LARGE = 10097  # JSStreamHeaderExceedsMaximumErr

# What JetStream and nats-py refuse in a stream's name; and a subject's tokens.
_NOT_IN_NAME = frozenset(">*. /\\\t\r\n")


def check_names(stream: str, subjects: Sequence[str]) -> None:
    """``ConfigurationError`` for a stream name or subject JetStream can never take:
    said at once rather than retried as if the broker were down."""
    if not stream or not stream.isprintable() or any(c in _NOT_IN_NAME for c in stream):
        raise ConfigurationError(
            f"stream name {stream!r}: JetStream takes no empty name, no spaces or control "
            "characters, and none of . * > / or a backslash"
        )
    if not subjects:
        raise ConfigurationError(f"stream {stream!r}: no subjects")
    for subject in subjects:
        tokens = subject.split(".")
        wrong = (
            not subject.isprintable()
            or any(not t or any(c.isspace() for c in t) for t in tokens)
            or any(("*" in t and t != "*") or (">" in t and t != ">") for t in tokens)
            or ">" in tokens[:-1]
            or all(t in "*>" for t in tokens)
        )
        if wrong:
            raise ConfigurationError(
                f"stream {stream!r}: subject {subject!r} is no NATS subject a stream can "
                "take (tokens between dots, not empty, no spaces; wildcards * and a last > "
                "after at least one literal token)"
            )


class JetStreamBus:
    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        stream: str = "LEDGERFLOW",
        subjects: Sequence[str] = ("ledgerflow.>",),
        duplicate_window: timedelta = timedelta(minutes=2),
        timeout: float = 5.0,
        redelivery_delay: float = 0.5,
        pipelined: bool = True,
    ) -> None:
        check_names(stream, list(subjects))
        self.url = url
        self.stream = stream
        self.subjects = list(subjects)
        self.duplicate_window = duplicate_window
        self.timeout = timeout
        self.redelivery_delay = redelivery_delay
        self.pipelined = pipelined
        """Send a ledger stream's messages without waiting for each acknowledgement
        (faster for one busy stream; the module docstring says how order holds)."""
        self._nc: Any = None
        self._js: Any = None
        self._consumers: list[_PullConsumer] = []
        self._pub: Any = None
        self._pub_lock = asyncio.Lock()
        self._closing = False
        self._said: tuple[str, float] = ("", 0.0)  # the last error logged, and when
        self._stream_max: int | None = None  # the stream's max_msg_size, when it has one
        # Set once the stream is checked (its limits read): a relay started before
        # the broker answered published on an open connection meanwhile, over limits
        # it did not know yet.
        self._ready = False

    def _limits(self) -> list[tuple[int, str]]:
        found = []
        server = getattr(self._nc, "max_payload", None)
        if isinstance(server, int) and server > 0:
            found.append((server, "the NATS server's max_payload"))
        if self._stream_max is not None:
            found.append((self._stream_max, f"the stream {self.stream}'s max_msg_size"))
        return found

    @property
    def max_message_bytes(self) -> int | None:
        """The largest message (payload and headers, as ``wire_size`` counts them) the
        broker takes: the smaller of the server's ``max_payload`` (as it said when
        this bus connected) and the stream's ``max_msg_size`` (as it was when the bus
        last read it: at open, and after the server refused a message for its size);
        None before open. The header this bus adds itself is taken off."""
        limits = self._limits()
        if not limits:
            return None
        return min(limits)[0] - (len(EXPECTED_STREAM) + len(self.stream.encode()) + 4)

    @property
    def max_message_source(self) -> str:
        """Which limit ``max_message_bytes`` is, in words."""
        limits = self._limits()
        return min(limits)[1] if limits else "unknown"

    async def refresh_limits(self) -> None:
        """Read the stream's ``max_msg_size`` again (an operator may have changed it)."""
        if self._js is None:
            return
        with contextlib.suppress(Exception):  # not now: the limit known stands
            self._note_limits((await self._js.stream_info(self.stream)).config)

    def _note_limits(self, config: Any) -> None:
        size = getattr(config, "max_msg_size", None)
        self._stream_max = size if isinstance(size, int) and size > 0 else None

    def _too_large(self, message: Message) -> MessageTooLargeError | None:
        limit = self.max_message_bytes
        if limit is None:
            return None
        size = wire_size(message)
        if size <= limit:
            return None
        return MessageTooLargeError(
            message.id,
            f"its message on {message.subject!r} is {size} bytes; the broker takes at most "
            f"{limit} ({self.max_message_source})",
        )

    async def open(self) -> None:
        try:
            import nats
        except ImportError:  # pragma: no cover - the extra is part of dev
            raise ConfigurationError(
                "the JetStream bus needs nats-py: pip install 'ledgerflow[nats]'"
            ) from None
        try:
            self._nc = await nats.connect(
                self.url,
                connect_timeout=self.timeout,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.25,
                # A server that vanished without closing the connection (a cut path,
                # a host powered off) is noticed when pings go unanswered: 3 missed,
                # 10 s apart, rather than nats-py's 2 missed, 2 minutes apart.
                ping_interval=PING_INTERVAL,
                max_outstanding_pings=MAX_OUTSTANDING_PINGS,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
            )
        except Exception as exc:
            raise BusUnavailableError(self.url, f"cannot connect: {exc!r}") from exc
        self._js = self._nc.jetstream(timeout=self.timeout)
        try:
            await self._ensure_stream()
        except ConfigurationError:
            raise
        except Exception as exc:
            raise BusUnavailableError(self.url, f"cannot open stream: {exc!r}") from exc
        self._ready = True

    async def _ensure_stream(self) -> None:
        """Make the stream if it is missing (a new broker, one restarted on empty
        storage, a stream deleted). One that exists is used as it is, never changed:
        it may be configured by its owner, or shared with other publishers; it must
        take this bus's subjects (``ConfigurationError`` if it does not)."""
        from nats.js import api
        from nats.js.errors import BadRequestError

        config = api.StreamConfig(
            name=self.stream,
            subjects=self.subjects,
            duplicate_window=self.duplicate_window.total_seconds(),
            storage=api.StorageType.FILE,
        )
        try:
            self._note_limits((await self._js.add_stream(config)).config)
            return
        except BadRequestError:
            pass  # it exists with other settings (or the subjects overlap another's)
        try:
            found = await self._js.stream_info(self.stream)
        except Exception as exc:
            raise ConfigurationError(
                f"stream {self.stream!r} cannot be made for subjects {self.subjects} "
                f"(another stream takes them?): {exc!r}"
            ) from exc
        self._note_limits(found.config)
        theirs = list(found.config.subjects or ())
        missing = [
            mine for mine in self.subjects if not any(subject_matches(t, mine) for t in theirs)
        ]
        if missing:
            raise ConfigurationError(
                f"stream {self.stream!r} exists with subjects {theirs}, which do not take "
                f"{missing}: add them to it, or name another stream (--stream)"
            )

    async def _on_error(self, exc: Exception) -> None:
        # The client retries on its own (4 times a second while the broker is down):
        # one line for each new error, then one every 30 s while it repeats.
        said, at = self._said
        now = time.monotonic()
        if repr(exc) != said or now - at >= 30.0:
            self._said = (repr(exc), now)
            log.warning("event bus %s: %r (retrying)", self.url, exc)
        else:
            log.debug("event bus %s: %r", self.url, exc)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("event bus %s: disconnected; reconnecting", self.url)

    async def _on_reconnected(self) -> None:
        log.info("event bus %s: reconnected", self.url)

    async def _publisher(self) -> Any:
        """The connection pipelined batches go out on: one of this bus's own that never
        reconnects, made again for the next batch once it has broken."""
        async with self._pub_lock:  # concurrent publishers share one, not one each
            if self._pub is not None and self._pub.is_connected:
                return self._pub
            await self._drop_publisher()
            import nats

            async def quiet(exc: Exception) -> None:
                log.debug("event bus %s (publisher): %r", self.url, exc)

            self._pub = await nats.connect(
                self.url, connect_timeout=self.timeout, allow_reconnect=False, error_cb=quiet
            )
            return self._pub

    async def _drop_publisher(self) -> None:
        pub, self._pub = self._pub, None
        if pub is not None:
            with contextlib.suppress(Exception):
                await pub.close()

    async def close(self) -> None:
        self._closing = True
        self._ready = False
        for consumer in list(self._consumers):
            await consumer.stop()
        await self._drop_publisher()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None

    async def publish(self, messages: Sequence[Message]) -> list[bool]:
        if self._js is None or not self._ready:
            raise BusUnavailableError(self.url, "not open")
        duplicates: list[bool | None] = [None] * len(messages)
        chains: dict[str, list[int]] = {}
        for index, message in enumerate(messages):
            chains.setdefault(message.key or message.id, []).append(index)
        # A message over what the broker takes, and every later one of its key, is
        # not sent at all: pipelined, the server refused it and stored the next.
        refusals: dict[int, MessageRefusedError] = {}
        for key, indexes in chains.items():
            for at, index in enumerate(indexes):
                if (too_large := self._too_large(messages[index])) is not None:
                    refusals[index] = too_large
                    chains[key] = indexes[:at]
                    break
        sending = sorted(i for indexes in chains.values() for i in indexes)

        async def one_by_one(indexes: list[int]) -> None:
            # Each acknowledged before the next: a message can only be stored after
            # the ones before it, whatever is lost and retried.
            for index in indexes:
                message = messages[index]
                try:
                    ack = await self._js.publish(
                        message.subject,
                        message.data,
                        timeout=self.timeout,
                        stream=self.stream,
                        headers=wire_headers(message),
                    )
                except Exception as exc:
                    refused = self._refusal(message, exc)
                    if refused is None:
                        raise
                    refusals[index] = refused
                    return
                duplicates[index] = bool(ack.duplicate)

        if self.pipelined and sending:
            await self._pipeline(messages, sending, duplicates)
        # What the pipeline left (all of it when not pipelining): from each chain's
        # first message without an acknowledgement on, one at a time on the main
        # connection; what the server has already, it drops as a repeat of its
        # Nats-Msg-Id.
        rest = [
            indexes[next(i for i, x in enumerate(indexes) if duplicates[x] is None) :]
            for indexes in chains.values()
            if any(duplicates[x] is None for x in indexes)
        ]
        # Every chain runs to its end (or its refusal) before this returns or raises:
        # the relay's checkpoint then stands for what the server holds.
        failed = [
            r
            for r in await asyncio.gather(*(one_by_one(r) for r in rest), return_exceptions=True)
            if isinstance(r, BaseException)
        ]
        for exc in failed:
            if not isinstance(exc, Exception):
                raise exc  # a cancellation
            if _no_stream(exc):
                # The broker came back without the stream (empty storage, deleted):
                # make it again, and the retry goes through.
                with contextlib.suppress(Exception):
                    await self._ensure_stream()
        if failed:
            raise BusUnavailableError(self.url, f"publish failed: {failed[0]!r}") from failed[0]
        if refusals:
            if any(isinstance(r, MessageTooLargeError) for r in refusals.values()):
                await self.refresh_limits()
            raise refusals[min(refusals)]
        return [bool(d) for d in duplicates]

    def _refusal(self, message: Message, exc: Exception) -> MessageRefusedError | None:
        """The ``MessageRefusedError`` that ``exc``, raised publishing ``message``, is
        (None for an outage, a timeout, or anything else that may pass)."""
        from nats.errors import MaxPayloadError
        from nats.js.errors import APIError

        if isinstance(exc, MaxPayloadError):
            return MessageTooLargeError(
                message.id, "its message is over the NATS server's max_payload"
            )
        if isinstance(exc, APIError):
            return _refused(message, exc.err_code, exc.description)
        return None

    async def _pipeline(
        self, messages: Sequence[Message], sending: list[int], duplicates: list[bool | None]
    ) -> None:
        """Send the messages at ``sending`` without waiting, then collect the
        acknowledgements into ``duplicates`` (left ``None`` where none came, or an
        error did).

        On the publisher connection, which never reconnects: a socket that breaks
        takes every later message with it (TCP keeps their order, and nothing
        buffered is sent again on a new socket), so the server stored a prefix of
        each chain. Replies come to one subscription whose subjects end in the
        message's index: no future, task or timer per message, which is most of
        what nats-py's ``publish_async`` costs.

        A message the server refuses while it stores the next of its key (a limit
        changed after this bus read it, a stream full with ``discard: new`` that
        has room for a smaller one) cannot be called back: that later message is
        stored first. Said in an error line; the refused one goes again, one at a
        time, and is stored after it (or refused again)."""
        try:
            nc = await self._publisher()
        except Exception as lost:  # noqa: BLE001 - no second connection now
            log.debug("event bus %s: not pipelining (%r)", self.url, lost)
            return
        inbox = nc.new_inbox()
        waiting = len(sending)
        progress = asyncio.Event()
        refused: dict[int, str] = {}

        async def on_ack(msg: Any) -> None:
            nonlocal waiting
            index = int(msg.subject.rsplit(".", 1)[1])
            status = (msg.headers or {}).get("Status")
            if status is not None:  # 503: no stream listens on the subject
                refused[index] = f"status {status} for {messages[index].subject}"
            else:
                reply = json.loads(msg.data)
                if "error" in reply:
                    refused[index] = str(reply["error"])
                elif duplicates[index] is None:
                    duplicates[index] = bool(reply.get("duplicate", False))
            waiting -= 1
            progress.set()

        sub = None
        try:
            sub = await nc.subscribe(f"{inbox}.*", cb=on_ack)
            expected = {EXPECTED_STREAM: self.stream}
            for index in sending:
                message = messages[index]
                await nc.publish(
                    message.subject,
                    message.data,
                    reply=f"{inbox}.{index}",
                    headers={**wire_headers(message), **expected},
                )
            await nc.flush(self.timeout)
            # A batch takes as long as it takes; a pause without a single
            # acknowledgement for ``timeout``, or the socket breaking, ends the wait.
            loop = asyncio.get_running_loop()
            heard = loop.time()
            while waiting > 0:
                progress.clear()
                try:
                    await asyncio.wait_for(progress.wait(), min(self.timeout, 0.25))
                    heard = loop.time()
                except TimeoutError:
                    if not nc.is_connected:
                        raise BusUnavailableError(self.url, "publisher connection lost") from None
                    if loop.time() - heard >= self.timeout:
                        raise
        except Exception as exc:  # noqa: BLE001 - the rest one at a time, in order
            log.debug("event bus %s: pipelined batch cut short (%r)", self.url, exc)
            await self._drop_publisher()
            sub = None
        finally:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        if refused:
            first = min(refused)
            log.warning("event bus %s: the server refused %s", self.url, refused[first])
            self._stored_past(messages, refused, duplicates)

    def _stored_past(
        self, messages: Sequence[Message], refused: dict[int, str], duplicates: list[bool | None]
    ) -> None:
        """Say where the server stored a message after an earlier one of its key that
        it refused (the pipeline's one way to break a key's order)."""
        past: dict[str, list[str]] = {}
        for index in sorted(refused):
            key = messages[index].key or messages[index].id
            if key in past:
                continue
            later = [
                m.id
                for at, m in enumerate(messages[index + 1 :], index + 1)
                if (m.key or m.id) == key and duplicates[at] is False
            ]
            if later:
                past[key] = later
        for key, later in past.items():
            log.error(
                "event bus %s: key %r: %d message(s) stored before an earlier one the "
                "server refused (%s): consumers see them first",
                self.url,
                key,
                len(later),
                ", ".join(later[:3]) + (" ..." if len(later) > 3 else ""),
            )

    async def subscribe(
        self, subject: str, *, durable: str, handler: Handler, max_attempts: int = 0
    ) -> Subscription:
        if self._js is None:
            raise BusUnavailableError(self.url, "not open")
        from nats.js import api

        config = api.ConsumerConfig(
            durable_name=durable,
            ack_wait=max(30.0, self.timeout),
            max_deliver=max_attempts or -1,
            filter_subject=subject,
        )
        pull = await self._js.pull_subscribe(
            subject, durable=durable, stream=self.stream, config=config
        )
        # A durable that exists is used as it is: its own ack_wait and max_deliver.
        ack_wait, max_deliver = float(config.ack_wait or 30.0), max_attempts
        with contextlib.suppress(Exception):
            found = (await pull.consumer_info()).config
            ack_wait = float(found.ack_wait or ack_wait)
            max_deliver = max(int(found.max_deliver or 0), 0)
        consumer = _PullConsumer(
            self, pull, handler, durable, ack_wait=ack_wait, max_deliver=max_deliver
        )
        self._consumers.append(consumer)
        consumer.task = asyncio.create_task(consumer.run(), name=f"bus:{durable}")
        return consumer


def _refused(message: Message, err_code: Any, description: Any) -> MessageRefusedError | None:
    """The refusal a JetStream error code says is for the message itself."""
    if err_code == _TOO_LARGE:
        return MessageTooLargeError(message.id, f"the stream refused it: {description}")
    if err_code == _HEADER_TOO_LARGE:
        return MessageRefusedError(message.id, f"the stream refused it: {description}")
    return None


def _no_stream(exc: BaseException) -> bool:
    """Whether a publish failed because no stream takes its subject."""
    from nats.js.errors import NoStreamResponseError

    return isinstance(exc, NoStreamResponseError)


class _PullConsumer:
    def __init__(
        self,
        bus: JetStreamBus,
        pull: Any,
        handler: Handler,
        durable: str,
        *,
        ack_wait: float,
        max_deliver: int,
    ) -> None:
        self.bus = bus
        self.pull = pull
        self.handler = handler
        self.durable = durable
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        import nats.errors

        while True:
            try:
                batch = await self.pull.fetch(FETCH, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception as exc:  # noqa: BLE001 - reconnecting: look again soon
                log.warning("consumer %s: fetch failed (%r)", self.durable, exc)
                await asyncio.sleep(self.bus.redelivery_delay)
                continue
            # The server's ack_wait runs for every message of a batch from its
            # delivery: behind a slow handler the last ones ran out and came again,
            # although no handler had failed.
            undone = list(batch)
            keeper = asyncio.create_task(self._in_progress(undone))
            try:
                for msg in batch:
                    await self._handle(msg)
                    undone.remove(msg)
            finally:
                await cancel_and_wait([keeper])

    async def _in_progress(self, undone: list[Any]) -> None:
        """Tell the server, a third of its ack_wait apart, that the fetched messages
        not yet handled (the one being handled among them) are in progress."""
        while True:
            await asyncio.sleep(max(self.ack_wait / 3, 0.05))
            for msg in list(undone):
                with contextlib.suppress(Exception):  # the connection is back soon
                    await msg.in_progress()

    async def _handle(self, msg: Any) -> None:
        headers = {k: header_text(v) if encoded(k) else v for k, v in (msg.headers or {}).items()}
        message = Message(msg.subject, headers.get(MSG_ID, ""), msg.data, headers)
        attempt = 0
        try:
            attempt = int(msg.metadata.num_delivered)
            await deliver(self.handler, Delivery(message, attempt), system="nats")
        except Exception as exc:  # noqa: BLE001 - delivered again after a pause
            if 0 < self.max_deliver <= attempt:
                log_given_up(self.durable, message, attempt, exc)
                with contextlib.suppress(Exception):
                    await msg.term()
                return
            log_failed(self.durable, message, attempt, exc)
            with contextlib.suppress(Exception):
                await msg.nak(delay=redelivery_delay(self.bus.redelivery_delay, attempt))
            return
        with contextlib.suppress(Exception):
            await msg.ack()

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.bus._consumers.remove(self)
        if self.task is not None:
            await cancel_and_wait([self.task])
        with contextlib.suppress(Exception):
            await self.pull.unsubscribe()
