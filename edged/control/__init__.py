"""Fleet control over MQTT: remote requests, the privacy mute, remote configuration."""
