"""troupe.server: the OpenAI, Anthropic and agents APIs over HTTP, from a running runtime.

Start it with ``troupe.serve`` (or ``troupe serve`` on the command line); ``make_app``
gives the ASGI app, to run under another ASGI server. Needs the ``serve`` extra
(Starlette, Hypercorn, prometheus-client).
"""

from ._app import make_app

__all__ = ["make_app"]
