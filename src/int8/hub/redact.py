"""Credentials never leave int8 in a message: ``HF_ENDPOINT=https://user:secret@host`` is shown as ``https://host``.

Every message that names the Hub endpoint, or quotes a client exception (whose
text may carry a request URL), passes through `redact`.
"""

from __future__ import annotations

import re

_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\s]*@")


def redact(text: str) -> str:
    """``text`` with the user:password part of every URL in it removed."""
    return _USERINFO.sub(r"\g<scheme>", str(text))


def endpoint() -> str:
    """The Hub endpoint int8 talks to (HF_ENDPOINT), without credentials."""
    from huggingface_hub import constants

    return redact(constants.ENDPOINT)


def redact_error(e: Exception) -> Exception:
    """An int8 error with URL credentials removed from its message and hint (other exceptions as they are)."""
    from ..errors import Int8Error

    if isinstance(e, Int8Error):
        e.message = redact(e.message)
        e.hint = redact(e.hint) if e.hint else e.hint
        e.args = (e.message,)
    return e
