"""`edged fleet`: every edged on a broker, from its retained messages.

`model` turns the retained `availability`, `state` and `audio` payloads of
each device into a row and orders the rows with the devices in trouble
first (I/O-free; every payload is hostile), `table` draws them as text, and
`watch` subscribes on the broker with the daemon's own MQTT settings and
prints one JSON document, one table, or a live view.
"""
