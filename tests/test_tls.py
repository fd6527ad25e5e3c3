"""MQTT over TLS with a client certificate; an unverifiable broker is refused."""

from __future__ import annotations

import shutil
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import API_KEY, Stack
from tests.support.broker import Mosquitto, Subscriber
from tests.support.certs import Pki, make_ca, make_pki
from tests.support.mic import FifoMic
from tests.support.stt_double import SttDouble
from tests.support.tonespeech import script
from tests.support.waiting import wait_until

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_broker(tmp_path: Path, pki: Pki) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "tls-broker", extra=(
        f"cafile {pki.ca}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
        "require_certificate true\n"
    )).start()
    yield broker
    broker.stop()


def retained_availability(broker: Mosquitto, pki: Pki) -> bytes | None:
    """Read the retained availability over TLS, as a TLS-speaking consumer would:
    what came before a marker of our own, published once subscribed."""
    got: list[bytes] = []
    marker = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="tls-reader")
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    client.tls_set_context(context)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe("edged/testpi/#")
    client.on_subscribe = lambda c, u, mid, rcs, p: c.publish("edged/testpi/_marker", b"", qos=1)
    client.on_message = lambda c, u, m: (marker.set() if m.topic.endswith("/_marker") else
                                         got.append(m.payload)
                                         if m.topic == "edged/testpi/availability" else None)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        assert marker.wait(10), "our own marker did not come back"
    finally:
        client.loop_stop()
        client.disconnect()
    return got[0] if got else None


def test_connects_with_ca_and_client_certificate(
    stack: Stack, mic: FifoMic, pki: Pki, tls_broker: Mosquitto
) -> None:
    daemon = stack.daemon(mqtt={"port": tls_broker.port, "ca_file": str(pki.ca),
                                "cert_file": str(pki.client_cert),
                                "key_file": str(pki.client_key)})
    daemon.wait_for_log("mqtt.connected host=127.0.0.1 tls=true")
    wait_until(lambda: retained_availability(tls_broker, pki) == b"online",
               "a retained `online` over TLS", timeout=10)


def test_refuses_a_broker_certificate_it_cannot_verify(
    stack: Stack, mic: FifoMic, pki: Pki, tls_broker: Mosquitto, tmp_path: Path
) -> None:
    stranger, _ = make_ca(tmp_path / "other", "stranger")
    daemon = stack.daemon(mqtt={"port": tls_broker.port, "ca_file": str(stranger),
                                "cert_file": str(pki.client_cert),
                                "key_file": str(pki.client_key)})
    daemon.wait_for_log("mqtt.connect_failed")
    assert "CERTIFICATE_VERIFY_FAILED" in daemon.log
    assert "mqtt.connected" not in daemon.log
    assert retained_availability(tls_broker, pki) is None
    assert daemon.process is not None
    assert daemon.process.poll() is None, "the daemon stays up and keeps trying"


def test_missing_certificate_file_is_a_configuration_error(
    stack: Stack, mic: FifoMic, tmp_path: Path
) -> None:
    daemon = stack.daemon(mqtt={"ca_file": str(tmp_path / "nope.crt")}).expect(status=78)
    assert daemon.wait(20) == 78
    assert "mqtt.ca_file" in daemon.log


@pytest.fixture
def wss_double(pki: Pki) -> Iterator[SttDouble]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    server = SttDouble(api_key=API_KEY, tls=context).start()
    yield server
    server.stop()


def test_wss_certificates_are_verified_by_default(
    stack: Stack, mic: FifoMic, pki: Pki, wss_double: SttDouble
) -> None:
    stack.stt_url = wss_double.url
    daemon = stack.daemon()
    daemon.wait_for_log("stt.connect_failed")
    assert "CERTIFICATE_VERIFY_FAILED" in daemon.log
    assert not wss_double.sessions, "no audio to a server we cannot verify"


def test_wss_with_a_private_ca(
    stack: Stack, mic: FifoMic, pki: Pki, wss_double: SttDouble, subscriber: Subscriber
) -> None:
    stack.stt_url = wss_double.url
    stack.daemon(stt={"ca_file": str(pki.ca)})
    audio, _ = script([["foxtrot"]])
    mic.play(audio)
    assert subscriber.next("edged/testpi/transcript", timeout=20).json()["text"] == "Foxtrot."
