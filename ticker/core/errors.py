"""The two kinds of error, split by whose fault it is.

* `ConfigError` -- the operator gave a bad setting; the CLI prints one line and exits 2.
* `ticker.core.wire.BatchError` -- a producer sent a bad batch; it is counted and dead-lettered.
"""


class ConfigError(ValueError):
    """A bad setting, named with its value: `--speed=0: must be positive or 'max'`."""
