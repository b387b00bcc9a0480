"""Generated protobuf and gRPC stubs for the runledger.v1 API (do not edit; run scripts/gen_protos.sh)."""
