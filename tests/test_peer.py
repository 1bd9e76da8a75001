"""`troupe bench peer` drives a real mlx_lm.server subprocess and troupe through the same
turns: the harness works on a fresh install, and what it compares is like for like."""

from __future__ import annotations

import io
from pathlib import Path

from troupe.bench.peer import Sizes, run_workload

TINY = Sizes(village_agents=3, world_tokens=300, persona_tokens=40, village_rounds=2,
             message_tokens=30, reply_tokens=8, crowd_agents=4, crowd_context_tokens=200,
             crowd_rounds=1, crowd_budget="1MB", workers=2, tasks=1)


async def test_the_village_runs_alike_on_both_systems(tmp_path: Path) -> None:
    out = io.StringIO()
    result = await run_workload("village", "embedded:tiny", TINY, tmp_path, out)

    ours, theirs = result.timed(result.troupe), result.timed(result.server)
    turns = TINY.village_agents * TINY.village_rounds
    assert ours.turns == theirs.turns == turns
    assert result.replies_compared == turns
    # Greedy on the same model and BLAS: the first round's replies agree, but for the
    # leading space the server's streaming detokenizer trims.
    first_round = TINY.village_agents
    for mine, peer in zip(ours.replies[:first_round], theirs.replies[:first_round],
                          strict=True):
        assert mine.lstrip(" ") == peer.lstrip(" ")
    # troupe's agents share the world prompt's two full blocks (one copy).
    assert result.troupe_statistics["blocks_shared"] >= TINY.world_tokens // 128
    assert ours.tokens_generated > 0
    assert theirs.tokens_generated > 0
    assert result.ratio > 0
    assert "ratio server / troupe on the rounds" in out.getvalue()


async def test_bench_http_drives_troupe_serve_like_mlx_lm_server(tmp_path: Path) -> None:
    from troupe.bench.http import bench_http

    out = io.StringIO()
    result = await bench_http(model="embedded:tiny", quick=True, json_path=None, out=out,
                              sizes=TINY)
    turns = TINY.village_agents * TINY.village_rounds
    assert result.python.turns == result.troupe_serve.turns == result.mlx_server.turns == turns
    # Greedy, one model: over HTTP troupe answers as through its Python API, and each
    # client's resent conversation prefills about what the Python API's agent does.
    assert result.differing_serve == 0
    assert result.troupe_serve.replies == result.python.replies
    assert result.troupe_serve.tokens_prefilled <= result.python.tokens_prefilled + 32
    assert "ratio mlx_lm.server / troupe serve" in out.getvalue()
