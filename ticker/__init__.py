"""Live GMV ticker: wire codec, aggregation state, MQTT adapter, websocket server, CLI."""
