"""The event bus on NATS JetStream (nats-py).

Messages are stored in one JetStream stream (``LEDGERFLOW`` by default, over the
subjects ``ledgerflow.>``), with the ledger event's id as ``Nats-Msg-Id``: JetStream
drops a message whose id it stored within its duplicate window, so a relay that
publishes a batch again after a crash stores nothing twice.

Each ledger stream's messages keep their order. By default (``pipelined``) a batch
goes out on a connection of the call's own that never reconnects, without waiting for
each acknowledgement: when that socket breaks, the later messages are lost with it
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
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

from .._waiting import cancel_and_wait
from ..errors import BusUnavailableError, ConfigurationError
from .port import Delivery, Handler, Message, Subscription

__all__ = ["JetStreamBus"]

log = logging.getLogger("ledgerflow.bus")

MSG_ID = "Nats-Msg-Id"


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
        self._closing = False

    async def open(self) -> None:
        try:
            import nats
            from nats.js import api
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
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
            )
        except Exception as exc:
            raise BusUnavailableError(self.url, f"cannot connect: {exc!r}") from exc
        self._js = self._nc.jetstream(timeout=self.timeout)
        config = api.StreamConfig(
            name=self.stream,
            subjects=self.subjects,
            duplicate_window=self.duplicate_window.total_seconds(),
            storage=api.StorageType.FILE,
        )
        try:
            await self._js.add_stream(config)
        except Exception:  # noqa: BLE001 - it exists with other settings: make them ours
            await self._js.update_stream(config)

    async def _on_error(self, exc: Exception) -> None:
        # The client retries on its own; one line per error, not its traceback.
        log.warning("event bus %s: %r", self.url, exc)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("event bus %s: disconnected; reconnecting", self.url)

    async def _on_reconnected(self) -> None:
        log.info("event bus %s: reconnected", self.url)

    @contextlib.asynccontextmanager
    async def _one_off(self) -> AsyncIterator[Any]:
        """A JetStream context on a connection that never reconnects, closed after."""
        import nats

        async def quiet(exc: Exception) -> None:
            log.debug("event bus %s (publisher): %r", self.url, exc)

        nc = await nats.connect(
            self.url, connect_timeout=self.timeout, allow_reconnect=False, error_cb=quiet
        )
        try:
            yield nc.jetstream(timeout=self.timeout)
        finally:
            with contextlib.suppress(Exception):
                await nc.close()

    async def close(self) -> None:
        self._closing = True
        for consumer in list(self._consumers):
            await consumer.stop()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None

    async def publish(self, messages: Sequence[Message]) -> list[bool]:
        if self._js is None:
            raise BusUnavailableError(self.url, "not open")
        duplicates = [False] * len(messages)
        chains: dict[str, list[int]] = {}
        for index, message in enumerate(messages):
            chains.setdefault(message.key or message.id, []).append(index)

        def send(index: int) -> Any:
            message = messages[index]
            return self._js.publish(
                message.subject,
                message.data,
                timeout=self.timeout,
                stream=self.stream,
                headers={**message.headers, MSG_ID: message.id},
            )

        async def one_by_one(indexes: list[int]) -> None:
            # Each acknowledged before the next: a message can only be stored after
            # the ones before it, whatever is lost and retried.
            for index in indexes:
                duplicates[index] = bool((await send(index)).duplicate)

        async def pipelined(js: Any, indexes: list[int]) -> None:
            sent = 0
            try:
                pending = []
                for index in indexes:
                    message = messages[index]
                    pending.append(
                        await js.publish_async(
                            message.subject,
                            message.data,
                            wait_stall=self.timeout,
                            stream=self.stream,
                            headers={**message.headers, MSG_ID: message.id},
                        )
                    )
                for index, future in zip(indexes, pending, strict=True):
                    ack = await asyncio.wait_for(future, self.timeout)
                    duplicates[index] = bool(ack.duplicate)
                    sent += 1
            except Exception:  # noqa: BLE001 - the rest one at a time, in order
                await one_by_one(indexes[sent:])

        try:
            if not self.pipelined:
                await asyncio.gather(*(one_by_one(i) for i in chains.values()))
            else:
                # On a connection of this call's own that never reconnects: a socket
                # that breaks takes every later message of a chain with it (TCP keeps
                # their order, and nothing buffered is sent again on a new socket), so
                # the server stored a prefix of each chain. The rest then go one at a
                # time on the main connection; what the server has already, it drops
                # as a repeat of its Nats-Msg-Id.
                async with contextlib.AsyncExitStack() as stack:
                    try:
                        js = await stack.enter_async_context(self._one_off())
                    except Exception as lost:  # noqa: BLE001 - no second connection now
                        log.debug("event bus %s: not pipelining (%r)", self.url, lost)
                        js = None
                    if js is None:
                        await asyncio.gather(*(one_by_one(i) for i in chains.values()))
                    else:
                        await asyncio.gather(*(pipelined(js, i) for i in chains.values()))
        except Exception as exc:
            raise BusUnavailableError(self.url, f"publish failed: {exc!r}") from exc
        return duplicates

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
                try:
                    await self.handler(Delivery(message, int(msg.metadata.num_delivered)))
                except Exception:  # noqa: BLE001 - delivered again after a pause
                    log.warning("consumer %s: message %s failed", self.durable, message.id)
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
