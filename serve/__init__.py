"""Serving: one engine behind OpenAI-compatible HTTP and gRPC front ends."""
