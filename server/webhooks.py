"""Prediction webhooks: Replicate's events, Standard-Webhooks signatures, and a target policy.

Events (chosen per prediction with `webhook_events_filter`): `start` when the job starts,
`output` and `logs` throttled to one request per THROTTLE_S carrying the latest state, and
`completed` once the job ends, retried with backoff until the receiver answers 2xx. Every request
carries the whole prediction object, as Replicate's do.

Targets go through engine/urls.py, the same guarded path as image URLs: http(s) only, every
address the host resolves to must be public (unless `webhook_allow_private` or
`allow_private_urls` is set), and each delivery connects to the address it just checked. The check
runs when the prediction is created and again before every delivery; redirects are not followed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from typing import Callable

import httpx

from engine.errors import InvalidInput
from engine.jobs import Event, Job, new_id
from engine.urls import Target, URLRefused, pin

log = logging.getLogger("ember.webhooks")

EVENTS = ("start", "output", "logs", "completed")
THROTTLE_S = 0.5
RETRY_DELAYS_S = (1, 2, 4, 8, 16, 32, 64)
TIMEOUT_S = 10.0


def check_target(url: str, allow_private: bool) -> Target:
    """The webhook target pinned to its checked address, or InvalidInput (param `webhook`).
    Resolves the host name, so call it off the event loop."""
    try:
        return pin(url, allow_private)
    except URLRefused as exc:
        raise InvalidInput(f"webhook: {exc}", param="webhook") from None


def signing_key(secret: str) -> bytes:
    """The HMAC key of a Standard-Webhooks secret (`whsec_<base64>`); other strings are used as is."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def signature_headers(secret: str | None, message_id: str, body: bytes, timestamp: int | None = None) -> dict:
    timestamp = int(time.time()) if timestamp is None else timestamp
    headers = {"webhook-id": message_id, "webhook-timestamp": str(timestamp)}
    if secret:
        signed = f"{message_id}.{timestamp}.".encode() + body
        digest = hmac.new(signing_key(secret), signed, hashlib.sha256).digest()
        headers["webhook-signature"] = "v1," + base64.b64encode(digest).decode()
    return headers


class WebhookSender:
    """A JobService hook: one delivery loop per job that has a webhook."""

    def __init__(self, render: Callable[[Job], dict], secret: str | None, allow_private: bool,
                 loop: asyncio.AbstractEventLoop):
        self.render = render
        self.secret = secret
        self.allow_private = allow_private
        self.loop = loop
        self.wakers: dict[str, asyncio.Event] = {}
        self.tasks: set[asyncio.Task] = set()

    def on_change(self, job: Job, event: Event | None) -> None:
        if not job.webhook:
            return
        kind = _event_kind(job, event)
        if kind is None or (kind != "completed" and kind not in job.webhook_events_filter):
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self._wake(job)
        else:
            self.loop.call_soon_threadsafe(self._wake, job)

    def _wake(self, job: Job) -> None:
        waker = self.wakers.get(job.id)
        if waker is None:
            waker = self.wakers[job.id] = asyncio.Event()
            task = self.loop.create_task(self._deliver(job, waker))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        waker.set()

    async def _deliver(self, job: Job, waker: asyncio.Event) -> None:
        try:
            async with httpx.AsyncClient(timeout=TIMEOUT_S, follow_redirects=False, trust_env=False) as client:
                while True:
                    await waker.wait()
                    waker.clear()
                    if job.done:
                        if "completed" in job.webhook_events_filter:
                            await self._send(client, job, retries=RETRY_DELAYS_S)
                        return
                    await self._send(client, job, retries=())
                    await asyncio.sleep(THROTTLE_S)
        except Exception:  # noqa: BLE001 - a webhook problem never touches the prediction
            log.exception("webhook delivery for prediction %s failed", job.id)
        finally:
            self.wakers.pop(job.id, None)

    async def _send(self, client: httpx.AsyncClient, job: Job, retries: tuple) -> bool:
        """POST the prediction as it is now; retry after each delay in `retries` until a 2xx."""
        message_id = f"msg_{new_id()}"
        body = json.dumps(self.render(job)).encode()
        for delay in (0, *retries):
            await asyncio.sleep(delay)
            try:
                target = await asyncio.to_thread(check_target, job.webhook, self.allow_private)
            except InvalidInput as exc:
                log.warning("webhook for prediction %s refused: %s", job.id, exc.message)
                return False
            pinned = target.request_kwargs()
            headers = {"content-type": "application/json", "user-agent": "ember-webhooks",
                       **signature_headers(self.secret, message_id, body), **pinned["headers"]}
            try:
                response = await client.post(target.url, content=body, headers=headers,
                                             extensions=pinned["extensions"])
                if 200 <= response.status_code < 300:
                    return True
                log.info("webhook for prediction %s answered %s", job.id, response.status_code)
            except httpx.HTTPError as exc:
                log.info("webhook for prediction %s failed: %s", job.id, exc)
        return False


def _event_kind(job: Job, event: Event | None) -> str | None:
    if event is None:
        return "start" if job.status == "processing" else None
    if event.type == "done":
        return "completed"
    return event.type
