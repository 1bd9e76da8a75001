"""``troupe bench http``: the village's clients over HTTP, on ``troupe serve`` and on
``mlx_lm.server``, and the same turns through troupe's Python API, as ratios in one run.

The village (``troupe bench peer``'s): agents whose system prompts share a ~1K-token world
prompt answer a message each, all at once, round after round. Over HTTP each agent is an
OpenAI client that keeps its conversation and resends it whole every turn (streamed,
greedy, ``stream_options.include_usage``), so a server prefills only what its cache does
not hold. Both servers run as subprocesses on the same model directory and BLAS, with the
same prefill chunk and decode batch; the Python API runs in this process. Model load is
outside every timing; each system is warmed up first.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import anyio
import attrs

from troupe import BLAS

from .peer import (
    BATCH,
    CONCURRENCY,
    FULL,
    QUICK,
    Phase,
    ServerSystem,
    Sizes,
    TroupeSystem,
    _compare,
    _Recorder,
    village,
)

GOAL = 1.3  # mlx_lm.server's wall time / troupe serve's, on the village's rounds


def _troupe_command() -> str:
    """The installed ``troupe`` command (beside this interpreter, as pip puts it)."""
    beside = Path(sys.executable).parent / "troupe"
    found = str(beside) if beside.exists() else shutil.which("troupe")
    if found is None:
        raise ValueError("bench http needs the `troupe` command installed (pip install -e .)")
    return found


class TroupeServeSystem(ServerSystem):
    """``troupe serve`` in a subprocess, driven exactly as ``mlx_lm.server`` is."""

    name = "troupe serve"
    checks_blas = False  # the same troupe, loading the same BLAS the same way

    def command(self, port: int) -> list[str]:
        # The clients name the model "default_model", as mlx_lm.server wants.
        return [_troupe_command(), "serve", "--model", str(self.model_dir), "--host",
                "127.0.0.1", "--port", str(port), "--model-name", "default_model",
                "--max-batch-size", str(BATCH), "--max-pending", "4096"]


@attrs.frozen
class HttpResult:
    python: Phase
    troupe_serve: Phase
    mlx_server: Phase
    compared: int
    differing_serve: int
    differing_server: int

    @property
    def ratio(self) -> float:
        """mlx_lm.server's wall time ÷ troupe serve's."""
        return self.mlx_server.seconds / self.troupe_serve.seconds

    @property
    def overhead(self) -> float:
        """troupe serve's wall time ÷ the Python API's: what HTTP costs."""
        return self.troupe_serve.seconds / self.python.seconds


async def _run(system: Any, out: TextIO, sizes: Sizes) -> Phase:
    recorder = _Recorder(system, out)
    await village(recorder, sizes, None)
    [phase] = recorder.phases
    return phase


async def bench_http(*, model: str, quick: bool, json_path: str | None,
                     out: TextIO = sys.stdout, sizes: Sizes | None = None) -> HttpResult:
    """Run the village on the three systems and print the comparison (``sizes``: the
    village's, instead of --quick's or the full run's)."""
    sizes = sizes or (QUICK if quick else FULL)
    print(f"troupe bench http{' --quick' if quick else ''}: model {model!r}, BLAS {BLAS.name}, "
          f"{sizes.village_agents} clients, a shared ~{sizes.world_tokens}-token world prompt, "
          f"{sizes.village_rounds} rounds of {sizes.reply_tokens} tokens, greedy, "
          f"{CONCURRENCY} turns in flight", file=out, flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="troupe-http-") as scratch:
        python = TroupeSystem(model, Path(scratch) / "store", None)
        try:
            await python.open()
            ours = await _run(python, out, sizes)
            model_dir = Path(python.runtime.model.path)
        finally:
            await python.close()
        phases = []
        for system in (TroupeServeSystem(model_dir, Path(scratch) / "serve.log", 0, None),
                       ServerSystem(model_dir, Path(scratch) / "server.log",
                                    4 * sizes.village_agents + 16, None)):
            try:
                await system.open()
                phases.append(await _run(system, out, sizes))
            finally:
                with anyio.CancelScope(shield=True):
                    await system.close()
    serve, server = phases
    compared, differing_serve, _ = _compare([ours], [serve])
    _, differing_server, _ = _compare([ours], [server])
    result = HttpResult(ours, serve, server, compared, differing_serve, differing_server)
    for name, p in (("python API", ours), ("troupe serve", serve), ("mlx_lm.server", server)):
        print(f"  {name:<14} {p.seconds:7.1f}s {p.turns:4} turns "
              f"{p.turns / p.seconds:6.2f} req/s  prefilled {p.tokens_prefilled:7}  "
              f"TTFT p50 {p.ttft_p50 * 1e3:6.0f} ms p99 {p.ttft_p99 * 1e3:6.0f} ms", file=out)
    print(f"  ratio mlx_lm.server / troupe serve: {result.ratio:.2f}x (goal {GOAL}x); "
          f"troupe serve / python API: {result.overhead:.2f}x; greedy replies differing from "
          f"the python API's: troupe serve {differing_serve}, mlx_lm.server {differing_server} "
          f"of {compared}", file=out)
    print(f"(whole run {time.perf_counter() - started:.0f}s)", file=out, flush=True)
    if json_path:
        def phase(p: Phase) -> dict[str, Any]:
            return {"seconds": p.seconds, "turns": p.turns, "requests_per_second":
                    p.turns / p.seconds, "tokens_prefilled": p.tokens_prefilled,
                    "ttft_p50_seconds": p.ttft_p50, "ttft_p99_seconds": p.ttft_p99}
        report = {"model": model, "blas": BLAS.name, "quick": quick,
                  "sizes": attrs.asdict(sizes), "ratio": result.ratio, "goal": GOAL,
                  "overhead": result.overhead, "python": phase(ours),
                  "troupe_serve": phase(serve), "mlx_server": phase(server),
                  "replies_compared": compared, "replies_differing_serve": differing_serve,
                  "replies_differing_server": differing_server}
        await anyio.Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return result
