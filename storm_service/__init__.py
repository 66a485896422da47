"""stormd, the STORM host daemon: pool, protocol, sessions and serving loop."""

__version__ = "0.1.0"
