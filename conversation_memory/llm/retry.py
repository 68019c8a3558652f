"""The one retry layer: which failures are retried, how long to wait, when to stop.

tenacity drives the loop (the SDK's own ``max_retries`` is always 0); this
module supplies its three decisions, the same for sync and async calls:

- **retry** a :class:`~conversation_memory.errors.ModelError` marked
  ``retryable`` by the error mapping: timeouts, connection failures, 408, 409,
  429 and 5xx. Never the request's own faults (400, 401, 403, 404, 422, ...).
- **wait** the larger of exponential backoff (with jitter) and the server's
  ``Retry-After``, which is capped so a hostile header can't park a call.
- **stop** after ``attempts`` tries, or as soon as the next wait would end
  past the call's total deadline: sleeping only to fail is worse than failing.

Time comes from injected functions: ``clock`` (monotonic, for the deadline)
and ``now`` (wall clock, for ``Retry-After`` given as an HTTP date). With an
injected ``sleep`` a test runs every retry instantly and sees every wait.
"""

from __future__ import annotations

import datetime
import email.utils
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import tenacity

from conversation_memory.errors import ConfigurationError, ModelError, ModelTimeout

__all__ = ["RetryPolicy", "parse_retry_after"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How one model call is retried; the defaults suit OpenAI's published limits."""

    attempts: int = 4
    """Most requests per call, the first included (1 disables retries)."""
    initial: float = 0.5
    """Backoff before the second attempt, in seconds."""
    multiplier: float = 2.0
    """Each further backoff is this many times the previous one."""
    max_wait: float = 20.0
    """Cap on the backoff (a longer ``Retry-After`` still wins, up to its own cap)."""
    jitter: float = 0.1
    """Each backoff is shortened by a random fraction up to this, so clients spread out."""
    retry_after_cap: float = 60.0
    """Most seconds a server's ``Retry-After`` may make us wait."""
    deadline: float | None = 120.0
    """Total seconds for one call, waits and streaming included; None for no limit."""

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise ConfigurationError(
                f"attempts must be an integer, got {self.attempts!r}.", argument="attempts"
            )
        if self.attempts < 1:
            raise ConfigurationError(
                f"attempts must be at least 1 (the first request), got {self.attempts}.",
                argument="attempts",
            )
        for name in ("initial", "max_wait", "retry_after_cap"):
            _check_seconds(name, getattr(self, name))
        _check_seconds("multiplier", self.multiplier)
        if self.multiplier < 1:
            raise ConfigurationError(
                f"multiplier must be at least 1, got {self.multiplier!r}.", argument="multiplier"
            )
        _check_seconds("jitter", self.jitter)
        if self.jitter > 1:
            raise ConfigurationError(
                f"jitter is a fraction between 0 and 1, got {self.jitter!r}.", argument="jitter"
            )
        if self.deadline is not None:
            _check_seconds("deadline", self.deadline)
            if self.deadline == 0:
                raise ConfigurationError(
                    "deadline must be more than 0 seconds (None for no limit).",
                    argument="deadline",
                )

    def backoff(self, retry: int, *, rand: float = 0.0) -> float:
        """Seconds to wait before retry number ``retry`` (1 = the second attempt).

        ``rand`` in [0, 1) picks how much jitter to take off.
        """
        base = self.initial * self.multiplier ** (retry - 1) if retry < 1024 else math.inf
        return min(base, self.max_wait) * (1 - self.jitter * rand)

    def wait(self, retry: int, retry_after: float | None, *, rand: float = 0.0) -> float:
        """The wait before retry ``retry``: backoff, or the server's (capped) ask if longer."""
        wait = self.backoff(retry, rand=rand)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.retry_after_cap))
        return wait


def _check_seconds(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigurationError(
            f"{name} must be a non-negative number, got {value!r}.", argument=name
        )


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        # A plain dict is case-sensitive; httpx's Headers is not.
        for key, item in headers.items():
            if key.lower() == name:
                return item
    return value


def _seconds(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def parse_retry_after(headers: Mapping[str, str], *, now: float) -> float | None:
    """Seconds the server asks us to wait, or None when it doesn't say (or says nonsense).

    ``retry-after-ms`` (OpenAI's, in milliseconds) wins over ``Retry-After``,
    which is either seconds or an HTTP date, taken relative to ``now`` (a
    Unix time). A date in the past means "now": 0.
    """
    millis = _header(headers, "retry-after-ms")
    if millis is not None:
        value = _seconds(millis)
        if value is not None:
            return value / 1000
    text = _header(headers, "retry-after")
    if text is None:
        return None
    value = _seconds(text)
    if value is not None:
        return value
    try:
        when = email.utils.parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # "-0000" parses as naive; HTTP dates are always GMT.
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - now)


def is_retryable(exc: BaseException) -> bool:
    """True for a mapped model error that another attempt could fix."""
    return isinstance(exc, ModelError) and bool(getattr(exc, "retryable", False))


class Attempts:
    """Book-keeping for one call: attempt count, deadline, and tenacity's decisions.

    One instance per call; the sync and async shells share it, only their
    sleep differs.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        clock: Callable[[], float],
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.rand = rand
        self.started = clock()
        self.deadline_at = None if policy.deadline is None else self.started + policy.deadline
        self.number = 0
        self._give_up_note = ""

    def remaining(self) -> float | None:
        """Seconds left before the deadline (may be negative), or None without one."""
        return None if self.deadline_at is None else self.deadline_at - self.clock()

    def expired(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0

    def begin(self, model: str) -> float | None:
        """Start the next attempt; return the seconds it may take (None: unlimited)."""
        self.number += 1
        left = self.remaining()
        if left is not None and left <= 0:
            raise self.timeout(model)
        return left

    def timeout(
        self,
        model: str,
        *,
        status: int | None = None,
        request_id: str | None = None,
        what: str = "did not answer",
    ) -> ModelTimeout:
        """The error for a call whose deadline passed."""
        return ModelTimeout(
            f"model {model!r} {what} within the call's {self.policy.deadline:g} s "
            f"deadline (attempt {self.number}); for long replies allow more time "
            "(RetryPolicy(deadline=...); `convmem chat --timeout SECONDS`), or check that "
            "the server is not overloaded.",
            deadline=self.policy.deadline,
            status=status,
            request_id=request_id,
            attempts=self.number,
            model=model,
            retryable=False,
        )

    def elapsed_ms(self) -> float:
        return (self.clock() - self.started) * 1000

    # tenacity's three decisions -------------------------------------------------------

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        retry_after = getattr(exc, "retry_after", None)
        return self.policy.wait(state.attempt_number, retry_after, rand=self.rand())

    def _stop(self, state: tenacity.RetryCallState) -> bool:
        if state.attempt_number >= self.policy.attempts:
            self._give_up_note = f"(gave up after {state.attempt_number} attempts)"
            return True
        left = self.remaining()
        if left is not None and state.upcoming_sleep >= left:
            self._give_up_note = (
                f"(gave up after {state.attempt_number} attempts: waiting "
                f"{state.upcoming_sleep:.3g} s more would pass the call's "
                f"{self.policy.deadline:g} s deadline)"
            )
            return True
        return False

    def _give_up(self, state: tenacity.RetryCallState) -> Any:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, ModelError) and self._give_up_note:
            error = type(exc)(f"{exc.message} {self._give_up_note}", **exc.context)
            raise error from exc.__cause__
        raise exc if exc is not None else RuntimeError("retry loop ended without an outcome")

    def controls(self) -> dict[str, Any]:
        """Keyword arguments for ``tenacity.Retrying`` / ``AsyncRetrying`` (add ``sleep``)."""
        return {
            "retry": tenacity.retry_if_exception(is_retryable),
            "wait": self._wait,
            "stop": self._stop,
            "retry_error_callback": self._give_up,
            "reraise": True,
        }
