"""The MLX engine: the model, its batch, and the one thread that touches MLX.

The engine thread owns the model and mlx-lm's BatchGenerator, takes typed commands from a
thread-safe queue, and steps the batch while any turn is in flight. ``start_turn`` puts a
turn in and returns its ``TurnChannel``; each step's events go back to the event loop in
one hop (``anyio.from_thread.run_sync``) and are routed there to their turns' channels, so
the loop never waits on MLX and no actor stands between a turn and the engine.
"""

from __future__ import annotations

import _thread
import contextlib
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import attrs
import trio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._errors import EngineError, RuntimeClosedError
from .._records import Sampling
from ._constraint import Grammars
from ._heap import trim_heap, trim_heap_above
from ._mlx import (
    Batch,
    GrammarMask,
    KVBlock,
    KVLayers,
    LoadedModel,
    ModelInfo,
    StepOutput,
    TextStream,
    block_bytes,
    cache_tokens,
    cut_blocks,
    make_sampler,
    release_thread_resources,
    row_cache,
)

logger = logging.getLogger("troupe")
T = TypeVar("T")


@attrs.frozen
class TokenEvent:
    """New tokens of one turn and the text they complete (possibly empty)."""

    key: int
    tokens: tuple[int, ...]
    text: str


@attrs.frozen
class CutKV:
    """The KV a turn left behind, cut into blocks on the engine thread.

    Covers ``tokens``; ``blocks`` are the full blocks from chain position ``first_block``
    on (those before it came in with the turn), each with its bytes as ``views``;
    ``tail`` holds the tokens after the last full block.
    """

    tokens: tuple[int, ...]
    first_block: int
    blocks: list[KVBlock] = attrs.field(repr=False)
    views: list[list[memoryview]] = attrs.field(repr=False)
    tail: KVBlock | None = attrs.field(repr=False)
    tail_views: list[memoryview] | None = attrs.field(repr=False)


@attrs.frozen
class PromptEvent:
    """A turn's prompt is wholly in the cache: its new full blocks and its partial last
    one, cut then, so that turns waiting for them start now rather than when this one
    ends. ``kv`` goes to the turn's ``KVSink``; the turn's channel gets the event
    without it."""

    key: int
    kv: CutKV | None


@attrs.frozen
class FinishEvent:
    """A turn left the batch: finished, stopped, cancelled or failed.

    ``kv`` is what its KV became (None if there is nothing new to keep), the blocks a
    PromptEvent handed over included; ``reused`` is how many tokens the turn took from
    the KV it came with.
    """

    key: int
    finish_reason: str
    text: str
    tokens: tuple[int, ...]
    kv: CutKV | None
    """Goes to the turn's ``KVSink``; the turn's channel gets the event without it."""
    reused: int = 0
    error: BaseException | None = None
    complete: bool | None = None
    """For a constrained turn: whether its tokens make a whole value of its grammar (None
    for a free turn)."""


Event = TokenEvent | PromptEvent | FinishEvent


@attrs.frozen
class CachedPrefix:
    """The KV a turn starts from: full blocks, then the first ``tail_tokens`` of a tail."""

    blocks: list[KVBlock] = attrs.field(repr=False)
    tail: KVBlock | None = attrs.field(repr=False)
    tail_tokens: int


@attrs.frozen
class SequenceSpec:
    """What the engine needs to run one turn. ``prefix`` covers exactly ``history``."""

    key: int
    prompt: list[int]
    history: list[int]
    prefix: CachedPrefix | None
    sampling: Sampling
    seed: int
    block_size: int
    cut: bool
    """Whether to cut the final KV into blocks (the model's cache is plain KVCache)."""
    matcher: Any = attrs.field(default=None, eq=False, repr=False)
    """A constrained turn's llguidance matcher (its own), or None."""


@attrs.define(eq=False)
class _Sequence:
    spec: SequenceSpec
    uid: int
    reused: int
    text: TextStream
    held: str = ""
    generated: list[int] = attrs.field(factory=list)
    published: list[KVBlock] = attrs.field(factory=list)
    """The blocks a PromptEvent handed over: cut once, the final cut starts after them."""
    published_views: list[list[memoryview]] = attrs.field(factory=list)
    mask: GrammarMask | None = None
    """A constrained turn's logits processor (and its matcher)."""

    @property
    def first_block(self) -> int:
        """The chain position of the first block this turn computes."""
        prefix = self.spec.prefix
        return len(prefix.blocks) if prefix is not None and self.reused else 0

    @property
    def cut_from(self) -> int:
        """The first token of the blocks the final cut copies (after the published ones)."""
        return (self.first_block + len(self.published)) * self.spec.block_size


@attrs.define(eq=False)
class _Outcome(Generic[T]):
    done: anyio.Event = attrs.field(factory=anyio.Event)
    value: Any = None
    error: BaseException | None = None

    @trio.lowlevel.enable_ki_protection  # runs on the loop; see Engine._route
    def set(self, value: Any, error: BaseException | None) -> None:
        self.value, self.error = value, error
        self.done.set()


# The engine thread's commands.


@attrs.frozen
class _Insert:
    """Put a turn in the batch."""

    spec: SequenceSpec


@attrs.frozen
class _Cancel:
    """Take a turn out of the batch (its FinishEvent says "cancelled")."""

    key: int


@attrs.frozen(eq=False)
class _Call:
    """Run ``fn`` on the engine thread between steps; its result goes to ``outcome``."""

    fn: Callable[[], Any]
    outcome: _Outcome[Any]


@attrs.frozen
class _Stop:
    """End the thread: every turn in flight is cancelled."""


_Command = _Insert | _Cancel | _Call | _Stop


class KVSink(Protocol):
    """Where a turn's KV comes from and goes to (the storage's): the engine reads the
    prefix when the turn starts and hands the KV it cuts back on the event loop, before
    the turn's events reach its channel, so nothing between them carries KV."""

    @property
    def cached(self) -> CachedPrefix | None: ...

    def published(self, kv: CutKV) -> None: ...

    def finished(self, kv: CutKV | None) -> None: ...


@attrs.define(eq=False)
class TurnChannel:
    """A turn in the engine: its events arrive on ``events``; ``cancel()`` takes it out."""

    key: int
    events: MemoryObjectReceiveStream[Event]
    _engine: Engine

    def cancel(self) -> None:
        self._engine.cancel(self.key)


@attrs.frozen
class EngineStatistics:
    """A snapshot of the engine: the part of RuntimeStatistics it owns."""

    turns_in_flight: int
    peak_batch_size: int
    engine_steps: int
    decode_seconds: float
    prefill_seconds: float
    mask_seconds: float
    grammars_compiled: int
    grammars_reused: int


@attrs.define
class EngineCounters:
    steps: int = 0
    peak_batch_size: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    mask_seconds: float = 0.0
    """Time constrained turns' matchers spent consuming tokens and computing masks."""
    constrained_rows: int = 0
    """Constrained turns in the batch now."""


IDLE_TRIM_SECONDS = 1.0
"""How long the engine waits with nothing to do before it hands the heap's free pages
back to the OS (see _heap.py)."""
BUSY_TRIM_SECONDS = 0.5
"""How often a busy engine looks at how much the heap holds free."""
BUSY_TRIM_FLOOR = 32 << 20
"""The least free heap a busy engine trims at (open_runtime: the KV budget)."""


class Engine:
    """The engine thread and its command queue."""

    def __init__(
        self, model_source: Callable[[], Path], *, max_batch_size: int, prefill_step_size: int,
        trim_above: int | None = None,
    ) -> None:
        self._model_source = model_source
        self._trim_above = trim_above
        """Free heap bytes past which a busy engine trims (None: only when idle)."""
        self._max_batch_size = max_batch_size
        self._prefill_step_size = prefill_step_size
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name="troupe-mlx", daemon=True)
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._sequences: dict[int, _Sequence] = {}
        self._by_uid: dict[int, _Sequence] = {}
        self._model: LoadedModel | None = None
        self._batch: Batch | None = None
        self._keys = itertools.count(1)
        self._routes: dict[int, tuple[MemoryObjectSendStream[Event], KVSink]] = {}
        """The channel and KV sink of each turn in flight, by key: touched only on the
        event loop."""
        self.counters = EngineCounters()
        self.failure: BaseException | None = None
        self._gate = threading.Lock()
        self._closed = False
        self._leftover: list[_Command] = []
        self.grammars: Grammars | None = None
        """Compiled grammars for constrained turns (made with the model)."""

    # -- event loop side

    @property
    def model(self) -> LoadedModel:
        """The loaded model (its tokenizer may be used off the engine thread)."""
        assert self._model is not None, "the engine has not loaded its model"
        return self._model

    async def start(self) -> ModelInfo:
        """Start the thread and load the model on it."""
        self._token = anyio.lowlevel.current_token()
        self._thread.start()
        return await self.run(self._load)

    @property
    def in_flight(self) -> int:
        """Turns started and not yet finished."""
        return len(self._routes)

    def statistics(self) -> EngineStatistics:
        c = self.counters
        g = self.grammars.counters if self.grammars is not None else None
        return EngineStatistics(self.in_flight, c.peak_batch_size, c.steps, c.decode_seconds,
                                c.prefill_seconds, c.mask_seconds,
                                g.compiled if g else 0, g.reused if g else 0)

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread between batch steps and return its result."""
        outcome: _Outcome[T] = _Outcome()
        self._put(_Call(fn, outcome))
        await outcome.done.wait()
        if outcome.error is not None:
            raise outcome.error
        result: T = outcome.value
        return result

    def start_turn(
        self, prompt: list[int], history: list[int], sink: KVSink,
        sampling: Sampling, seed: int, block_size: int, cut: bool, matcher: Any = None,
    ) -> TurnChannel:
        """Put a turn in the batch (on the event loop, no await): its events arrive on the
        channel returned, ending with one FinishEvent. ``sink.cached`` covers ``history``;
        the KV the turn cuts goes to ``sink``."""
        key = next(self._keys)
        # Unbounded: a turn's events are bounded by its max_tokens, and the engine must
        # never wait on a slow reader.
        send, receive = anyio.create_memory_object_stream[Event](math.inf)
        self._routes[key] = (send, sink)
        try:
            self._put(_Insert(SequenceSpec(key, prompt, history, sink.cached, sampling, seed,
                                           block_size, cut, matcher)))
        except BaseException:
            del self._routes[key]  # the engine is gone: nothing will come
            raise
        return TurnChannel(key, receive, self)

    def cancel(self, key: int) -> None:
        with contextlib.suppress(RuntimeClosedError):
            self._put(_Cancel(key))

    async def stop(self) -> None:
        """Cancel what is in flight, end the thread and join it."""
        with contextlib.suppress(RuntimeClosedError):
            self._put(_Stop())
        if self._thread.is_alive():
            await anyio.to_thread.run_sync(self._thread.join, abandon_on_cancel=False)

    # KI-protected: trio runs it unprotected otherwise, and a Ctrl-C in mid-delivery would
    # lose events that turns wait for.
    @trio.lowlevel.enable_ki_protection
    def _route(self, events: list[Event]) -> None:
        # Runs on the event loop, called from the engine thread once per batch step.
        for event in events:
            route = self._routes.get(event.key)
            if route is None:
                continue
            channel, sink = route
            if isinstance(event, PromptEvent):
                if event.kv is not None:
                    sink.published(event.kv)
                event = attrs.evolve(event, kv=None)
            elif isinstance(event, FinishEvent):
                sink.finished(event.kv)
                event = attrs.evolve(event, kv=None)
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                channel.send_nowait(event)
            if isinstance(event, FinishEvent):
                del self._routes[event.key]
                channel.close()

    def _put(self, command: _Command) -> None:
        # Under the gate, so nothing slips into the queue after the thread's final drain.
        with self._gate:
            if self._closed:
                if self.failure is not None:
                    raise EngineError(f"the MLX engine failed: {self.failure!r}") \
                        from self.failure
                raise RuntimeClosedError("the engine thread is not running")
            self._commands.put(command)

    # -- engine thread side

    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._token is not None
        try:
            anyio.from_thread.run_sync(fn, *args, token=self._token)
        except anyio.RunFinishedError:
            pass
        except KeyboardInterrupt:
            # Ctrl-C landed in our callback on the loop (trio runs it unprotected) and came
            # back here: it is the host's, not the engine's. Raise it again where it belongs.
            _thread.interrupt_main()

    def _load(self) -> ModelInfo:
        self._model = LoadedModel(self._model_source())
        self._batch = Batch(self._model, self._max_batch_size, self._prefill_step_size)
        info = self._model.info
        self.grammars = Grammars(self._model.tokenizer, info.vocab_size, info.eos_token_ids)
        return info

    def _main(self) -> None:
        error: EngineError | None = None
        try:
            self._serve()
        except BaseException as exc:
            logger.exception("the MLX engine thread failed")
            self.failure = exc
            error = EngineError(f"the MLX engine failed: {exc!r}")
            error.__cause__ = exc
        try:
            with self._gate:
                self._closed = True
            # Every command still queued gets its answer, so no awaiter is left hanging.
            for command in self._leftover:
                self._refuse(command, error)
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                self._refuse(command, error)
            self._finish_all(error)
        finally:
            if self._batch is not None:
                self._batch.close()
            release_thread_resources()
            # Let go of the weights even while something still holds the engine (a closed
            # runtime's objects can wait in reference cycles for the cyclic GC).
            self._batch = None
            self._model = None

    def _serve(self) -> None:
        trimmed = True
        look_at = 0.0
        while True:
            # Idle: sleep until a command comes, handing the heap's free pages back to the
            # OS if none comes for a while. Busy: take what is queued, then step.
            commands = []
            if not self._sequences:
                try:
                    commands.append(self._commands.get(
                        timeout=None if trimmed else IDLE_TRIM_SECONDS))
                except queue.Empty:
                    trim_heap()
                    trimmed = True
                    continue
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for i, command in enumerate(commands):
                if isinstance(command, _Stop):
                    self._leftover = commands[i + 1 :]
                    return
                self._execute(command)
            if self._sequences:
                self._step()
                trimmed = False
                now = time.monotonic()
                if self._trim_above is not None and now >= look_at:
                    look_at = now + BUSY_TRIM_SECONDS
                    trim_heap_above(self._trim_above)

    def _refuse(self, command: _Command, error: EngineError | None) -> None:
        match command:
            case _Insert(spec):
                # The turn's prefix stays with its owner: nothing new to hand back.
                event = FinishEvent(spec.key, "cancelled", "", (), None, error=error)
                self._to_loop(self._route, [event])
            case _Call(_, outcome) if error is not None:
                self._to_loop(outcome.set, None, error)
            case _Call():
                self._call(command)
            case _Cancel() | _Stop():
                pass

    def _execute(self, command: _Command) -> None:
        match command:
            case _Insert(spec):
                self._insert(spec)
            case _Call():
                self._call(command)
            case _Cancel(key):
                self._cancel(key)
            case _Stop():
                raise AssertionError("_serve handles _Stop")

    def _call(self, call: _Call) -> None:
        try:
            value = call.fn()
        except Exception as exc:
            self._to_loop(call.outcome.set, None, exc)
        else:
            self._to_loop(call.outcome.set, value, None)

    def _insert(self, spec: SequenceSpec) -> None:
        assert self._batch is not None
        assert self._model is not None
        history, prompt, prefix = spec.history, spec.prompt, spec.prefix
        try:
            parts: list[KVBlock] = []
            if prefix is not None:
                parts = list(prefix.blocks)
                if prefix.tail is not None and prefix.tail_tokens > 0:
                    parts.append([(k[..., : prefix.tail_tokens, :], v[..., : prefix.tail_tokens, :])
                                  for k, v in prefix.tail])
            if not parts:
                history, prompt = [], history + prompt
            cache = None
            layout = self._model.layout
            if layout is not None:
                # Plain KVCache layers: hand the blocks over uncopied, with room for the turn.
                cache = row_cache(parts, layout, len(prompt) + spec.sampling.max_tokens)
                if cache_tokens(cache) != len(history):
                    raise ValueError(f"a prefix of {cache_tokens(cache)} tokens for a history "
                                     f"of {len(history)}")
            mask = None
            if spec.matcher is not None:
                info = self._model.info
                mask = GrammarMask(spec.matcher, info.vocab_size, min(info.eos_token_ids))
            uid = self._batch.insert(
                prompt, history, cache,
                make_sampler(spec.sampling, spec.seed), spec.sampling.max_tokens, mask,
            )
        except Exception as exc:
            self._to_loop(self._route, [self._failed(spec, exc)])
            return
        sequence = _Sequence(spec, uid, len(history), TextStream(self._model.tokenizer),
                             mask=mask)
        if mask is not None:
            self.counters.constrained_rows += 1
        self._sequences[spec.key] = sequence
        self._by_uid[uid] = sequence
        # The finished row is copied out from its first new block on (none if not cut).
        self._batch.keep_from(uid, sequence.cut_from if spec.cut
                              else len(history) + len(prompt) + spec.sampling.max_tokens)

    @staticmethod
    def _failed(spec: SequenceSpec, exc: BaseException) -> FinishEvent:
        return FinishEvent(spec.key, "error", "", (), None, error=exc)

    def _cancel(self, key: int) -> None:
        sequence = self._sequences.get(key)
        if sequence is None:
            return
        assert self._batch is not None
        removed = self._batch.remove(sequence.uid)
        self._to_loop(self._route, [self._close(sequence, "cancelled", removed, "")])

    def _close(
        self,
        sequence: _Sequence,
        reason: str,
        cache_and_tokens: tuple[KVLayers, list[int]] | None,
        text: str,
        error: BaseException | None = None,
        *,
        cut_short: bool = False,
    ) -> FinishEvent:
        """``cut_short``: a stop string cut the text (a constrained value is then not whole)."""
        del self._sequences[sequence.spec.key]
        del self._by_uid[sequence.uid]
        kv = None
        if cache_and_tokens is not None and sequence.spec.cut:
            kv = self._cut(sequence, *cache_and_tokens)
        complete = None
        mask = sequence.mask
        if mask is not None:
            # The matcher goes with the row: only its verdict on the whole reply is kept.
            sequence.mask = None
            self.counters.constrained_rows -= 1
            try:
                complete = mask.complete(sequence.generated) and not cut_short
            except Exception:
                complete = False
            self.counters.mask_seconds += mask.seconds
        return FinishEvent(
            sequence.spec.key, reason, text, tuple(sequence.generated), kv, sequence.reused,
            error, complete,
        )

    def _cut(self, sequence: _Sequence, cache: KVLayers, tokens: list[int]) -> CutKV | None:
        """Copy the new blocks and the tail out of a finished cache, so the batch's buffers
        can go; None (nothing kept) if the cache is not exactly what the tokens say."""
        spec = sequence.spec
        if not cache or cache_tokens(cache) != len(tokens):
            # Never keep KV whose token history is not exactly known.
            logger.warning("dropping a cache that covers %d tokens, not %d",
                           cache_tokens(cache) if cache else 0, len(tokens))
            return None
        blocks, tail = cut_blocks(cache, sequence.cut_from, spec.block_size, tail=True)
        return CutKV(tuple(tokens), sequence.first_block, [*sequence.published, *blocks],
                     [*sequence.published_views, *(block_bytes(b) for b in blocks)], tail,
                     block_bytes(tail) if tail is not None else None)

    def _publish(self, sequence: _Sequence) -> PromptEvent | None:
        """Cut the new full blocks of a prompt that is now wholly in the cache."""
        assert self._batch is not None
        spec = sequence.spec
        extracted = self._batch.extract(sequence.uid) if spec.cut else None
        if extracted is None:
            return None
        cache, tokens = extracted
        if cache_tokens(cache) != len(tokens):
            return None  # never hand over KV whose tokens are not exactly known
        first = sequence.first_block
        # The partial last block too: turns whose prompts go on alike borrow its start.
        blocks, tail = cut_blocks(cache, first * spec.block_size, spec.block_size, tail=True)
        if not blocks and tail is None:
            return None
        sequence.published = blocks
        sequence.published_views = [block_bytes(b) for b in blocks]
        self._batch.keep_from(sequence.uid, sequence.cut_from)
        return PromptEvent(spec.key, CutKV(tuple(tokens), first, blocks,
                                           sequence.published_views, tail, None))

    def _step(self) -> None:
        assert self._batch is not None
        prompted, outputs = self._batch.step()
        counters = self.counters
        counters.steps += 1
        counters.peak_batch_size = max(counters.peak_batch_size, len(outputs))
        counters.prefill_seconds = self._batch.prefill_seconds
        counters.decode_seconds = self._batch.decode_seconds
        events: list[Event] = []
        for output in outputs:
            sequence = self._by_uid.get(output.uid)
            if sequence is not None:
                events.append(self._advance(sequence, output))
        for uid in prompted:
            sequence = self._by_uid.get(uid)
            published = self._publish(sequence) if sequence is not None else None
            if published is not None:
                events.append(published)
        if events:
            self._to_loop(self._route, events)

    def _advance(self, sequence: _Sequence, output: StepOutput) -> Event:
        assert self._model is not None
        assert self._batch is not None
        sequence.generated.append(output.token)
        if sequence.mask is not None and output.finish_reason is None:
            # Here, between steps, rather than read back from the batch at the next one.
            sequence.mask.catch_up(sequence.generated)
        if output.token not in self._model.info.eos_token_ids:
            sequence.held += sequence.text.add(output.token)
        if output.finish_reason is not None:
            sequence.held += sequence.text.flush()
        stops = sequence.spec.sampling.stop
        emit, stopped = _split_at_stop(sequence.held, stops)
        if stopped:
            sequence.held = ""
            removed: tuple[KVLayers, list[int]] | None
            if output.finish_reason is not None:
                removed = (output.cache or [], output.all_tokens or [])
            else:
                removed = self._batch.remove(sequence.uid)
            return self._close(sequence, "stop", removed, emit, cut_short=True)
        if output.finish_reason is not None:
            sequence.held = ""
            return self._close(
                sequence, output.finish_reason, (output.cache or [], output.all_tokens or []), emit
            )
        hold = _held_back(emit, stops)
        sequence.held = emit[len(emit) - hold :] if hold else ""
        return TokenEvent(sequence.spec.key, (output.token,), emit[: len(emit) - hold])

    def _finish_all(self, error: EngineError | None) -> None:
        """Take every sequence out of the batch: cancelled on a stop, failed on an error."""
        events: list[Event] = []
        for sequence in list(self._sequences.values()):
            removed = None
            if self._batch is not None and error is None:
                with contextlib.suppress(Exception):  # then the cache is lost, not the answer
                    removed = self._batch.remove(sequence.uid)
            reason = "cancelled" if error is None else "error"
            events.append(self._close(sequence, reason, removed, "", error))
        if events:
            self._to_loop(self._route, events)


def _split_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop string, if one occurs."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that could begin a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
