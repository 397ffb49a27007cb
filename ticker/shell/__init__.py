"""The shells: what moves bytes between the core and the world -- the MQTT adapter, the
aggregator process, checkpoints on disk, the websocket server and the embedded broker."""
