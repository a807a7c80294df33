"""``beamvision serve``: a model artifact over HTTP: a classify endpoint, and a Label Studio ML backend.

    beamvision serve --model models/flowers [--engine openvino] [--port 8080] [--token T]
    curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg' http://127.0.0.1:8080/v1/classify

The routes, answers and errors are ``beamvision.serving.app``'s; Label
Studio's protocol ``beamvision.serving.label_studio``'s. Images decode as
classify decodes them and run on classify's engines at ``--precision``;
concurrent requests share the engine's batch (``--batch_size``, waiting at
most ``--max_wait_ms`` for it to fill), with decode and inference threads
sized as a classify worker's. The server runs on uvicorn; SIGTERM or Ctrl-C
stops taking connections, answers the requests in flight, prints a summary
and exits 0 (a second Ctrl-C stops at once). Each request is logged at INFO
(``--quiet``: none).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
import time

from beamvision import console, storage
from beamvision.console import counted
from beamvision.models.artifact import verify_artifact
from beamvision.pipelines.flags import (
    UsageError,
    add_decode_arguments,
    add_engine_arguments,
    check_engine_arguments,
    parse,
    positive_float,
    positive_int,
)
from beamvision.serving.label_studio import check_labels_file
from beamvision.serving.service import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_BODY_MB,
    DEFAULT_MAX_WAIT_MS,
    DEFAULT_TOP_K,
    ServeConfig,
)

DEFAULT_PORT = 8080
TOKEN_ENV = "BEAMVISION_TOKEN"  # --token's default: a secret kept out of the process list
LABEL_STUDIO_TOKEN_ENV = "LABEL_STUDIO_API_KEY"  # --label_studio_token's default, as Label Studio's SDK reads
GRACEFUL_SHUTDOWN_SECONDS = 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODEL", help="the model artifact, local or URI")
    add_engine_arguments(parser)
    parser.add_argument(
        "--batch_size",
        type=positive_int,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"images per inference batch, gathered from concurrent requests (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--max_wait_ms",
        type=positive_float,
        default=DEFAULT_MAX_WAIT_MS,
        metavar="MS",
        help=f"how long a batch waits to fill after its first image (default {DEFAULT_MAX_WAIT_MS:g})",
    )
    parser.add_argument(
        "--top_k",
        type=positive_int,
        metavar="K",
        help=f"classes per answer (default {DEFAULT_TOP_K}, or every class of a smaller model)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        metavar="T",
        help=f"requests must send Authorization: Bearer T (default: ${TOKEN_ENV}; unset: no token)",
    )
    add_decode_arguments(parser)
    parser.add_argument(
        "--max_body_mb",
        type=positive_int,
        default=DEFAULT_MAX_BODY_MB,
        metavar="MB",
        help=f"larger request bodies, and files, are refused with 413 (default {DEFAULT_MAX_BODY_MB})",
    )
    parser.add_argument(
        "--allow_uris",
        nargs="+",
        default=[],
        metavar="PREFIX",
        help="folders or gs:// prefixes whose files a request may name (default none: images come as bodies)",
    )
    parser.add_argument(
        "--labels_file",
        metavar="FILE.json",
        help="keep Label Studio's annotations (its webhook) here, as the JSON export prepare --labels reads",
    )
    parser.add_argument(
        "--label_studio_url",
        metavar="URL",
        help="where Label Studio serves the tasks' images (default: what it sends at /setup)",
    )
    parser.add_argument(
        "--label_studio_token",
        default=os.environ.get(LABEL_STUDIO_TOKEN_ENV),
        metavar="T",
        help="its legacy API token or a personal access token, to fetch those images "
        f"(default: ${LABEL_STUDIO_TOKEN_ENV}, or /setup's)",
    )


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The flags as the service's configuration; a bad port is a one-line error."""
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: not a port (0 to 65535)")
    if args.labels_file and not storage.is_local(args.labels_file):
        raise UsageError(
            f"--labels_file {args.labels_file}: a local file (the server rewrites it on each event)"
        )
    if args.labels_file and os.path.exists(args.labels_file):
        check_labels_file(args.labels_file)
    return ServeConfig(
        model=args.model.rstrip("/"),
        engine=args.engine,
        precision=args.precision,
        batch_size=args.batch_size,
        max_wait_ms=args.max_wait_ms,
        top_k=args.top_k or DEFAULT_TOP_K,
        max_pixels=args.max_pixels,
        buffer_mb=args.buffer_mb,
        max_body_mb=args.max_body_mb,
        allow_uris=tuple(args.allow_uris),
        token=args.token or None,
        threshold=args.threshold,
        labels_file=args.labels_file,
        label_studio_url=args.label_studio_url,
        label_studio_token=args.label_studio_token or None,
    )


def run(argv: list[str] | None = None) -> None:
    """Serves ``--model`` until SIGTERM or Ctrl-C; prints a summary."""
    args = parse("beamvision serve", __doc__.splitlines()[0], add_arguments, argv)
    config = config_from_args(args)
    manifest = verify_artifact(config.model)
    check_engine_arguments(config.model, manifest, config.engine, config.threshold)
    config = dataclasses.replace(config, top_k=min(config.top_k, manifest.num_classes))
    listening = _bind(args.host, args.port)
    # (after the flags: --help loads neither the server nor the model)
    from beamvision.serving.app import create_app, serve
    from beamvision.serving.service import Service

    # A line per request (health checks too with --verbose; none with --quiet).
    level = logging.WARNING if console.is_quiet() else logging.DEBUG if args.verbose else logging.INFO
    logging.getLogger("beamvision.serve").setLevel(level)
    print(f"loading {manifest.name} version {manifest.version} for {config.engine} ...", flush=True)
    service = Service(config)
    host, port = listening.getsockname()[:2]
    print(
        f"serving {manifest.name} version {manifest.version} on http://{host}:{port} "
        f"({config.engine} at {config.precision}, batches of up to {config.batch_size}, "
        f"waiting at most {config.max_wait_ms:g} ms{', token required' if config.token else ''}); "
        "POST images to /v1/classify; Ctrl-C or SIGTERM stops",
        flush=True,
    )
    try:
        stopped_by = serve(create_app(service), listening, GRACEFUL_SHUTDOWN_SECONDS)
    finally:
        service.close()
    _print_summary(service, stopped_by)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use is a one-line error."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say so, and without it
        # Nagle's algorithm holds each response's body for the client's delayed ACK (~40 ms a request).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
    sock.set_inheritable(True)
    return sock


def _print_summary(service, stopped_by: str | None) -> None:
    stats = service.stats
    errors = sum(count for status, count in stats.by_status.items() if status >= 400)
    seconds = time.monotonic() - service.started
    latency = (
        f"; latency p50 {stats.percentile(50):.1f} ms, p99 {stats.percentile(99):.1f} ms"
        if stats.requests
        else ""
    )
    print(
        f"stopped{f' by {stopped_by}' if stopped_by else ''} after {seconds:.0f}s, every request in flight "
        f"answered: {counted(stats.requests, 'request')} ({counted(stats.images, 'image')} classified in "
        f"{counted(service.batcher.batches, 'batch', 'batches')}, {counted(errors, 'error')}){latency}",
        flush=True,
    )
