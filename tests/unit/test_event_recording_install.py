"""src.services.events.install: every session factory records events, however many came before it.

SQLAlchemy's event registry keys a target by id(); a session factory made after an earlier one was
freed could be taken for it, and its sessions then recorded no job or machine events (two
integration tests' apps failed that way in one CI run)."""

from __future__ import annotations

import gc

from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from src.services import events


def test_each_new_session_factory_gets_the_listener_exactly_once() -> None:
    missing = 0
    for i in range(300):
        factory = sessionmaker(bind=create_engine("sqlite://"))
        events.install(factory)
        events.install(factory)  # idempotent
        session = factory()
        missing += list(session.dispatch.before_flush).count(events._before_flush) != 1
        session.close()
        del factory, session
        if i % 7 == 0:
            gc.collect()  # frees earlier factories, so ids get reused
    assert missing == 0
