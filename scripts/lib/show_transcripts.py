"""Print edged's transcripts as they arrive over MQTT (used by scripts/demo).

    python show_transcripts.py PORT TOPIC_ROOT COUNT_FILE

Prints each final and availability change; appends one line per transcript
to COUNT_FILE so the demo can tell whether any arrived.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def main() -> int:
    port, root, count_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]

    def on_connect(client: paho.Client, *_: Any) -> None:
        client.subscribe(f"{root}/#", qos=1)

    def on_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        kind = message.topic.rsplit("/", 1)[-1]
        if kind == "transcript":
            body = json.loads(message.payload)
            print(f"  [{body['start']:6.2f}s - {body['end']:6.2f}s] #{body['seq']}: "
                  f"{body['text']}", flush=True)
            with open(count_file, "a") as handle:
                handle.write(message.payload.decode() + "\n")
        elif kind == "availability":
            print(f"  ({message.topic} = {message.payload.decode()})", flush=True)

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="edged-demo-viewer")
    client.on_connect = on_connect
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
