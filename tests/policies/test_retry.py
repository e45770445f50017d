import random
from email.utils import formatdate

import httpx
import pytest

from dsl.plan import BackoffSpec, RetrySpec
from policies.retry import RetryPolicy, parse_retry_after, retry_fits

DEFAULT = RetryPolicy(RetrySpec(retries=2))


@pytest.mark.parametrize(
    "failure,status,expected",
    [
        ("connect-failure", None, True),
        ("reset", None, True),
        ("timeout", None, False),  # not in the default conditions
        (None, 502, True),
        (None, 503, True),
        (None, 504, True),
        (None, 500, False),
        (None, 429, False),
        (None, 200, False),
        (None, None, False),
    ],
)
def test_default_conditions(failure, status, expected):
    assert DEFAULT.retryable("GET", {}, failure, status) is expected


def test_status_class_and_timeout_conditions():
    p = RetryPolicy(RetrySpec(retries=3, on=("connect-failure", "reset", "timeout", "5xx")))
    assert p.retryable("GET", {}, "timeout", None)
    assert p.retryable("GET", {}, None, 500)
    assert p.retryable("GET", {}, None, 599)
    assert not p.retryable("GET", {}, None, 499)


def test_single_status_condition():
    p = RetryPolicy(RetrySpec(retries=1, on=("429",)))
    assert p.retryable("GET", {}, None, 429)
    assert not p.retryable("GET", {}, None, 503)
    assert not p.retryable("GET", {}, "connect-failure", None)


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE", "get"])
def test_idempotent_methods_are_retried(method):
    assert DEFAULT.retryable(method, {}, None, 503)


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_non_idempotent_methods_are_not_retried(method):
    assert not DEFAULT.retryable(method, {}, None, 503)
    assert not DEFAULT.retryable(method, {}, "reset", None)


def test_connect_failure_is_retried_for_any_method():
    assert DEFAULT.retryable("POST", {}, "connect-failure", None)
    assert DEFAULT.retryable("PATCH", httpx.Headers(), "connect-failure", None)


@pytest.mark.parametrize(
    "headers",
    [
        {"Idempotency-Key": "k1"},
        {"idempotency-key": "k1"},
        {"IDEMPOTENCY-KEY": "k1"},
        httpx.Headers({"Idempotency-Key": "k1"}),
    ],
)
def test_idempotency_key_makes_post_retryable(headers):
    assert DEFAULT.retryable("POST", headers, None, 503)
    assert DEFAULT.retryable("POST", headers, "reset", None)


def test_methods_list_is_taken_as_written():
    p = RetryPolicy(RetrySpec(retries=1, methods=("GET", "POST")))
    assert p.retryable("POST", {}, None, 503)
    assert not p.retryable("PATCH", {}, None, 503)


def test_unknown_condition_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown retry condition 'sometimes'"):
        RetryPolicy(RetrySpec(retries=1, on=("sometimes",)))
    with pytest.raises(ValueError, match="negative"):
        RetryPolicy(RetrySpec(retries=-1))


def test_without_backoff_a_retry_starts_at_once():
    assert DEFAULT.backoff_delay(1, random.Random(1)) == 0.0
    assert DEFAULT.next_wait(1, random.Random(1), time_left=5.0) == 0.0


def test_next_wait_uses_backoff_and_counts_retries():
    p = RetryPolicy(RetrySpec(retries=2, backoff=BackoffSpec("exponential", 0.1, 1.0, "none")))
    rng = random.Random(1)
    assert p.next_wait(1, rng, time_left=5.0) == 0.1
    assert p.next_wait(2, rng, time_left=5.0) == 0.2
    assert p.next_wait(3, rng, time_left=5.0) is None  # retries used up


def test_retry_after_is_honoured_within_the_deadline():
    p = RetryPolicy(RetrySpec(retries=2, backoff=BackoffSpec("constant", 0.1, 0.1, "none")))
    rng = random.Random(1)
    assert p.next_wait(1, rng, time_left=5.0, retry_after=2.0) == 2.0
    assert p.next_wait(1, rng, time_left=5.0, retry_after=0.01) == 0.1  # backoff is longer
    assert p.next_wait(1, rng, time_left=1.5, retry_after=2.0) is None  # past the deadline


def test_no_retry_when_time_left_is_below_the_median_latency():
    p = RetryPolicy(RetrySpec(retries=2))
    rng = random.Random(1)
    assert p.next_wait(1, rng, time_left=0.3, median=0.2) == 0.0
    assert p.next_wait(1, rng, time_left=0.15, median=0.2) is None
    assert p.next_wait(1, rng, time_left=0.0) is None


def test_retry_fits():
    assert retry_fits(1.0)
    assert not retry_fits(0.0)
    assert retry_fits(1.0, 0.5, 0.5)
    assert not retry_fits(1.0, 0.6, 0.5)


@pytest.mark.parametrize(
    "value,expected",
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 3 ", 3.0),
        ("1.5", 1.5),
        ("", None),
        ("soon", None),
        ("-5", None),
        ("12abc", None),
        ("1e999", None),
    ],
)
def test_parse_retry_after_seconds(value, expected):
    assert parse_retry_after(value, 0.0) == expected


def test_parse_retry_after_http_dates():
    now = 1_700_000_000.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now) == 30.0
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now) == 0.0  # past: now
    # RFC 850 and asctime forms (obsolete but allowed) carry no zone: GMT.
    assert parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", 784111777.0 - 1) == 1.0
    assert parse_retry_after("Sun Nov  6 08:49:37 1994", 784111777.0 - 2) == 2.0
    assert parse_retry_after("Sun, 99 Foo 1994 99:99:99 GMT", now) is None
