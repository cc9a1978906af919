"""User errors: mistakes in what a user passed (paths, data, mismatched parts, prompts).

A script prints a user error as one ``error: ...`` line on stderr and exits with status 2,
without a traceback; anything else is a bug and keeps its traceback. Set ``FUSION_DEBUG=1``
(or Hydra's ``HYDRA_FULL_ERROR=1``) to see the traceback of a user error too.
"""

from __future__ import annotations

import functools
import os
import sys

USER_ERROR_EXIT = 2


class UserError(ValueError):
    """Base class of the errors a user can fix: bad paths, bad data, mismatched parts, bad
    prompts. The message names the problem and what to pass instead."""


def debug_requested() -> bool:
    return any(os.environ.get(k, "").strip() not in ("", "0")
               for k in ("FUSION_DEBUG", "HYDRA_FULL_ERROR"))


# Also user errors: a path that does not exist, and an output that exists already (the
# message says which overwrite option to pass).
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, FileExistsError)


# How OmegaConf reports an error raised by a resolver (fusion.config.required_value): it keeps
# only the message, not the exception.
_IN_RESOLVER = "UserError raised while resolving interpolation: "


def user_error_message(err: BaseException) -> str | None:
    """The message to show for a user error, or None for any other exception."""
    if isinstance(err, USER_ERRORS):
        return str(err)
    first_line = str(err).split("\n", 1)[0]
    if type(err).__name__ == "InterpolationResolutionError" and first_line.startswith(
            _IN_RESOLVER):
        return first_line[len(_IN_RESOLVER):]
    return None


def report_user_errors(fn):
    """Decorator for a script's ``main``: a user error becomes ``error: <message>`` on stderr
    and exit status 2. Place it under ``@hydra.main`` so Hydra never sees the exception."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            message = user_error_message(err)
            if message is None or debug_requested():
                raise
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(USER_ERROR_EXIT) from None

    return wrapper
