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


def report_user_errors(fn):
    """Decorator for a script's ``main``: a user error becomes ``error: <message>`` on stderr
    and exit status 2. Place it under ``@hydra.main`` so Hydra never sees the exception."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            if debug_requested():
                raise
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(USER_ERROR_EXIT) from None

    return wrapper
