"""BDR: block device replicator."""

__version__ = "0.1.0"
