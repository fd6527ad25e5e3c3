"""alsa-lib's own messages, through edged's logging instead of raw on stderr.

alsa-lib prints `ALSA lib confmisc.c:855:(parse_card) cannot find card '0'`
and the like straight to stderr, eight lines per failed open: outside the
log format, past the rate limit, and over `edged monitor`'s screen. Its
thread-local error handler (`snd_lib_error_set_local`, which the default
global handler defers to) hands us each message with its `va_list`; libc's
`vsnprintf` formats it, and the line goes to the `edged.alsa` logger at debug
level, each distinct message at most a few times.

The handler is per thread: `route_alsa_messages()` is called by whatever
thread is about to call into alsa-lib (the capture thread, `edged devices`).
Where libasound or libc cannot be loaded, nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

log = logging.getLogger("edged.alsa")

_REPEATS = 3  # times one message (file and line) is logged in full, then every 100th

# void (*)(const char *file, int line, const char *func, int err, const char *fmt, va_list)
# A va_list parameter arrives as a pointer on x86-64 and AArch64 alike, and is
# passed on to vsnprintf as it came.
_HANDLER_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                                 ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)

_state = threading.local()
_counts: dict[tuple[bytes, int], int] = {}
_counts_lock = threading.Lock()


def _load() -> tuple[ctypes.CDLL, ctypes.CDLL] | None:
    try:
        asound = ctypes.CDLL("libasound.so.2")
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        asound.snd_lib_error_set_local  # noqa: B018 - present since alsa-lib 1.1
    except (OSError, AttributeError):
        return None
    libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                               ctypes.c_void_p]
    libc.vsnprintf.restype = ctypes.c_int
    asound.snd_lib_error_set_local.argtypes = [ctypes.c_void_p]
    asound.snd_lib_error_set_local.restype = ctypes.c_void_p
    return asound, libc


_LIBS = _load()


def _format(fmt: bytes | None, args: int | None) -> str:
    if not fmt:
        return ""
    if _LIBS is None or args is None:
        return fmt.decode(errors="replace")
    buffer = ctypes.create_string_buffer(512)
    _LIBS[1].vsnprintf(buffer, len(buffer), fmt, args)
    return buffer.value.decode(errors="replace")


def _on_message(file: bytes | None, line: int, function: bytes | None, err: int,
                fmt: bytes | None, args: int | None) -> None:
    # Called by alsa-lib from C: it must never raise.
    try:
        key = (file or b"", line)
        with _counts_lock:
            seen = _counts[key] = _counts.get(key, 0) + 1
        if seen > _REPEATS and seen % 100:
            return
        text = _format(fmt, args)
        if err:
            text += f": {_strerror(err)}"
        log.debug("alsa.message source=%s:%d function=%s count=%d text=%r",
                  (file or b"?").decode(errors="replace"), line,
                  (function or b"?").decode(errors="replace"), seen, text)
    except Exception:  # noqa: S110 - a logging problem must not reach C
        pass


def _strerror(err: int) -> str:
    try:
        return os.strerror(abs(err))
    except ValueError:
        return str(err)


_HANDLER = _HANDLER_TYPE(_on_message)  # kept alive for as long as alsa-lib may call it


def route_alsa_messages() -> bool:
    """Send this thread's alsa-lib messages to the log; whether it could."""
    if _LIBS is None:
        return False
    if not getattr(_state, "routed", False):
        _LIBS[0].snd_lib_error_set_local(ctypes.cast(_HANDLER, ctypes.c_void_p))
        _state.routed = True
    return True
