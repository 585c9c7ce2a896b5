"""Generated gRPC stubs for `hyla.v1` (regenerate with generate.sh; the .proto is hyla/v1/hyla.proto)."""
