"""Failpoints: named places in long jobs where a test can make the worker die as if killed (-9).

`GPUSNAP_FAILPOINTS="hibernate.after_verify"` (comma-separated names) makes `failpoint(name)` end the
process there, with no cleanup, exit status 137. Unset (always, in production) it does nothing. This is
how the tests prove that a job re-run after a crash at the worst moment does the right thing."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def failpoint(name: str) -> None:
    armed = os.environ.get("GPUSNAP_FAILPOINTS", "")
    if armed and name in {n.strip() for n in armed.split(",")}:
        logger.error("failpoint %s: the worker exits now, as if killed", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(137)
