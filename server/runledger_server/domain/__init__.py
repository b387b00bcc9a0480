"""Pure rules of runledger: no I/O, no grpc, no SQL."""
