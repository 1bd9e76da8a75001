"""troupe.kernel: the actor kernel that troupe's agents and store run on.

An ``Actor`` handles its ``Request`` messages one at a time, in arrival order, in a task of
its own: subclass it, implement ``handle``, start ``run`` in a task group, then ``call`` it
(wait for the answer) or ``send`` to it (fire-and-forget); ``stop`` ends it. Errors a caller
can act on (troupe's own errors, ValueError, TypeError) go back to that caller; any other
stops the actor, and its callers get ``AgentFailedError``. Works under trio and asyncio.

Public for actors of your own beside troupe's (a world, an environment, a referee in a
simulation), with the same backpressure and supervision, and so that code outside the
package can measure the kernel by itself:
``troupe bench overhead`` (troupe.bench.overhead) times calls through it against a bare
two-task ping-pong on the same event loop. No public call of a runtime or an agent is a
bare round trip (a ``tell`` renders its message on a worker thread first, a ``say`` runs
the model), so the kernel is the seam.
"""

from ._actor import Actor, Request

__all__ = ["Actor", "Request"]

for _public in (Actor, Request):
    _public.__module__ = __name__
del _public
