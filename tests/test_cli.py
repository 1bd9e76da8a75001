"""The troupe command at its edges: every failure is one line and an exit status, no traceback."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import trio

import troupe
from conftest import PYTHON
from troupe._cli import main

CLI = [PYTHON, "-m", "troupe._cli"]
REFERENCE = "reference (bundled with mlx)"
NOTE = "troupe: note: MLX is using its slow reference BLAS"


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


async def _run_all(
    runs: list[tuple[list[str], dict[str, str]]], cwd: Path
) -> list[subprocess.CompletedProcess[str]]:
    # Side by side: each is a fresh interpreter, mostly waiting on imports.
    results: list[subprocess.CompletedProcess[str] | None] = [None] * len(runs)

    async def one(i: int) -> None:
        args, env = runs[i]
        results[i] = await trio.to_thread.run_sync(lambda: _run(args, env, cwd))

    async with trio.open_nursery() as nursery:
        for i in range(len(runs)):
            nursery.start_soon(one, i)
    return [r for r in results if r is not None]


def _error_lines(stderr: str, *, note: bool) -> list[str]:
    """stderr without the BLAS note, after checking the note is there exactly when due."""
    assert "Traceback" not in stderr
    assert "ExceptionGroup" not in stderr
    assert "BlasWarning" not in stderr  # the command's own note, not a Python warning
    lines = stderr.splitlines()
    notes = [line for line in lines if line.startswith(NOTE)]
    assert len(notes) == (1 if note else 0), stderr
    return [line for line in lines if not line.startswith(NOTE)]


# The cases, run as the command runs: one process each.
BAD_ARGUMENTS = [
    (["demo", "--max-tokens", "0"], "--max-tokens"),
    (["demo", "--max-tokens", "100000"], "--max-tokens"),
    (["demo", "--temperature", "nan"], "--temperature"),
    (["demo", "--temperature", "-1"], "--temperature"),
    (["demo", "--seed", "-5"], "--seed"),
    (["demo", "--seed", str(2**63)], "--seed"),
    (["demo", "--store", ""], "--store"),
    (["demo", "--json", "/nonexistent/x.json"], "--json"),
]
# More of the same kind, through the same entry point in this process (no interpreter start).
MORE_BAD_ARGUMENTS = [
    (["demo", "--temperature", "inf"], "--temperature"),
    (["demo", "--agents", "1"], "--agents"),
    (["demo", "--agents", "1000000"], "--agents"),
    (["demo", "--turns", "0"], "--turns"),
    (["demo", "--turns", "10000000"], "--turns"),
    (["demo", "--json", "/proc/x"], "--json"),
    (["make-model", ""], "directory"),
    (["bench", "--agents", "0"], "--agents"),
    (["bench", "--max-tokens", "100000"], "--max-tokens"),
    (["bench", "--context", "2"], "--context"),
    (["bench", "--context", str(10**9)], "--context"),
    (["bench", "scale", "--budget", "9" * 400 + "MB"], "--budget"),  # once a traceback
    (["bench", "scale", "--budget", "8EiB"], "--budget"),
    (["bench", "scale", "--budget", "4611686018427387905"], "--budget"),  # 2**62 + 1
]


async def test_bad_arguments_are_refused_before_anything_runs(
    tmp_path: Path, troupe_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    results = await _run_all([([*CLI, *args], troupe_env) for args, _ in BAD_ARGUMENTS],
                             cwd=tmp_path)
    assert list(await trio.Path(tmp_path).iterdir()) == []  # `--store ''` once wrote a store here
    for (args, flag), result in zip(BAD_ARGUMENTS, results, strict=True):
        assert result.returncode == 2, (args, result.stderr)
        assert result.stdout == "", args  # no banner: nothing started, no model loaded
        last = _error_lines(result.stderr, note=False)[-1]
        assert last.startswith(f"troupe {args[0]}: error: argument {flag}: "), (args, last)
    for args, flag in MORE_BAD_ARGUMENTS:
        with pytest.raises(SystemExit) as exited:
            main(args)
        assert exited.value.code == 2, args
        out, err = capsys.readouterr()
        assert out == "", args
        last = _error_lines(err, note=False)[-1]
        assert last.startswith(f"troupe {args[0]}: error: argument {flag}: "), (args, last)


async def test_failures_at_run_time_are_one_line_each(
    tmp_path: Path, troupe_env: dict[str, str]
) -> None:
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("mine")
    report = tmp_path / "report.json"
    demo = [*CLI, "demo", "--model", "embedded:tiny", "--agents", "2"]
    slow = dict(troupe_env, TROUPE_BLAS="/nonexistent")
    runs = [
        # Within the static cap but beyond the tiny model's context of 2048 tokens.
        ([*demo, "--max-tokens", "5000", "--json", str(report)], troupe_env),
        ([*demo, "--store", "/proc/x"], troupe_env),
        ([*demo, "--model", "/nonexistent/model"], troupe_env),
        ([*CLI, "make-model", "/proc/x", "--size", "tiny"], troupe_env),
        ([*CLI, "make-model", str(in_the_way), "--size", "tiny"], troupe_env),
        # The console script, on the reference BLAS: its note is a line of its own.
        ([str(Path(PYTHON).parent / "troupe"), "demo", "--model", "/nonexistent/model"], slow),
    ]
    results = await _run_all(runs, cwd=tmp_path)
    slow_here = troupe.BLAS.name == REFERENCE
    errors = []
    for (args, env), result in zip(runs, results, strict=True):
        assert result.returncode == 2, (args, result.stderr)
        # The note comes before a demo or bench starts, on the reference BLAS only.
        lines = _error_lines(result.stderr, note="demo" in args and (slow_here or env is slow))
        assert len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith("troupe: error: ")
        errors.append(lines[0])
    context, store, model, proc, file, console = errors
    assert "exceeds the model's context of 2048" in context
    assert not report.exists()  # checked up front, written only by a demo that finished
    assert "/proc/x" in store
    assert "/nonexistent/model" in model
    assert proc.startswith("troupe: error: /proc/x: ")
    assert file == f"troupe: error: {in_the_way}: exists and is not a directory"
    assert in_the_way.read_text() == "mine"
    assert console == model
    with pytest.raises(NotADirectoryError):
        troupe.make_model(in_the_way)


async def test_ctrl_c_mid_demo_exits_130_with_one_line(troupe_env: dict[str, str]) -> None:
    def interrupt() -> tuple[int, str, str, str]:
        with subprocess.Popen(
            # Short turns so that the first shows soon; 320 of them so that many are left.
            [*CLI, "demo", "--model", "embedded:tiny", "--agents", "16", "--turns", "20",
             "--max-tokens", "16"], env=troupe_env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ) as demo:
            assert demo.stdout is not None
            progress = ""
            for line in demo.stdout:  # wait for the first finished turn
                if line.startswith("[  1/320]"):
                    progress = line
                    break
            # How the child treats SIGINT when it is sent (blocked, ignored, caught), for
            # the failure message: a Ctrl-C that goes unheard must say why.
            ended = demo.poll() is not None
            status = Path(f"/proc/{demo.pid}/status")
            dispositions = [] if ended else [
                line for line in status.read_text().splitlines()
                if line.startswith(("SigBlk", "SigIgn", "SigCgt"))]
            demo.send_signal(signal.SIGINT)
            rest, stderr = demo.communicate(timeout=120)
            why = (f"ended before the signal: {ended}; {dispositions}; the demo's stderr: "
                   f"{stderr[-500:]!r}; its stdout's end: {rest[-500:]!r}")
            return demo.returncode, progress, stderr, why

    # A shell's background job (`pytest &` in a script) starts with SIGINT ignored, and an
    # ignored signal stays ignored across fork and exec: the demo would never hear it.
    # Give it the disposition an interactive shell gives (a handled signal resets on exec).
    inherited = signal.getsignal(signal.SIGINT)
    if inherited == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        returncode, progress, stderr, why = await trio.to_thread.run_sync(interrupt)
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert progress, stderr
    assert returncode == 130, why
    lines = _error_lines(stderr, note=troupe.BLAS.name == REFERENCE)
    assert lines == ["troupe: interrupted"]


def test_bench_overhead_writes_its_figures(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # In this process (its own trio loop; no async test around it): no interpreter start.
    report = tmp_path / "overhead.json"
    assert main(["bench", "overhead", "--quick", "--model", "embedded:tiny",
                 "--json", str(report)]) == 0
    out = capsys.readouterr().out
    for section in ("troupe bench overhead:", "decode", "round trips", "loop lag", "itl"):
        assert section in out, out
    figures = json.loads(report.read_text())
    decode = figures["decode"]
    assert decode["prompt_length_mismatches"] == 0
    assert decode["greedy_sequences_differing"] == 0
    assert decode["greedy_tokens_differing"] == 0
    assert decode["tokens_generated"] > 0
    for key in ("troupe_tokens_per_s", "bare_tokens_per_s", "ratio", "overall_ratio"):
        assert decode[key] > 0, key
    trips = figures["round_trips"]
    for loop in ("trio", "asyncio"):
        for kind in ("sequential", "concurrent"):
            assert trips[f"{loop}_{kind}_per_s"] > 0
    for phase in ("idle", "decode", "restore"):
        lag = figures["loop_lag"][phase]
        assert lag["samples"] > 0, phase
        for key in ("p50_ms", "p99_ms", "max_ms", "loop_busy_p99_ms",
                    "wakeup_overshoot_p99_ms"):
            assert lag[key] >= 0, (phase, key)
    assert figures["loop_lag"]["restore"]["restores"] > 0  # the round did restore from disk
    itl = figures["itl"]
    for run in ("alone", "joined", "during_prefill"):
        assert itl[run]["p50_ms"] > 0, run
        assert itl[run]["p99_ms"] > 0, run
    assert itl["long_prompt_tokens"] > 0
    assert itl["prefill_engine_steps"] >= itl["prefill_chunks"] > 0


async def test_serve_without_the_serve_extra_says_what_to_install(
    tmp_path: Path, troupe_env: dict[str, str]
) -> None:
    # As if Starlette were not installed: an import of it fails, as it would then.
    blocked = ("import sys; sys.modules['starlette'] = None; "
               "from troupe._cli import main; sys.exit(main(['serve', '--port', '0']))")
    (result,) = await _run_all([([PYTHON, "-c", blocked], troupe_env)], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("troupe: ")
              and "note:" not in line]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("troupe: error: troupe serve needs the serve extra: "
                                "pip install 'troupe[serve]' (")
    assert "starlette" in errors[0]
    assert "Traceback" not in result.stderr
