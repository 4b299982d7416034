"""`python -m bench.bare_server --mode aio|sync`: Classify with nothing but the essentials.

An experiment for bench/tune.py, not a product: the same onnxruntime model and the same
DynamicBatcher as `python -m serving`, raw-pixel `Classify` only, and none of the per-request
bookkeeping (request ids, deadlines, metrics, access log, routing, corrupt-message handling).
Served by grpc.aio (`--mode aio`) or by grpc's thread-pool server (`--mode sync`), it answers
two questions: what does a thread-pool server change against grpc.aio, and what does our
bookkeeping cost against a bare handler? Accepts `python -m serving`'s launch flags (as
bench/servers.py:OurServer passes them) and ignores those it has no use for.
"""

from __future__ import annotations

import argparse
import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving import images as imaging
from serving.batching import DynamicBatcher
from serving.config import EVENT_LOOPS, ServerConfig
from serving.event_loop import loop_factory
from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from serving.proto.cifar10.classifier.v1 import classifier_pb2_grpc as pb_grpc
from serving.runtime import OnnxModel, RuntimeOptions

MAX_BATCH = 64
TOP_K = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_server", description=__doc__)
    parser.add_argument("--mode", choices=("aio", "sync"), required=True)
    parser.add_argument("--sync-workers", type=int, default=80, help="thread-pool size (--mode sync)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--default-model", default="cifar10")
    parser.add_argument("--intra-op-threads", type=int, default=0)
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default=ServerConfig.event_loop, help="--mode aio only")
    args, _ignored = parser.parse_known_args(argv)
    return args


def load(args: argparse.Namespace) -> tuple[OnnxModel, DynamicBatcher]:
    versions = sorted((p for p in (args.model_repository / args.default_model).iterdir() if p.name.isdigit()),
                      key=lambda p: int(p.name))
    model = OnnxModel(args.default_model, int(versions[-1].name), versions[-1],
                      RuntimeOptions(intra_op_threads=args.intra_op_threads))
    model.warm_up(MAX_BATCH)
    return model, DynamicBatcher(lambda images: (model.run(images),), MAX_BATCH, 0.0, 4096)


def pixels_of(request: pb.ClassifyRequest) -> np.ndarray:
    raw = request.image.raw
    return imaging.from_raw_pixels(raw.data, raw.height, raw.width, raw.channels, 1 << 24)[None]


def response_of(probabilities: np.ndarray, names: list[str]) -> pb.ClassifyResponse:
    order = np.argsort(-probabilities)[:TOP_K]
    return pb.ClassifyResponse(predictions=[
        pb.Prediction(label=names[i], class_index=int(i), probability=float(probabilities[i])) for i in order
    ])


SERVING = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def servicers(mode: str, batcher: DynamicBatcher, names: list[str]):
    """(Classifier, Health) for the mode; health is SERVING from the start (the model is warm)."""
    class SyncClassifier(pb_grpc.ClassifierServicer):
        def Classify(self, request, context):
            return response_of(batcher.submit(pixels_of(request)).result().probabilities[0], names)

    class AioClassifier(pb_grpc.ClassifierServicer):
        async def Classify(self, request, context):
            result = await asyncio.wrap_future(batcher.submit(pixels_of(request)))
            return response_of(result.probabilities[0], names)

    class SyncHealth(health_pb2_grpc.HealthServicer):
        def Check(self, request, context):
            return SERVING

    class AioHealth(health_pb2_grpc.HealthServicer):
        async def Check(self, request, context):
            return SERVING

    return (SyncClassifier(), SyncHealth()) if mode == "sync" else (AioClassifier(), AioHealth())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model, batcher = load(args)
    options = [("grpc.max_concurrent_streams", 1000)]
    classifier, health = servicers(args.mode, batcher, model.card.class_names)

    def build(server) -> None:
        pb_grpc.add_ClassifierServicer_to_server(classifier, server)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        server.add_insecure_port(f"127.0.0.1:{args.port}")

    if args.mode == "sync":
        server = grpc.server(ThreadPoolExecutor(max_workers=args.sync_workers), options=options)
        build(server)
        server.start()
        server.wait_for_termination()
        return

    async def serve() -> None:
        server = grpc.aio.server(options=options)
        build(server)
        await server.start()
        await server.wait_for_termination()

    with asyncio.Runner(loop_factory=loop_factory(args.event_loop)) as runner:
        runner.run(serve())


if __name__ == "__main__":
    main()
