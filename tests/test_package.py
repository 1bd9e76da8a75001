"""The package's shape: public names, one namespace, the embedded model, the CLI, examples."""

from __future__ import annotations

import ast
import collections
import importlib
import inspect
import json
import pkgutil
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import trio

import troupe
import troupe.actors
import troupe.kernel
import troupe.storage
from conftest import PYTHON
from troupe import _blas

ROOT = Path(__file__).resolve().parent.parent
HAS_OPENBLAS = any(Path(p).exists() for p in _blas._CANDIDATES)  # where distros put it


def test_public_names_are_pinned() -> None:
    assert sorted(troupe.__all__) == sorted([
        "BLAS", "Agent", "AgentDamagedError", "AgentExistsError", "AgentFailedError",
        "AgentNotFoundError", "AgentStatistics", "BlasStatus", "BlasWarning",
        "ContextLengthError", "EngineError", "IncompleteReplyError",
        "Message", "ModelInfo", "ModelLoadError", "Reply", "ReplyStream", "Runtime",
        "RuntimeClosedError", "RuntimeStatistics", "Sampling", "ServeOptions", "StoreError",
        "Tool", "ToolCall", "TroupeError", "__version__", "make_model", "open_runtime", "serve",
    ])
    for name in troupe.__all__:
        assert getattr(troupe, name) is not None
    errors = [getattr(troupe, n) for n in troupe.__all__ if n.endswith("Error")]
    assert all(issubclass(e, troupe.TroupeError) for e in errors if e is not troupe.TroupeError)


def test_each_public_name_is_exported_by_exactly_one_module() -> None:
    # As trio's test_core_is_properly_reexported: one public surface, the troupe module,
    # and troupe.kernel for those who write actors of their own. troupe.bench is a client.
    public = [importlib.import_module(info.name) for info in
              pkgutil.walk_packages(troupe.__path__, "troupe.")
              if not any(part.startswith("_") for part in info.name.split("."))
              and not info.name.startswith("troupe.bench")]
    exports = collections.Counter(
        name for module in [troupe, *public] for name in getattr(module, "__all__", []))
    assert [name for name, count in exports.items() if count > 1] == []
    assert {m.__name__: sorted(m.__all__) for m in public if getattr(m, "__all__", [])} == {
        "troupe.kernel": ["Actor", "Request"]}
    for name in troupe.__all__:
        obj = getattr(troupe, name)
        if isinstance(obj, type) or inspect.isfunction(obj):
            assert obj.__module__ == "troupe", name


# -- troupe.bench (benchmarks/) is a client: troupe's public API only --------------------------

BENCH = ROOT / "benchmarks"
BENCH_PACKAGE = "troupe.bench"
_REFLECTION = {"getattr", "setattr", "delattr", "hasattr"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _past_the_api(module: str) -> bool:
    """Whether importing ``module`` reaches into troupe past its public API."""
    parts = module.split(".")
    if parts[0] != "troupe" or module == BENCH_PACKAGE or module.startswith(BENCH_PACKAGE + "."):
        return False
    # troupe.actors is public but its names are troupe's (troupe.Agent...): it is being
    # split up, so a client of it would follow each move.
    return any(_private(p) for p in parts) or module.startswith("troupe.actors")


def _own_private_names(tree: ast.Module) -> set[str]:
    """Private names the module itself defines on its own objects: ``self._x = ...``, and
    the methods and class attributes of its classes (the bench's own state, not troupe's)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name) and node.value.id == "self"):
            names.add(node.attr)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    names.add(item.name)
                elif isinstance(item, ast.Assign | ast.AnnAssign):
                    targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                    names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _reaches_into_troupe(source: str, package: str) -> list[str]:
    """What in ``source`` (a module of ``package``) goes past troupe's public API: an import
    of a private troupe module or name or of troupe.actors, a relative import out of
    troupe.bench, a ``._name`` attribute that is not the module's own (``self._x`` it
    assigns, its classes' methods), ``getattr(x, "_name")`` and friends, or a "troupe._"
    string (code run in a subprocess)."""
    tree = ast.parse(source)
    own = _own_private_names(tree)
    found: list[str] = []
    for node in ast.walk(tree):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if _past_the_api(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level - 1 >= len(base) - 1:
                    found.append(f"{where}: relative import out of {BENCH_PACKAGE}")
                    continue
                base = base[:len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
                if not (module + ".").startswith(BENCH_PACKAGE + "."):
                    found.append(f"{where}: relative import out of {BENCH_PACKAGE}")
                continue
            module = node.module or ""
            if _past_the_api(module):
                found.append(f"{where}: from {module} import ...")
            elif module == "troupe":
                found += [f"{where}: from troupe import {a.name}" for a in node.names
                          if _past_the_api(f"troupe.{a.name}")]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            mine = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if not (mine and node.attr in own):
                found.append(f"{where}: .{node.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in _REFLECTION and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _private(node.args[1].value)):
            found.append(f"{where}: {node.func.id}(..., {node.args[1].value!r})")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and "troupe._" in node.value):
            found.append(f"{where}: {node.value!r}")
    return found


def test_the_benches_reach_troupe_only_through_its_public_api() -> None:
    modules = sorted(BENCH.rglob("*.py"))
    assert {m.name for m in modules} >= {
        "__init__.py", "batching.py", "tiers.py", "overhead.py", "peer.py"}
    found = {}
    for path in modules:
        parts = path.relative_to(BENCH).with_suffix("").parts
        package = ".".join([BENCH_PACKAGE, *parts[:-1]])
        if problems := _reaches_into_troupe(path.read_text(), package):
            found[str(path.relative_to(ROOT))] = problems
    assert found == {}


def test_the_bench_rule_catches_each_way_in() -> None:
    # The rule above on code that breaks it each way it knows, and on code that keeps it.
    broken = """
import troupe._runtime
import troupe.actors._engine as engine
from troupe import _blas
from troupe import actors
from troupe._runtime import open_runtime
from troupe.actors import Agent
from troupe.storage._blocks import BlockId
from .. import BLAS
from ... import anything
async def f(rt, agent):
    rt._services.renderer
    agent._actor.state
    self._private_of_troupe
    getattr(rt, "_engine")
    run("python -m troupe._cli")
"""
    found = _reaches_into_troupe(broken, BENCH_PACKAGE)
    # One finding on each line but the function's own.
    assert sorted(int(f.split()[1].rstrip(":")) for f in found) == [
        n for n, line in enumerate(broken.split("\n"), 1)
        if line.strip() and not line.startswith("async def")], found
    kept = """
import troupe
import troupe.kernel
from troupe import BLAS, Agent, open_runtime
from troupe.kernel import Actor
from troupe.bench.tiers import world_text
from .tiers import chars_per_token
class Mine:
    def __init__(self) -> None:
        self._rt = None
    def _helper(self) -> None:
        self._rt.model.path, self._helper(), rt.__class__
"""
    assert _reaches_into_troupe(kept, BENCH_PACKAGE) == []


def _run(args: list[str], env: dict[str, str], cwd: Path | None = None,
         timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


async def test_only_the_troupe_namespace_is_installed(
    tmp_path: Path, troupe_env: dict[str, str]
) -> None:
    probe = ("import importlib.util as u, troupe.actors, troupe.storage, troupe.bench; "
             "print([n for n in ('runtime', 'actors', 'storage', 'benchmarks') "
             "if u.find_spec(n)]); "
             "print(troupe.BLAS.name)")
    result = await trio.to_thread.run_sync(
        lambda: _run([PYTHON, "-c", probe], troupe_env, cwd=tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "[]"


async def test_make_model_writes_a_directory_mlx_lm_loads(
    tmp_path: Path, troupe_env: dict[str, str]
) -> None:
    cli = [PYTHON, "-m", "troupe._cli", "make-model"]
    for target in ("one", "two"):
        made = await trio.to_thread.run_sync(
            lambda t=target: _run([*cli, str(tmp_path / t), "--size", "tiny"], troupe_env))
        assert made.returncode == 0, made.stderr
    one, two = tmp_path / "one", tmp_path / "two"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes()  # same seed, same bytes
    config = json.loads((one / "config.json").read_text())
    assert config["model_type"] == "llama"
    probe = (
        "import troupe, mlx.utils; from mlx_lm import load; "
        f"m, t = load({str(one)!r}); "
        "print(sum(v.size for _, v in mlx.utils.tree_flatten(m.parameters()))); "
        "ids = t.apply_chat_template([{'role': 'user', 'content': 'Hi é'}], "
        "add_generation_prompt=True); print(repr(t.decode(ids)))"
    )
    loaded = await trio.to_thread.run_sync(lambda: _run([PYTHON, "-c", probe], troupe_env))
    assert loaded.returncode == 0, loaded.stderr
    params, rendered = loaded.stdout.splitlines()
    assert 2_000_000 <= int(params) <= 3_000_000
    assert rendered == repr("<s><|user|>\nHi é<|end|>\n<|assistant|>\n")


async def test_a_local_model_directory_works_like_the_embedded_one(tiny_model: Path) -> None:
    async with troupe.open_runtime(model="embedded:tiny") as rt:
        by_name = await (await rt.spawn("a")).say("Hello", max_tokens=6)
    async with troupe.open_runtime(model=tiny_model) as rt:
        by_path = await (await rt.spawn("a")).say("Hello", max_tokens=6)
        assert rt.model.path == str(tiny_model)
    assert by_name == by_path


async def test_demo_runs_and_continues_from_its_store(
    tmp_path: Path, troupe_env: dict[str, str]
) -> None:
    args = [PYTHON, "-m", "troupe._cli", "demo", "--agents", "3", "--turns", "2",
            "--model", "embedded:tiny", "--max-tokens", "8", "--store", str(tmp_path / "s")]
    report = tmp_path / "report.json"
    first = await trio.to_thread.run_sync(lambda: _run([*args, "--json", str(report)], troupe_env))
    assert first.returncode == 0, first.stderr
    stats = json.loads(report.read_text())["statistics"]
    assert stats["agents"] == 3
    assert stats["turns_completed"] == 6
    assert stats["tokens_generated"] == 48
    assert stats["caches_saved"] == 6
    assert "[  6/6]" in first.stdout
    summary = first.stdout.split("summary", 1)[1]
    assert "agents             3" in summary
    assert "turns              6" in summary
    assert "tokens generated   48" in summary
    second = await trio.to_thread.run_sync(
        lambda: _run([*args, "--backend", "asyncio"], troupe_env))
    assert second.returncode == 0, second.stderr
    assert "continuing the conversation from the store" in second.stdout
    assert "restored 3" in second.stdout


async def test_examples_run(tmp_path: Path, troupe_env: dict[str, str]) -> None:
    quick = await trio.to_thread.run_sync(lambda: _run(
        [PYTHON, str(ROOT / "examples" / "quickstart.py"), "embedded:tiny"], troupe_env))
    assert quick.returncode == 0, quick.stderr
    assert "alice has 4 messages" in quick.stdout
    typed = await trio.to_thread.run_sync(lambda: _run(
        [PYTHON, str(ROOT / "examples" / "structured.py"), "embedded:tiny"], troupe_env))
    assert typed.returncode == 0, typed.stderr
    assert "scout: " in typed.stdout
    assert "->  Move(" in typed.stdout
    assert "helper made 1 tool call(s)" in typed.stdout
    app = [PYTHON, str(ROOT / "examples" / "asyncio_app.py"), "embedded:tiny",
           str(tmp_path / "store")]
    first = await trio.to_thread.run_sync(lambda: _run(app, troupe_env))
    second = await trio.to_thread.run_sync(lambda: _run(app, troupe_env))
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert "continuing: 2 messages on record" in second.stdout
    assert "narrator reused 0 cached tokens" not in second.stdout
    served = await trio.to_thread.run_sync(lambda: _run(
        [PYTHON, str(ROOT / "examples" / "http_server.py"), "embedded:tiny"], troupe_env))
    assert served.returncode == 0, served.stderr
    assert "anthropic: streamed" in served.stdout
    assert " 0 read from cache" not in served.stdout


# Which BLAS a fresh process binds MLX to, its name and file, whether MLX's matmul agrees
# with numpy's (300x517x129, float64 reference), and the warnings it printed.
_BLAS_PROBE = """
import os, numpy as np, troupe, mlx.core as mx
a = np.random.default_rng(0).standard_normal((300, 517)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((517, 129)).astype(np.float32)
with mx.stream(mx.cpu):
    got = np.array(mx.matmul(mx.array(a), mx.array(b)))
want = a.astype(np.float64) @ b.astype(np.float64)
mapped = open("/proc/self/maps").read()
print(troupe.BLAS.name)
print(troupe.BLAS.path)
print(float(np.abs(got - want).max() / np.abs(want).max()))
print(bool(troupe.BLAS.path) and os.path.realpath(troupe.BLAS.path) in mapped)
"""


def _mkl_wheel() -> Path | None:
    """libmkl_rt as the mkl wheel (the [fast] extra) installs it into this environment."""
    try:
        files = metadata.distribution("mkl").files or []
    except metadata.PackageNotFoundError:
        return None
    found = [Path(str(f.locate())).resolve() for f in files if f.name.startswith("libmkl_rt.so")]
    return found[0] if found else None


async def test_mlx_runs_on_the_fastest_blas_installed(troupe_env: dict[str, str]) -> None:
    mkl = _mkl_wheel()
    default_env = {k: v for k, v in troupe_env.items() if k != "TROUPE_BLAS"}
    envs = {
        "default": default_env,
        "mkl": dict(troupe_env, TROUPE_BLAS="mkl"),
        "reference": dict(troupe_env, TROUPE_BLAS="/nonexistent/libopenblas.so.0"),
    }
    results = {}
    async with trio.open_nursery() as nursery:
        for label, env in envs.items():
            async def probe(label: str = label, env: dict[str, str] = env) -> None:
                results[label] = await trio.to_thread.run_sync(
                    lambda: _run([PYTHON, "-c", _BLAS_PROBE], env))
            nursery.start_soon(probe)
    for label, result in results.items():
        assert result.returncode == 0, (label, result.stderr)
    report = {label: r.stdout.split("\n") for label, r in results.items()}
    for name, _, error, _, _ in report.values():
        assert float(error) < 1e-4, name  # every BLAS computes the same product

    # The system's OpenBLAS first, then the wheel's MKL, then MLX's own reference BLAS.
    expected = "OpenBLAS" if HAS_OPENBLAS else "MKL" if mkl else "reference (bundled with mlx)"
    name, path, _, mapped, _ = report["default"]
    assert name == expected
    assert mapped == str(expected != "reference (bundled with mlx)")
    assert (results["default"].stderr.count("BlasWarning") == 1) == (name.startswith("ref"))

    # TROUPE_BLAS=mkl asks for the wheel's MKL: used when installed, said so when not.
    name, path, _, mapped, _ = report["mkl"]
    if mkl is not None:
        assert (name, path, mapped) == ("MKL", str(mkl), "True")
        assert "BlasWarning" not in results["mkl"].stderr
    else:
        assert name == "reference (bundled with mlx)"
        assert "(TROUPE_BLAS=mkl: none installed)" in results["mkl"].stderr

    # A path that cannot be loaded means the reference BLAS, with one warning and the fixes.
    name, path, _, mapped, _ = report["reference"]
    assert (name, path, mapped) == ("reference (bundled with mlx)", "None", "False")
    warning = results["reference"].stderr
    assert warning.count("BlasWarning") == 1
    assert "could not be loaded" in warning
    assert "apt-get install libopenblas0-pthread" in warning
    if platform.machine() == "x86_64":
        assert "pip install mkl" in warning
