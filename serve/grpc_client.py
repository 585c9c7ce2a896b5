"""A small gRPC client for `hyla serve`: `python -m hyla.serve.grpc_client "Once upon a time"`.

Streams the continuation to stdout; `--info` prints the model info instead, `--health` the health
status. The API key, if the server has one, is read from `--api-key` or `$HYLA_API_KEY`.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from google.protobuf.json_format import MessageToJson
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hyla.serve.proto import hyla_pb2 as pb
from hyla.serve.proto import hyla_pb2_grpc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hyla.serve.grpc_client", description=__doc__.split("\n")[0])
    parser.add_argument("prompt", nargs="?", default="The capital of France is")
    parser.add_argument("--target", default="127.0.0.1:50051", help="host:port of the gRPC server")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--api-key", default=os.environ.get("HYLA_API_KEY"))
    parser.add_argument("--info", action="store_true", help="print ModelInfo as JSON and exit")
    parser.add_argument("--health", action="store_true", help="print the health status and exit")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
    with grpc.insecure_channel(args.target) as channel:
        try:
            if args.health:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
                print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
                return 0
            stub = hyla_pb2_grpc.GenerationStub(channel)
            if args.info:
                print(MessageToJson(stub.ModelInfo(pb.ModelInfoRequest(), metadata=metadata, timeout=args.timeout)))
                return 0
            request = pb.GenerateRequest(
                text=args.prompt,
                sampling=pb.SamplingOptions(max_tokens=args.max_tokens, temperature=args.temperature),
            )
            for message in stub.GenerateStream(request, metadata=metadata, timeout=args.timeout):
                for completion in message.completions:
                    sys.stdout.write(completion.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
