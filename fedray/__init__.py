"""fedray: federated and multi-agent training on Ray, with privacy built in."""

__version__ = "0.1.0"
