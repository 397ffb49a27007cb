"""The pure core: the wire codec, the aggregate state, the screen feed and replay control.
No I/O: what these modules do is decided by their arguments, so tests drive them directly."""
