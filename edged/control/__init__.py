"""Fleet control over MQTT: requests in the shape of Zigbee2MQTT's bridge API,
and the remote configuration layer they write.

`requests` parses and answers without I/O, `changes` plans a `config` set
without I/O, `layer` owns the layer's file, `verdict` judges the state, and
`service` is the thin adapter that the supervisor wires to the publisher.
"""
