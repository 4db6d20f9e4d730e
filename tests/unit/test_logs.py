"""The text log format shows a record's extra fields, as the JSON one does (logs.py)."""

from __future__ import annotations

import io
import logging

import pytest

from layercard_service.logs import configure_logging


@pytest.fixture
def text_log():
    """The root logger configured for text, as ``make run`` does, writing to a buffer; restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("INFO", "text")
    buffer = io.StringIO()
    root.handlers[0].setStream(buffer)
    yield buffer.getvalue
    root.handlers[:] = handlers
    root.setLevel(level)


def test_the_incident_of_an_internal_error_is_in_the_text_log(text_log):
    log = logging.getLogger("layercard_service.api.interceptors")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        # as the error interceptor logs an unexpected error
        log.exception("rpc raised an unexpected error", extra={"method": "/x.v1.S/Get", "incident": "0123abcd4567"})
    first, *rest = text_log().splitlines()
    assert first.endswith("rpc raised an unexpected error method=/x.v1.S/Get incident=0123abcd4567")
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "RuntimeError: boom"


def test_extra_values_are_quoted_when_they_would_be_ambiguous(text_log):
    logging.getLogger("layercard_service.runners.local").info(
        "job ended", extra={"job_id": "job-a", "error": "disk full: no space", "seconds": 1.5, "note": ""}
    )
    assert text_log().rstrip().endswith('job ended job_id=job-a error="disk full: no space" seconds=1.5 note=""')


def test_a_record_without_extras_is_unchanged(text_log):
    logging.getLogger("layercard_service.server").info("serving on %s", "127.0.0.1:1")
    assert text_log().rstrip().endswith("INFO    layercard_service.server: serving on 127.0.0.1:1")
