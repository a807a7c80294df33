"""Latency and throughput of ``beamvision serve`` against a server calling the Keras model once per request.

    python benchmarks/serve.py [--model DIR] [--requests 200] [--engines tensorflow openvino]

Trains mobilenet_v2 at 64 px with beamvision's own pipeline (prepare, then
train for 3 epochs) on crops of 7 real photographs that ship in scikit-image
and scikit-learn (or takes ``--model``), then starts the servers, each in its
own process on a free 127.0.0.1 port, all up before the first request:

- baseline: a minimal Starlette app on uvicorn (this file, ``--baseline_server``)
  that decodes each request's body as classify decodes (``decode_image``) and
  calls ``model.predict_on_batch`` on a batch of one, in Starlette's thread
  pool, so concurrent requests run concurrently but never share a batch;
- ``beamvision serve`` (each of ``--engines``, fp32), which gathers concurrent
  requests into the engine's batch (default ``--batch_size 16 --max_wait_ms 5``);
  with ``--quiet``: no log line per request, as the baseline logs none.

The client (httpx.AsyncClient in this process, on the same machine) posts
photo-like 640x480 JPEGs to ``/v1/classify`` with 1, 8 and 64 workers, each
sending requests back to back: warm-up requests first, then ``--requests``
(at least 4 per worker) timed one by one. Each level runs against every
server in turn (an idle one takes no CPU), so other work on the machine
weighs on them alike. Latency is client-side (p50, p99); throughput is the
requests answered over the level's wall time; the ratio is beamvision's
throughput over the baseline's.

Memory: against ``beamvision serve`` (the first engine), ``--memory_requests``
more requests of a small 160x120 JPEG at concurrency 8, sampling the server
process's RSS every 1,000 requests: first, last, largest and the growth.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import numpy as np  # noqa: E402
from common import BEAMVISION, cpu_description, make_jpegs, trained_photo_model  # noqa: E402

CONCURRENCY = (1, 8, 64)
MEMORY_CONCURRENCY = 8
MEMORY_SAMPLE_EVERY = 1000
READY_SECONDS = 300  # a server that has not answered /health by then failed to start


# --- the baseline server (its own process: --baseline_server) ------------------------------------


def baseline_server(model_dir: str, port: int) -> None:
    """One Keras call per request: decode, ``predict_on_batch`` on a batch of one, top 5 as JSON."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from beamvision.models.artifact import load_artifact
    from beamvision.transforms.decode import decode_image

    artifact = load_artifact(model_dir)
    model, manifest = artifact.model, artifact.manifest
    size, labels = manifest.input_size, list(manifest.labels)
    model.predict_on_batch(np.zeros((1, size, size, 3), np.uint8))  # traced now, not on the first request

    def predict(data: bytes) -> dict:
        pixels = decode_image(data, size).pixels[None]
        probabilities = np.asarray(model.predict_on_batch(pixels))[0]
        top = np.argsort(-probabilities)[:5]
        top_k = [{"label": labels[i], "score": round(float(probabilities[i]), 6)} for i in top]
        return {
            "label": top_k[0]["label"],
            "score": top_k[0]["score"],
            "top_k": top_k,
            "model_name": manifest.name,
            "model_version": manifest.version,
        }

    async def health(request):
        return JSONResponse({"status": "UP"})

    async def classify(request):
        return JSONResponse(await run_in_threadpool(predict, await request.body()))

    app = Starlette(routes=[Route("/health", health), Route("/v1/classify", classify, methods=["POST"])])
    print(f"serving on http://127.0.0.1:{port}", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- servers under test as subprocesses ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server subprocess on a free port: started, waited for at /health, stopped with SIGTERM."""

    def __init__(self, name: str, argv: list[str], port: int):
        import httpx

        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()
        started = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                self._reader.join(5)
                sys.stderr.write("".join(self.lines[-60:]))
                raise SystemExit(f"{name}: the server exited with {self.proc.returncode} before it was ready")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - started > READY_SECONDS:
                self.stop()
                raise SystemExit(f"{name}: not answering {self.url}/health after {READY_SECONDS}s")
            time.sleep(0.25)
        self.ready_seconds = time.perf_counter() - started

    def rss_mb(self) -> float:
        import psutil

        root = psutil.Process(self.proc.pid)
        tree = [root, *root.children(recursive=True)]
        return sum(p.memory_info().rss for p in tree if p.is_running()) / 2**20

    def stop(self) -> tuple[int, str]:
        """SIGTERM, then the exit status and the last line printed (beamvision serve's summary)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(5)
        printed = [line.strip() for line in self.lines if line.strip()]
        return code, printed[-1] if printed else ""


# --- the client -----------------------------------------------------------------------------------


async def _load(url: str, bodies: list[bytes], concurrency: int, count: int, on_done=None) -> dict:
    """``count`` requests from ``concurrency`` workers, back to back: latencies, wall time, errors."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    sent = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Content-Type": "image/jpeg"}
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:

        async def worker():
            nonlocal sent
            while sent < count:
                body = bodies[sent % len(bodies)]
                sent += 1
                started = time.perf_counter()
                response = await client.post(f"{url}/v1/classify", content=body, headers=headers)
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200 or "label" not in response.json():
                    errors.append(f"{response.status_code} {response.text[:200]}")
                if on_done is not None:
                    on_done(len(latencies))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    if errors:
        raise SystemExit(f"{len(errors)} of {count} requests to {url} failed, e.g. {errors[0]}")
    ms = np.asarray(latencies) * 1000
    return {
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "rate": count / seconds,
        "count": count,
    }


def _level(server: Server, bodies: list[bytes], concurrency: int, requests: int) -> dict:
    """One concurrency level against one server: warm-up requests, then the timed ones."""
    asyncio.run(_load(server.url, bodies, concurrency, max(16, 2 * concurrency)))
    result = asyncio.run(_load(server.url, bodies, concurrency, max(requests, 4 * concurrency)))
    p50, p99, rate = result["p50"], result["p99"], result["rate"]
    print(
        f"  {server.name}, concurrency {concurrency}: {result['count']} requests, p50 {p50:.1f} ms, "
        f"p99 {p99:.1f} ms, {rate:.1f} req/s",
        flush=True,
    )
    return result


def _memory(server: Server, bodies: list[bytes], total: int) -> dict:
    asyncio.run(_load(server.url, bodies, MEMORY_CONCURRENCY, 200))  # warm-up
    samples = [(0, server.rss_mb())]

    def on_done(done: int) -> None:
        if done % MEMORY_SAMPLE_EVERY == 0:
            samples.append((done, server.rss_mb()))

    started = time.perf_counter()
    result = asyncio.run(_load(server.url, bodies, MEMORY_CONCURRENCY, total, on_done))
    result["seconds"] = time.perf_counter() - started
    result["samples"] = samples
    return result


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _measure(servers: list, args, model: str, bodies: list[bytes], small: list[bytes]):
    """Starts the servers (appended to ``servers`` as they start), runs every level, stops them."""
    port = _free_port()
    servers.append(
        Server("baseline", [sys.executable, __file__, "--baseline_server", model, str(port)], port)
    )
    for engine in args.engines:
        port = _free_port()
        flags = ["--model", model, "--engine", engine, "--precision", "fp32", "--port", str(port), "--quiet"]
        servers.append(Server(f"beamvision {engine}", [*BEAMVISION, "serve", *flags], port))
    print("ready: " + ", ".join(f"{s.name} in {s.ready_seconds:.0f}s" for s in servers), flush=True)
    results: dict[str, dict[int, dict]] = {s.name: {} for s in servers}
    for concurrency in CONCURRENCY:
        for server in servers:
            results[server.name][concurrency] = _level(server, bodies, concurrency, args.requests)
    memory = None
    if args.memory_requests:
        print(f"  memory: {args.memory_requests:,} requests of 160x120 JPEGs ...", flush=True)
        memory = _memory(servers[1], small, args.memory_requests)
    stopped = {}
    for server in servers:
        code, last = server.stop()
        if code != 0 and server is not servers[0]:  # (uvicorn.run re-raises SIGTERM: the baseline's -15)
            raise SystemExit(f"{server.name}: exited with {code} on SIGTERM: {last}")
        stopped[server.name] = last

    return results, memory, stopped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model artifact to serve (default: train one in --workdir)")
    parser.add_argument("--workdir", default="/tmp/bv-bench-serve")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per concurrency level")
    parser.add_argument("--memory_requests", type=int, default=10_000, help="0: skip the memory phase")
    parser.add_argument("--engines", nargs="+", default=["tensorflow"], choices=["tensorflow", "openvino"])
    parser.add_argument("--baseline_server", nargs=2, metavar=("MODEL", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        baseline_server(args.baseline_server[0], int(args.baseline_server[1]))
        return
    began = time.perf_counter()
    work = args.workdir
    os.makedirs(work, exist_ok=True)
    print(f"cpu: {cpu_description()}; load average {os.getloadavg()[0]:.2f} at the start", flush=True)
    model = args.model or trained_photo_model(work)[0]
    bodies = [_read(p) for p in make_jpegs(os.path.join(work, "jpegs-640x480"), 64, (640, 480))]
    small = [_read(p) for p in make_jpegs(os.path.join(work, "jpegs-160x120"), 64, (160, 120), seed=1)]

    # Every server is up before the first level, and each level runs against each in turn, so that
    # other work on the machine weighs on them alike (an idle server takes no CPU).
    servers: list[Server] = []
    try:
        results, memory, stopped = _measure(servers, args, model, bodies, small)
    finally:  # a server that failed to start, or an interrupt: none is left running
        for server in servers:
            if server.proc.poll() is None:
                server.proc.kill()

    names = [s.name for s in servers]
    cells = ["baseline p50 / p99 ms | baseline req/s"]
    cells += [f"{n} p50 / p99 ms | {n} req/s | {n} throughput ratio" for n in names[1:]]
    print(
        f"\nmobilenet_v2 at 64 px ({model}), 640x480 JPEG bodies, client on the same machine; "
        f"{cpu_description()}\n"
    )
    print(f"| concurrency | {' | '.join(cells)} |")
    print("|---|---|---|" + "---|---|---|" * len(names[1:]))
    for concurrency in CONCURRENCY:
        row = [f"{concurrency}"]
        base = results["baseline"][concurrency]["rate"]
        for n in names:
            r = results[n][concurrency]
            row += [f"{r['p50']:.1f} / {r['p99']:.1f}", f"{r['rate']:.1f}"]
            if n != "baseline":
                row.append(f"{r['rate'] / base:.2f}x")
        print(f"| {' | '.join(row)} |")
    if memory:
        rss = [mb for _, mb in memory["samples"]]
        print(
            f"\nmemory ({names[1]}, {args.memory_requests:,} requests of 160x120 JPEGs at concurrency "
            f"{MEMORY_CONCURRENCY}, {memory['rate']:.0f} req/s, {memory['seconds']:.0f}s): RSS first "
            f"{rss[0]:,.0f} MB, last {rss[-1]:,.0f} MB, max {max(rss):,.0f} MB, "
            f"growth {rss[-1] - rss[0]:+,.1f} MB"
        )
        print(f"RSS every {MEMORY_SAMPLE_EVERY:,} requests (MB): " + ", ".join(f"{mb:,.0f}" for mb in rss))
    for name in names[1:]:
        print(f"\n{name} on SIGTERM: {stopped[name]}")
    print(f"\ntook {time.perf_counter() - began:.0f}s; load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
