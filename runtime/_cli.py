"""The ``troupe`` command: demo, make-model, bench."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import anyio

from ._errors import TroupeError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="troupe", description="troupe: an async actor runtime for LLM agents on MLX."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run a small multi-agent simulation")
    demo.add_argument("--agents", type=int, default=8, help="number of agents (default 8)")
    demo.add_argument("--turns", type=int, default=6, help="rounds of conversation (default 6)")
    demo.add_argument("--model", default="embedded",
                      help="'embedded', 'embedded:tiny' or a local MLX model directory")
    demo.add_argument("--store", default=None, help="store directory (default: memory only)")
    demo.add_argument("--max-tokens", type=int, default=64, help="tokens per reply (default 64)")
    demo.add_argument("--temperature", type=float, default=0.8,
                      help="sampling temperature (default 0.8; 0 = greedy)")
    demo.add_argument("--seed", type=int, default=0, help="base seed of every turn (default 0)")
    demo.add_argument("--backend", choices=["trio", "asyncio"], default="trio",
                      help="the host event loop (default trio)")
    demo.add_argument("--json", default=None, metavar="FILE",
                      help="also write the final statistics to FILE as JSON")

    make = commands.add_parser("make-model", help="write the embedded model to a directory")
    make.add_argument("directory")
    make.add_argument("--size", choices=["tiny", "small"], default="small")

    bench = commands.add_parser("bench", help="measure batching and cache reuse (ratios)")
    bench.add_argument("--model", default="embedded")
    bench.add_argument("--agents", type=int, default=8)
    bench.add_argument("--max-tokens", type=int, default=32)
    bench.add_argument("--context", type=int, default=1024,
                       help="tokens of context for the cache-reuse measurement")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "make-model":
            from ._embedded import make_model

            path = make_model(args.directory, args.size)
            print(f"wrote the embedded {args.size} model to {path}")
        elif args.command == "demo":
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
            from ._bench import run_bench

            anyio.run(
                lambda: run_bench(model=args.model, agents=args.agents,
                                  max_tokens=args.max_tokens, context=args.context),
                backend="trio",
            )
    except (TroupeError, ValueError, TypeError) as exc:
        print(f"troupe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
