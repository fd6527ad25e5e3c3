"""The STT service: name resolution, TCP, TLS, the WebSocket upgrade with the
key, and one short session (a second of silence, the close message, the
service's clean close).

The URL is the daemon's (`listen_url`), and so are the handshake's headers
and the TLS context (`request_headers`, `tls_context`). Resolution, TCP and
TLS are tried on their own first, so that a failure names its step; then the
WebSocket client connects as the session does. Through a proxy (websockets
takes it from the environment, as the daemon does) only the upgrade and the
session are tried.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from edged.config import SAMPLE_RATE, SAMPLE_WIDTH, Settings, mask_url, stt_credentials
from edged.doctor.checks import STT, Check, failed, passed, warned
from edged.doctor.net import (
    connect_any,
    describe_error,
    is_address,
    resolve,
    tcp_failure,
    tls_handshake,
)

AUDIO_S = 1.0  # of silence, sent in stt.frame_ms frames at real time
CLEAN_CLOSE = 1000


class _SttCheck:
    def __init__(self, settings: Settings):
        from edged.stt.protocol import listen_url

        self.settings = settings
        self.stt = settings.stt
        self.url = listen_url(self.stt.url, self.stt.provider, self.stt.params)
        parts = urlsplit(self.url)
        self.secure = parts.scheme == "wss"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.secure else 80)
        netloc = f"[{self.host}]" if ":" in self.host else self.host
        # No user info, no query: nothing secret is shown.
        self.where = f"{parts.scheme}://{netloc}:{self.port}{parts.path or '/'}"
        self.has_key = bool(settings.api_key or stt_credentials(self.stt))
        self.timeout = self.stt.connect_timeout_s
        self.steps: list[str] = []
        self.data: dict[str, Any] = {"url": self.where}

    # -- the verdicts, with what is known so far -----------------------------------

    def passed(self) -> Check:
        return passed(STT, f"{self.where}: {', '.join(self.steps)}", **self.data)

    def warned(self, problem: str, fix: str) -> Check:
        return warned(STT, f"{self.where}: {problem}", fix, steps=list(self.steps), **self.data)

    def failed(self, problem: str, fix: str) -> Check:
        return failed(STT, f"{self.where}: {problem}", fix, steps=list(self.steps), **self.data)

    # -- the steps -----------------------------------------------------------------

    def run(self) -> Check:
        try:
            context = self._tls_context()
        except (OSError, ssl.SSLError) as error:
            return self.failed(f"cannot load stt.ca_file ({self.stt.ca_file}): {error}",
                               "point stt.ca_file at a readable PEM file with the CA "
                               "certificate that signed the server's")
        proxy = _proxy(self.url)
        if proxy is not None:
            self.steps.append(f"through the proxy {mask_url(proxy)}")
            self.data["proxy"] = mask_url(proxy)
        else:
            problem = self._probe(context)
            if problem is not None:
                return problem
        return asyncio.run(self._session(context))

    def _tls_context(self) -> ssl.SSLContext | None:
        from edged.stt.session import tls_context

        return tls_context(self.stt.ca_file) if self.secure else None

    def _probe(self, context: ssl.SSLContext | None) -> Check | None:
        """Name resolution, TCP and TLS, each on its own."""
        started = time.monotonic()
        infos = resolve(self.host, self.port)
        if isinstance(infos, str):
            return self.failed(f"cannot resolve {self.host}: {infos}",
                               "check the host name in stt.url, and this device's DNS "
                               "(`resolvectl status`, /etc/resolv.conf)")
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        self.data["addresses"] = addresses
        if not is_address(self.host):
            self.steps.append(f"{self.host} is {addresses[0]}")
        sock, error = connect_any(infos, self.timeout)
        if sock is None:
            return self.failed(*tcp_failure(error, self.host, self.port, self.timeout,
                                             "is the service running there? check the host "
                                             "and port of stt.url"))
        self.data["tcp_ms"] = round(1000 * (time.monotonic() - started))
        self.steps.append(f"TCP in {self.data['tcp_ms']} ms")
        with sock:
            if context is None:
                return None
            problem = tls_handshake(sock, context, self.host, self.port)
            if isinstance(problem, tuple):
                return self.failed(*self._tls_fix(*problem))
            self.data["tls"] = problem
            self.steps.append(f"{problem} verified")
        return None

    def _tls_fix(self, problem: str, certificate: bool) -> tuple[str, str]:
        if not certificate:
            return problem, ("is this port TLS at all? use ws:// for a plain server, or the "
                             "service's TLS port")
        if "not yet valid" in problem or "expired" in problem:
            return problem, ("check this device's clock first (`timedatectl`), then the "
                             "server's certificate")
        if self.stt.ca_file is not None:
            return problem, (f"stt.ca_file ({self.stt.ca_file}) must hold the CA that signed "
                             "the server's certificate")
        return problem, ("for a private server set stt.ca_file to the CA that signed its "
                         "certificate; else the system's CA certificates may be missing "
                         "(package ca-certificates)")

    async def _session(self, context: ssl.SSLContext | None) -> Check:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

        from edged.stt.session import request_headers

        started = time.monotonic()
        try:
            connection = await connect(
                self.url,
                ssl=context,
                additional_headers=request_headers(self.settings),
                open_timeout=self.timeout,
                ping_interval=None,  # a few seconds: no keep-alive needed
                close_timeout=self.stt.close_timeout_s,
                compression=None,
                max_size=1 << 20,
            )
        except InvalidStatus as error:
            response = error.response
            self._saw_date(response.headers.get("Date"))
            self.data["status"] = response.status_code
            return self._refused(response.status_code, response.headers)
        except InvalidHandshake as error:
            return self.failed(f"not a WebSocket endpoint: {error}",
                               "check stt.url: scheme, host, port and path (router.audio's "
                               "is wss://api.router.audio/v1/listen)")
        except TimeoutError:
            return self.failed(f"no answer to the upgrade within {self.timeout:.0f} s",
                               "check stt.url; a proxy or firewall may hold the request")
        except OSError as error:
            return self.failed(f"the upgrade failed: {describe_error(error)}",
                               "check stt.url and the network between this device and it")
        upgrade = connection.response
        if upgrade is not None:  # always, once open
            self._saw_date(upgrade.headers.get("Date"))
            self.data["status"] = upgrade.status_code
        self.data["upgrade_ms"] = round(1000 * (time.monotonic() - started))
        self.steps.append("upgraded" + (" with the key accepted" if self.has_key else
                                        " (no key configured)"))
        async with connection:
            frames = _Frames()
            receiver = asyncio.create_task(frames.receive(connection))
            try:
                await self._send_audio(connection)
                await connection.send(self.stt.close_message)
            except ConnectionClosed:
                await asyncio.wait({receiver}, timeout=1.0)
                return self._ended_early(connection.close_code, connection.close_reason, frames)
            closing = time.monotonic()
            done, _ = await asyncio.wait({receiver}, timeout=self.stt.close_timeout_s)
            if not done:
                receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await receiver
                self._report_frames(frames)
                return self.warned(f"the service did not close the session within "
                                   f"{self.stt.close_timeout_s:g} s of stt.close_message",
                                   "check stt.close_message against the service's protocol "
                                   "(router.audio's: {\"type\":\"CloseStream\"}); edged waits "
                                   "stt.close_timeout_s for the last finals at every stop")
            close_s = time.monotonic() - closing
        return self._closed(connection.close_code, connection.close_reason, frames, close_s)

    def _saw_date(self, value: str | None) -> None:
        """The server's Date header, and this clock when it came (for the clock check)."""
        if value is not None:
            self.data["server_date"] = value
            self.data["server_date_seen"] = datetime.now(UTC).isoformat()

    async def _send_audio(self, connection: Any) -> None:
        frame_bytes = SAMPLE_RATE * SAMPLE_WIDTH * self.stt.frame_ms // 1000
        total = round(AUDIO_S * SAMPLE_RATE) * SAMPLE_WIDTH
        sent = 0
        self.data.update(frames_sent=0, audio_s=0.0)
        while sent < total:
            if sent:
                await asyncio.sleep(self.stt.frame_ms / 1000)  # at real time, as captured
            size = min(frame_bytes, total - sent)
            await connection.send(bytes(size))
            sent += size
            self.data["frames_sent"] += 1
            self.data["audio_s"] = round(sent / SAMPLE_WIDTH / SAMPLE_RATE, 3)

    def _report_frames(self, frames: _Frames) -> None:
        self.data.update(frames_received=frames.count, transcripts=frames.transcripts,
                         malformed=frames.malformed)
        self.steps.append(f"{self.data['audio_s']:.1f} s of audio sent in "
                          f"{self.data['frames_sent']} frames, {frames.count} "
                          f"frame{'s' if frames.count != 1 else ''} back")

    def _closed(self, code: int | None, reason: str | None, frames: _Frames,
                close_s: float) -> Check:
        self._report_frames(frames)
        self.data.update(close_code=code, close_reason=reason or None)
        if code != CLEAN_CLOSE:
            return self.failed(f"after stt.close_message the session ended with "
                               f"{_close(code, reason)} instead of code {CLEAN_CLOSE}",
                               "check stt.close_message against the service's protocol, and "
                               "the service's status")
        self.steps.append(f"closed cleanly ({CLEAN_CLOSE}) {close_s:.1f} s after the close "
                          f"message")
        if frames.errors:
            return self.warned(f"the service sent an error: {frames.errors[0]}",
                               "check stt.provider and stt.params")
        if frames.malformed:
            return self.warned(f"{frames.malformed} frame(s) back were not the protocol's JSON",
                               "check stt.url: is it a router.audio-compatible endpoint?")
        return self.passed()

    def _ended_early(self, code: int | None, reason: str | None, frames: _Frames) -> Check:
        self._report_frames(frames)
        self.data.update(close_code=code, close_reason=reason or None)
        said = f": {frames.errors[0]}" if frames.errors else ""
        return self.failed(f"the service ended the session after {self.data['audio_s']:.2f} s "
                           f"of audio, with {_close(code, reason)}{said}",
                           "check stt.provider and stt.params (a service closes a session on "
                           "parameters it does not take), and the service's status")

    def _refused(self, status: int, headers: Mapping[str, str]) -> Check:
        from edged.errors import SttAuthError, SttRateLimited, SttRejectedError
        from edged.stt.policy import status_error

        problem = status_error(status, headers)
        if isinstance(problem, SttAuthError):
            if not self.has_key:
                return self.failed(f"the service wants a key (HTTP {status}) and none is "
                                   "configured",
                                   "put the key in a file readable by edged only and set "
                                   "stt.api_key_file")
            return self.failed(f"the key was refused (HTTP {status})",
                               "check stt.api_key / stt.api_key_file (sent as the x-api-key "
                               "header), or a key in stt.url or stt.params")
        if isinstance(problem, SttRateLimited):
            later = (f"in {problem.retry_after:.0f} s" if problem.retry_after is not None
                     else "later")
            return self.warned(f"rate limited (HTTP {status}): the key and a session were not "
                               "tried", f"run the check again {later}")
        if isinstance(problem, SttRejectedError):
            return self.failed(f"the request was rejected (HTTP {status})",
                               "check stt.url, stt.provider and stt.params")
        return self.failed(f"the service is failing (HTTP {status})",
                           "nothing to change here: it is the service's side (edged retries by "
                           "itself, with backoff); try again later")


class _Frames:
    """What the service sends during the session, counted."""

    def __init__(self) -> None:
        self.count = 0
        self.transcripts = 0
        self.malformed = 0
        self.errors: list[str] = []

    async def receive(self, connection: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        from edged.stt.protocol import MalformedFrame, OtherMessage, TranscriptMessage, parse_frame

        with contextlib.suppress(ConnectionClosed):
            async for message in connection:
                self.count += 1
                # The gate needs how much audio was sent: the whole second is
                # an upper bound that keeps its time check meaningful.
                frame = parse_frame(message, sent_samples=round(AUDIO_S * SAMPLE_RATE))
                if isinstance(frame, TranscriptMessage):
                    self.transcripts += 1
                elif isinstance(frame, MalformedFrame):
                    self.malformed += 1
                elif isinstance(frame, OtherMessage) and frame.type == "error":
                    self.errors.append(str(frame.body.get("message", frame.body))[:200])


def _close(code: int | None, reason: str | None) -> str:
    return f"code {code}" + (f" ({reason})" if reason else "")


def check_stt(settings: Settings) -> Check:
    """The STT service, step by step; `data["server_date"]` is its Date header when
    one was seen (for the clock check)."""
    return _SttCheck(settings).run()


def _proxy(url: str) -> str | None:
    from websockets.proxy import get_proxy
    from websockets.uri import parse_uri

    try:
        return get_proxy(parse_uri(url))
    except Exception:  # a malformed proxy variable: the upgrade will say so
        return None
