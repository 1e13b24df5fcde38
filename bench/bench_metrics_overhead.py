"""What the Prometheus interceptor costs a gRPC call: a trivial unary call and a stream of
small messages, served by grpc.aio in a child process with and without
`metrics.MetricsInterceptor`, called from this process over loopback.

    python bench/bench_metrics_overhead.py [--calls 3000] [--messages 20000] [--rounds 3]

Prints calls/s and messages/s for both servers side by side (best of the rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import time

import grpc

from lmforge_server.redis_server import free_port

SERVICE = "bench.Echo"


def _serve(port: int, with_metrics: bool, ready) -> None:
    from lmforge_server import metrics

    async def ping(request: bytes, context) -> bytes:
        return request

    async def burst(request: bytes, context):
        for _ in range(int(request)):
            yield b"x" * 16

    async def main() -> None:
        interceptors = [metrics.MetricsInterceptor("bench")] if with_metrics else []
        server = grpc.aio.server(interceptors=interceptors)
        handlers = {
            "Ping": grpc.unary_unary_rpc_method_handler(ping),
            "Burst": grpc.unary_stream_rpc_method_handler(burst),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


def _measure(port: int, calls: int, messages: int) -> tuple[float, float]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        ping = ch.unary_unary(f"/{SERVICE}/Ping")
        burst = ch.unary_stream(f"/{SERVICE}/Burst")
        for _ in range(200):  # warm up
            ping(b"hi")
        t = time.perf_counter()
        for _ in range(calls):
            ping(b"hi")
        unary = calls / (time.perf_counter() - t)
        t = time.perf_counter()
        n = sum(1 for _ in burst(str(messages).encode()))
        stream = n / (time.perf_counter() - t)
    return unary, stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    servers = {}
    for with_metrics in (False, True):
        port, ready = free_port("127.0.0.1"), ctx.Event()
        proc = ctx.Process(target=_serve, args=(port, with_metrics, ready), daemon=True)
        proc.start()
        ready.wait(30)
        servers[with_metrics] = (port, proc)
    try:
        for _ in range(args.rounds):  # alternate, so machine noise hits both alike
            for with_metrics, (port, _proc) in servers.items():
                results[with_metrics].append(_measure(port, args.calls, args.messages))
    finally:
        for _port, proc in servers.values():
            proc.terminate()
    print(f"{'server':<22}{'unary calls/s':>15}{'stream msgs/s':>15}")
    for with_metrics, label in ((False, "no interceptor"), (True, "MetricsInterceptor")):
        unary = max(r[0] for r in results[with_metrics])
        stream = max(r[1] for r in results[with_metrics])
        print(f"{label:<22}{unary:>15,.0f}{stream:>15,.0f}")


if __name__ == "__main__":
    main()
