"""The ``troupe`` command: demo, make-model, bench, store.

Every failure the user can cause ends in one line on stderr, never a traceback:
``troupe: error: ...`` and exit 2 (bad arguments, a model, store or file that cannot be
used, a context too long), or ``troupe: interrupted`` and exit 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio

from . import BLAS
from ._blas import REFERENCE, slow_blas_note
from ._errors import TroupeError
from ._serve import ServeExtraMissing

# Static caps that catch typos before a model loads; the model's own context length is
# checked when a turn starts (ContextLengthError, reported as one line).
MAX_AGENTS = 1024
MAX_SCALE_AGENTS = 100_000
MAX_TURNS = 1000
MAX_TOKENS = 32768
MAX_CONTEXT = 1 << 20
MAX_SEED = 2**63 - 1  # seeds live in [0, 2**63)

ERROR_EXIT = 2
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what shells report for Ctrl-C


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    parse.__name__ = "integer"  # what argparse names the type in its messages
    return parse


def _budget(text: str) -> str:
    from ._validate import parse_bytes

    try:
        parse_bytes(text, "--budget")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive(text: str) -> float:
    value = _temperature(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _directory(text: str) -> str:
    # An empty path means the current directory to pathlib, which nobody asks for this way.
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a directory, got an empty string")
    return text


def _writable_file(text: str) -> str:
    """A file the demo can write at its end, checked now so that a long run is not wasted."""
    path = Path(_directory(text))
    try:
        if path.exists():
            with path.open("a"):  # appends nothing: only asks whether it could
                pass
        else:
            with path.open("x"):
                pass
            path.unlink()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {exc.strerror or exc}") from None
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="troupe", description="troupe: an async actor runtime for LLM agents on MLX."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run a small multi-agent simulation")
    demo.add_argument("--agents", type=_int_in(2, MAX_AGENTS), default=8,
                      help=f"number of agents, 2 to {MAX_AGENTS} (default 8)")
    demo.add_argument("--turns", type=_int_in(1, MAX_TURNS), default=6,
                      help="rounds of conversation (default 6)")
    demo.add_argument("--model", default="embedded",
                      help="'embedded', 'embedded:tiny' or a local MLX model directory")
    demo.add_argument("--store", type=_directory, default=None,
                      help="store directory (default: memory only)")
    demo.add_argument("--max-tokens", type=_int_in(1, MAX_TOKENS), default=64,
                      help="tokens per reply (default 64)")
    demo.add_argument("--temperature", type=_temperature, default=0.8,
                      help="sampling temperature (default 0.8; 0 = greedy)")
    demo.add_argument("--seed", type=_int_in(0, MAX_SEED), default=0,
                      help="base seed of every turn (default 0)")
    demo.add_argument("--backend", choices=["trio", "asyncio"], default="trio",
                      help="the host event loop (default trio)")
    demo.add_argument("--json", type=_writable_file, default=None, metavar="FILE",
                      help="also write the final statistics to FILE as JSON")

    make = commands.add_parser("make-model", help="write the embedded model to a directory")
    make.add_argument("directory", type=_directory)
    make.add_argument("--size", choices=["tiny", "small"], default="small")

    bench = commands.add_parser(
        "bench", help="measure speed as ratios against a baseline run side by side",
        description="batching: batched vs one at a time, and cache reuse (the default); "
        "ttft: time to first token cold vs hot vs restored from disk at 1K-4K tokens; "
        "bytes: bytes the store writes over a 50-turn conversation; scale: many agents "
        "with >=1K-token contexts through a small memory budget with a store; "
        "peer: multi-agent workloads on troupe vs mlx_lm.server (a subprocess on the same "
        "model and BLAS); overhead: troupe's costs over a bare BatchGenerator, actor round "
        "trips, event-loop lag; structured: constrained decoding in the batch (schemas, "
        "choices) against free turns; http: the village's clients over HTTP on troupe serve "
        "vs mlx_lm.server, and the same turns through the Python API.")
    bench.add_argument("which", nargs="?", default="batching",
                       choices=["batching", "ttft", "bytes", "scale", "peer", "overhead",
                                "structured", "http"])
    bench.add_argument("--model", default=None,
                       help="default: 'embedded' ('embedded:tiny' for scale)")
    bench.add_argument("--agents", type=_int_in(1, MAX_SCALE_AGENTS), default=None,
                       help="default 8 (1000 for scale)")
    bench.add_argument("--max-tokens", type=_int_in(1, MAX_TOKENS), default=None,
                       help="default 32 (8 for scale)")
    bench.add_argument("--context", type=_int_in(16, MAX_CONTEXT), default=1024,
                       help="tokens of context for the cache-reuse measurement")
    bench.add_argument("--turns", type=_int_in(1, MAX_TURNS), default=2,
                       help="scale: turns each agent takes (default 2)")
    bench.add_argument("--budget", type=_budget, default="64MB",
                       help="scale: the KV memory budget (default 64MB)")
    bench.add_argument("--batch", type=_int_in(1, 256), default=8,
                       help="scale: max_batch_size (default 8)")
    bench.add_argument("--quick", action="store_true",
                       help="peer, overhead, structured, http: a small size that runs in "
                       "about a minute")
    bench.add_argument("--only", default=None, metavar="NAMES",
                       help="peer: comma-separated workloads "
                       "(village,crowd,restart,orchestrator; default all)")
    bench.add_argument("--json", type=_writable_file, default=None, metavar="FILE",
                       help="peer, overhead, http: also write the results to FILE as JSON")
    bench.add_argument("--chart", type=_writable_file, default=None, metavar="FILE",
                       help="peer: also draw the ratios as a PNG bar chart "
                       "(needs matplotlib: pip install 'troupe[chart]')")
    serve = commands.add_parser(
        "serve", help="serve the OpenAI, Anthropic and agents APIs over HTTP",
        description="Serve a runtime over HTTP: /v1/chat/completions, /v1/responses, "
        "/v1/models (OpenAI), /v1/messages (Anthropic), /v1/agents (troupe's agents), "
        "/health, /metrics, /openapi.json. SIGINT or SIGTERM stops accepting, lets "
        "requests in flight finish for --grace seconds, and closes the store; a second one "
        "stops at once. See docs/serve.md.")
    serve.add_argument("--model", default="embedded",
                       help="'embedded', 'embedded:tiny' or a local MLX model directory")
    serve.add_argument("--store", type=_directory, default=None,
                       help="store directory: agents and response chains survive a restart "
                       "(default: memory only)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_int_in(0, 65535), default=8000,
                       help="port (default 8000; 0 picks a free one)")
    serve.add_argument("--api-key", action="append", default=[], metavar="KEY",
                       help="an accepted API key (repeatable; also TROUPE_API_KEYS, "
                       "comma-separated)")
    serve.add_argument("--insecure-no-auth", action="store_true",
                       help="serve a non-loopback address without API keys")
    serve.add_argument("--kv-budget", type=_budget, default="1GiB",
                       help="KV memory budget (default 1GiB)")
    serve.add_argument("--max-batch-size", type=_int_in(1, 1024), default=32,
                       help="rows in the batch (default 32)")
    serve.add_argument("--max-pending", type=_int_in(1, 1 << 20), default=256,
                       help="turns under way past which requests get 503 (default 256)")
    serve.add_argument("--max-body", type=_budget, default="8MiB",
                       help="largest request body (default 8MiB)")
    serve.add_argument("--rate-limit", type=_positive, default=None, metavar="PER_SECOND",
                       help="requests per second per key (default: no limit)")
    serve.add_argument("--rate-burst", type=_int_in(1, 1 << 20), default=10,
                       help="requests a key may send at once under --rate-limit (default 10)")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="an origin browsers may call from (repeatable)")
    serve.add_argument("--grace", type=_temperature, default=10.0, metavar="SECONDS",
                       help="how long requests in flight may finish at shutdown (default 10)")
    serve.add_argument("--kept-conversations", type=_int_in(0, 1 << 20), default=256,
                       metavar="N", help="stateless conversations kept in memory for "
                       "clients that resend them (default 256)")
    serve.add_argument("--model-name", default=None,
                       help="the model id clients name (default: the model's name)")
    serve.add_argument("--backend", choices=["trio", "asyncio"], default="trio",
                       help="the event loop (default trio)")
    serve.add_argument("--quiet", action="store_true",
                       help="no JSON log line per request on stdout")

    store = commands.add_parser(
        "store", help="look after a store offline: check, ls, repair",
        description="check: verify a store (the catalog, every message's and KV file's "
        "checksum, files the catalog does not know); one line per finding; exit 0 if sound, "
        "1 if problems were found, 2 if it cannot be checked. ls: list its agents with their "
        "turns, messages, and the KV tokens and bytes stored for them. repair: keep each "
        "damaged agent's transcript up to its first bad message (printing the rest), drop "
        "rows of bad KV files, set aside files of openings the catalog never recorded. "
        "check and repair need the store closed; ls may run beside a runtime.")
    store.add_argument("action", choices=["check", "ls", "repair"])
    store.add_argument("directory", type=_directory)
    return parser


def _leaves(exc: BaseException) -> list[BaseException]:
    # Errors raised inside anyio.run and task groups arrive wrapped in exception groups,
    # often groups of one inside groups of one.
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc) or type(exc).__name__


PROBLEMS_EXIT = 1


def _store(args: argparse.Namespace) -> int:
    from .storage._inspect import check_store, list_agents, repair_store

    root = Path(args.directory)
    if args.action == "check":
        findings = check_store(root)
        for finding in findings:
            print(finding.text if finding.problem else f"note: {finding.text}")
        problems = sum(1 for f in findings if f.problem)
        print(f"{root}: {problems} problem{'s' if problems != 1 else ''}", file=sys.stderr)
        return PROBLEMS_EXIT if problems else 0
    if args.action == "ls":
        agents = list_agents(root)
        width = max((len(a.agent_id) for a in agents), default=5)
        print(f"{'agent':<{width}}  {'turns':>6}  {'messages':>8}  {'kv tokens':>9}  "
              f"{'kv bytes':>12}")
        for a in agents:
            print(f"{a.agent_id:<{width}}  {a.turns:>6}  {a.messages:>8}  {a.kv_tokens:>9}  "
                  f"{a.kv_bytes:>12}")
        return 0
    for line in repair_store(root):
        print(line)
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "store":
        return _store(args)
    if args.command == "make-model":
        from ._embedded import make_model

        path = make_model(args.directory, args.size)
        print(f"wrote the embedded {args.size} model to {path}")
        return 0
    if BLAS.name == REFERENCE:
        print(f"troupe: note: {slow_blas_note()}", file=sys.stderr, flush=True)
    if args.command == "demo":
        from ._demo import run_demo

        anyio.run(
            lambda: run_demo(
                agents=args.agents, turns=args.turns, model=args.model, store=args.store,
                max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                json_path=args.json,
            ),
            backend=args.backend,
        )
    elif args.command == "bench":
        anyio.run(lambda: _bench(args), backend="trio")
    elif args.command == "serve":
        anyio.run(lambda: _serve(args), backend=args.backend)
    return 0


def _serve_logging(*, quiet: bool) -> None:
    """One JSON line per request on stdout (the server's access log); warnings, troupe's
    and the server's, on stderr."""
    import logging

    access = logging.getLogger("troupe.server")
    access.propagate = False
    access.setLevel(logging.WARNING if quiet else logging.INFO)
    lines = logging.StreamHandler(sys.stdout)
    lines.setFormatter(logging.Formatter("%(message)s"))
    lines.addFilter(lambda record: record.levelno < logging.WARNING)
    problems = logging.StreamHandler(sys.stderr)
    problems.setLevel(logging.WARNING)
    problems.setFormatter(logging.Formatter("troupe: %(levelname)s: %(message)s"))
    access.addHandler(lines)
    access.addHandler(problems)
    # Hypercorn's own lines ("Running on ...") are said once on stderr by the command.
    logging.getLogger("troupe.server.hypercorn").setLevel(logging.WARNING)


async def _serve(args: argparse.Namespace) -> None:
    import os
    import signal

    from ._runtime import open_runtime
    from ._serve import ServeOptions, serve, server_app
    from ._validate import parse_bytes

    is_loopback = server_app().is_loopback  # without the serve extra: one line, exit 2

    keys = [*args.api_key, *filter(None, os.environ.get("TROUPE_API_KEYS", "").split(","))]
    options = ServeOptions(
        api_keys=tuple(keys), insecure_no_auth=args.insecure_no_auth,
        max_body_bytes=parse_bytes(args.max_body, "--max-body"), rate_limit=args.rate_limit,
        rate_burst=args.rate_burst, max_pending=args.max_pending,
        cors_origins=tuple(args.cors_origin), grace_seconds=args.grace,
        model_name=args.model_name, kept_conversations=args.kept_conversations)
    # Refused before the model loads: a typo'd host must not cost a minute of loading.
    if not keys and not args.insecure_no_auth and not is_loopback(args.host):
        raise ValueError(f"refusing to serve {args.host} without an API key: give one "
                         "(--api-key), or --insecure-no-auth to serve it open")
    _serve_logging(quiet=args.quiet)
    stop = anyio.Event()
    async with open_runtime(args.model, args.store, kv_budget=args.kv_budget,
                            max_batch_size=args.max_batch_size) as rt, \
            anyio.create_task_group() as outer:
        serving = anyio.CancelScope()

        async def signals() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
                async for _ in received:
                    if stop.is_set():
                        serving.cancel()  # a second signal: stop now
                        return
                    print("troupe: stopping", file=sys.stderr, flush=True)
                    stop.set()

        outer.start_soon(signals)
        with serving:
            async with anyio.create_task_group() as inner:
                url = await inner.start(lambda task_status: serve(
                    rt, host=args.host, port=args.port, options=options, shutdown=stop,
                    task_status=task_status))
                print(f"troupe: serving {rt.model.name} on {url}", file=sys.stderr,
                      flush=True)
        outer.cancel_scope.cancel()
    print("troupe: stopped", file=sys.stderr, flush=True)


async def _bench(args: argparse.Namespace) -> None:
    # The benches are a client package (benchmarks/), loaded only when one runs.
    from troupe.bench.batching import run_bench
    from troupe.bench.tiers import bench_bytes, bench_scale, bench_ttft

    model = args.model or ("embedded:tiny" if args.which == "scale" else "embedded")
    if args.which == "ttft":
        await bench_ttft(model=model)
    elif args.which == "bytes":
        await bench_bytes(model=model)
    elif args.which == "peer":
        from troupe.bench.peer import bench_peer

        await bench_peer(model=model, quick=args.quick, only=args.only,
                         json_path=args.json, chart_path=args.chart)
    elif args.which == "http":
        from troupe.bench.http import bench_http

        await bench_http(model=model, quick=args.quick, json_path=args.json)
    elif args.which == "overhead":
        from troupe.bench.overhead import bench_overhead

        await bench_overhead(model=model, quick=args.quick, json_path=args.json)
    elif args.which == "structured":
        from troupe.bench.structured import bench_structured

        await bench_structured(model=model, quick=args.quick)
    elif args.which == "scale":
        await bench_scale(model=model, agents=args.agents or 1000, turns=args.turns,
                          budget=args.budget, max_tokens=args.max_tokens or 8,
                          batch=args.batch)
    else:
        if (args.agents or 8) > MAX_AGENTS:
            raise ValueError(f"bench batching takes at most {MAX_AGENTS} agents")
        await run_bench(model=model, agents=args.agents or 8,
                        max_tokens=args.max_tokens or 32, context=args.context)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = _run(args)
    except BaseException as exc:  # sorted below; anything unexpected is re-raised
        leaves = _leaves(exc)
        if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            print("troupe: interrupted", file=sys.stderr)
            return INTERRUPTED_EXIT
        if not all(isinstance(leaf, TroupeError | ValueError | OSError | ServeExtraMissing)
                   for leaf in leaves):
            raise
        more = ""
        if len(leaves) > 1:
            # Agents failing together mostly fail alike (a context too small for all).
            alike = all(type(leaf) is type(leaves[0]) for leaf in leaves)
            more = f" (and {len(leaves) - 1} more {'like it' if alike else 'errors'})"
        print(f"troupe: error: {_describe(leaves[0])}{more}", file=sys.stderr)
        return ERROR_EXIT
    return code


if __name__ == "__main__":
    sys.exit(main())
