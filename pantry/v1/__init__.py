"""Generated protobuf and gRPC modules for proto/pantry/v1/*.proto (make proto)."""
