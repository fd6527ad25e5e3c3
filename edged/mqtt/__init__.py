"""MQTT: topics, payloads and the publisher."""
