"""Network steps both services share: TCP to the first address that takes
it, and a TLS handshake, each failure named."""

from __future__ import annotations

import ipaddress
import socket
import ssl
from typing import Any


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def resolve(host: str, port: int) -> list[Any] | str:
    """getaddrinfo's answers for a TCP connection, or why there are none."""
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        return describe_error(error)
    except UnicodeError as error:  # a name IDNA cannot encode
        return str(error)


def describe_error(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def connect_any(infos: list[Any], timeout: float) -> tuple[socket.socket | None, OSError]:
    """A TCP connection to the first address that takes one, or the first error."""
    errors: list[OSError] = []
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError as error:
            sock.close()
            errors.append(error)
            continue
        return sock, OSError()
    return None, errors[0] if errors else OSError("no address")


def tcp_failure(error: OSError, host: str, port: int, timeout: float,
                 refused_fix: str) -> tuple[str, str]:
    at = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    if isinstance(error, ConnectionRefusedError):
        return f"connection refused at {at}", refused_fix
    if isinstance(error, TimeoutError):
        return (f"no answer from {at} within {timeout:.0f} s",
                f"check the network and any firewall between this device and {at}")
    return (f"cannot connect to {at}: {describe_error(error)}",
            "check this device's network (`ip address`, `ip route`)")


def tls_handshake(sock: socket.socket, context: ssl.SSLContext, host: str,
                   port: int) -> str | tuple[str, bool]:
    """The TLS version agreed, or (the problem, whether the certificate was it)."""
    try:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            return tls.version() or "TLS"
    except ssl.SSLCertVerificationError as error:
        message = error.verify_message or error.reason or str(error)
        return f"the certificate of {host} was not accepted: {message}", True
    except ssl.SSLError as error:
        return f"the TLS handshake with {host}:{port} failed: {error.reason or error}", False
    except TimeoutError:
        return f"the TLS handshake with {host}:{port} timed out", False
    except OSError as error:
        return f"the TLS handshake with {host}:{port} failed: {describe_error(error)}", False
