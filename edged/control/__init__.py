"""Fleet control over MQTT: requests in the shape of Zigbee2MQTT's bridge API,
the remote configuration layer they write, and the privacy mute.

`requests` parses and answers without I/O, `changes` plans a `config` set
without I/O, `layer` owns the layer's file, `verdict` judges the state,
`mute` owns the mute flag and its command, and `service` is the thin adapter
that the supervisor wires to the publisher.
"""
