"""The web page's access token, checked where the page is served as well as on its websocket.

wslink (``--authKey``) guards the websocket: a client whose hello carries a wrong secret gets
"Authentication failed" and nothing else. The page itself is static, so a wrong or stale link
still loads it, and trame's client then shows "Loading..." or "try/catch on connect()", at random
(its error can arrive before the page listens for it). Refusing the page itself with 403 and one
plain sentence tells the person what to do, every time. The websocket check stays the guard;
this is what a person sees.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

#: Paths that serve the page (wslink redirects "/" to "index.html", keeping the query).
PAGE_PATHS = ("/", "/index.html")

REFUSED_TEXT = (
    "ipv2-denoise web: this page needs its access token. Open the address the server printed when "
    "it started (it ends in ?secret=...), or ask whoever started it."
)


def token_matches(given: str, token: str) -> bool:
    """Constant-time comparison of a URL's ``secret`` with the server's token."""
    return hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


def page_token_middleware(token: str) -> Callable:
    """An aiohttp middleware that answers 403 for the page unless its URL carries ``secret=token``."""

    @web.middleware
    async def require_token(request: web.Request, handler: Callable[[web.Request], Awaitable]):
        if request.path in PAGE_PATHS and not token_matches(request.query.get("secret", ""), token):
            return web.Response(status=403, text=REFUSED_TEXT)
        return await handler(request)

    return require_token


def require_token_for_page(wslink_server, token: str) -> None:
    """Install the page check on trame's aiohttp server (its ``on_server_bind``, before it starts)."""
    wslink_server.app.middlewares.append(page_token_middleware(token))
