"""runledger server: experiment tracking and a gate-guarded model registry over gRPC."""

__version__ = "0.1.0"
