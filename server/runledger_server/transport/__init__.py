"""gRPC servicers: protobuf <-> domain conversion only; errors.py maps refusals to statuses."""
