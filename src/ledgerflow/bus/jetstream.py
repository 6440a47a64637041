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
message and accepted the next. Consumers are durable pull consumers, acknowledged
when their handler returns and delivered again (``nak``) when it raises.
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
    Subscription,
    deliver,
    log_failed,
    subject_matches,
)

__all__ = ["JetStreamBus"]

log = logging.getLogger("ledgerflow.bus")

PING_INTERVAL = 10
"""Seconds between the pings that tell a live server from a vanished one."""
MAX_OUTSTANDING_PINGS = 3

EXPECTED_STREAM = "Nats-Expected-Stream"


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

    @property
    def max_message_bytes(self) -> int | None:
        """The largest message (payload and headers) the server takes, as it said
        when this bus connected (its ``max_payload``); None before that."""
        size = getattr(self._nc, "max_payload", None)
        return size if isinstance(size, int) and size > 0 else None

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
            await self._js.add_stream(config)
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
        for consumer in list(self._consumers):
            await consumer.stop()
        await self._drop_publisher()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None

    async def publish(self, messages: Sequence[Message]) -> list[bool]:
        if self._js is None:
            raise BusUnavailableError(self.url, "not open")
        duplicates: list[bool | None] = [None] * len(messages)
        chains: dict[str, list[int]] = {}
        for index, message in enumerate(messages):
            chains.setdefault(message.key or message.id, []).append(index)

        async def one_by_one(indexes: list[int]) -> None:
            # Each acknowledged before the next: a message can only be stored after
            # the ones before it, whatever is lost and retried.
            for index in indexes:
                message = messages[index]
                ack = await self._js.publish(
                    message.subject,
                    message.data,
                    timeout=self.timeout,
                    stream=self.stream,
                    headers={**message.headers, MSG_ID: message.id},
                )
                duplicates[index] = bool(ack.duplicate)

        try:
            if self.pipelined:
                await self._pipeline(messages, duplicates)
            # What the pipeline left (all of it when not pipelining): from each
            # chain's first message without an acknowledgement on, one at a time on
            # the main connection; what the server has already, it drops as a
            # repeat of its Nats-Msg-Id.
            rest = [
                indexes[next(i for i, x in enumerate(indexes) if duplicates[x] is None) :]
                for indexes in chains.values()
                if any(duplicates[x] is None for x in indexes)
            ]
            await asyncio.gather(*(one_by_one(r) for r in rest))
        except Exception as exc:
            if _no_stream(exc):
                # The broker came back without the stream (empty storage, deleted):
                # make it again, and the retry goes through.
                with contextlib.suppress(Exception):
                    await self._ensure_stream()
            raise BusUnavailableError(self.url, f"publish failed: {exc!r}") from exc
        return [bool(d) for d in duplicates]

    async def _pipeline(self, messages: Sequence[Message], duplicates: list[bool | None]) -> None:
        """Send the whole batch without waiting, then collect the acknowledgements
        into ``duplicates`` (left ``None`` where none came, or an error did).

        On the publisher connection, which never reconnects: a socket that breaks
        takes every later message with it (TCP keeps their order, and nothing
        buffered is sent again on a new socket), so the server stored a prefix of
        each chain. Replies come to one subscription whose subjects end in the
        message's index: no future, task or timer per message, which is most of
        what nats-py's ``publish_async`` costs."""
        try:
            nc = await self._publisher()
        except Exception as lost:  # noqa: BLE001 - no second connection now
            log.debug("event bus %s: not pipelining (%r)", self.url, lost)
            return
        inbox = nc.new_inbox()
        waiting = len(messages)
        progress = asyncio.Event()
        refused: list[str] = []

        async def on_ack(msg: Any) -> None:
            nonlocal waiting
            index = int(msg.subject.rsplit(".", 1)[1])
            status = (msg.headers or {}).get("Status")
            if status is not None:  # 503: no stream listens on the subject
                refused.append(f"status {status} for {messages[index].subject}")
            else:
                reply = json.loads(msg.data)
                if "error" in reply:
                    refused.append(str(reply["error"]))
                elif duplicates[index] is None:
                    duplicates[index] = bool(reply.get("duplicate", False))
            waiting -= 1
            progress.set()

        sub = None
        try:
            sub = await nc.subscribe(f"{inbox}.*", cb=on_ack)
            expected = {EXPECTED_STREAM: self.stream}
            for index, message in enumerate(messages):
                await nc.publish(
                    message.subject,
                    message.data,
                    reply=f"{inbox}.{index}",
                    headers={**message.headers, MSG_ID: message.id, **expected},
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
            log.warning("event bus %s: the server refused %s", self.url, refused[0])

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
        consumer = _PullConsumer(self, pull, handler, durable)
        self._consumers.append(consumer)
        consumer.task = asyncio.create_task(consumer.run(), name=f"bus:{durable}")
        return consumer


def _no_stream(exc: BaseException) -> bool:
    """Whether a publish failed because no stream takes its subject."""
    from nats.js.errors import NoStreamResponseError

    return isinstance(exc, NoStreamResponseError)


class _PullConsumer:
    def __init__(self, bus: JetStreamBus, pull: Any, handler: Handler, durable: str) -> None:
        self.bus = bus
        self.pull = pull
        self.handler = handler
        self.durable = durable
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        import nats.errors

        while True:
            try:
                batch = await self.pull.fetch(64, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception as exc:  # noqa: BLE001 - reconnecting: look again soon
                log.warning("consumer %s: fetch failed (%r)", self.durable, exc)
                await asyncio.sleep(self.bus.redelivery_delay)
                continue
            for msg in batch:
                headers = dict(msg.headers or {})
                message = Message(msg.subject, headers.get(MSG_ID, ""), msg.data, headers)
                attempt = 0
                try:
                    attempt = int(msg.metadata.num_delivered)
                    await deliver(self.handler, Delivery(message, attempt), system="nats")
                except Exception as exc:  # noqa: BLE001 - delivered again after a pause
                    log_failed(self.durable, message, attempt, exc)
                    with contextlib.suppress(Exception):
                        await msg.nak(delay=self.bus.redelivery_delay)
                    continue
                with contextlib.suppress(Exception):
                    await msg.ack()

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.bus._consumers.remove(self)
        if self.task is not None:
            await cancel_and_wait([self.task])
        with contextlib.suppress(Exception):
            await self.pull.unsubscribe()
