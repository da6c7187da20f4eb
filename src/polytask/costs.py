"""Dollars: what a call costs (:class:`Prices`), where prices come from (:func:`prices_for`), and a spending cap shared
by a run's concurrent calls (:class:`Budget`).

Prices are in USD per million tokens, as providers publish them; costs are in USD. Known models are priced from
`genai-prices <https://github.com/pydantic/genai-prices>`_ (pydantic's price database, bundled with the package and
read offline: polytask never fetches newer prices). A cost is computed from the usage the server reports for each
response, so it is only as right as that usage and those prices: treat it as an estimate of the bill, not the bill.

Pure and synchronous: nothing here does I/O, sleeps or knows about the event loop.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ._checks import check_non_negative, check_positive
from .exceptions import BudgetExceededError

__all__ = ["BATCH_DISCOUNT", "Budget", "BudgetReservation", "Prices", "batch_prices", "format_usd", "prices_for"]

logger = logging.getLogger("polytask")

_PER = 1_000_000  # prices are per million tokens
_SLACK = 1e-9  # USD: sums of float costs drift by far less; a call is never refused for a rounding error
BATCH_DISCOUNT = 0.5
"""What the Batch API bills of the live price: 50% ("50% lower costs" than the synchronous API, OpenAI's Batch API
guide, https://platform.openai.com/docs/guides/batch), for a model genai-prices lists no batch price of."""


@dataclass(frozen=True, slots=True, init=False)
class Prices:
    """What tokens cost, in USD per million tokens.

    Args:
        input: a prompt token, USD per million (``0.15`` for gpt-4o-mini).
        output: a completion token, USD per million (``0.60``).
        cached_input: a prompt token the provider served from its prompt cache
            (``usage.prompt_tokens_details.cached_tokens``), USD per million (default: ``input``).

    ``Prices(input=0, output=0)`` is a model that costs nothing (a local one), which is known, not unknown.

    Raises:
        ConfigurationError: a price that is not a finite number ≥ 0 (the message names it).

    Example::

        >>> Prices(input=0.15, output=0.60).cost(prompt_tokens=1_000, completion_tokens=100)
        0.00021
    """

    input: float
    output: float
    cached_input: float

    def __init__(self, input: float, output: float, cached_input: float | None = None) -> None:
        check_non_negative("Prices.input", input)
        check_non_negative("Prices.output", output)
        if cached_input is not None:
            check_non_negative("Prices.cached_input", cached_input)
        object.__setattr__(self, "input", float(input))
        object.__setattr__(self, "output", float(output))
        object.__setattr__(self, "cached_input", float(input if cached_input is None else cached_input))

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        """USD for one call's usage.

        Args:
            prompt_tokens: every prompt token, cached ones included (as OpenAI's ``usage.prompt_tokens`` counts).
            completion_tokens: the tokens generated.
            cached_tokens: the part of ``prompt_tokens`` served from the provider's prompt cache, priced at
                ``cached_input`` (clipped to ``0 … prompt_tokens``).
        """
        cached = min(max(cached_tokens, 0), prompt_tokens) if cached_tokens else 0
        return (
            (prompt_tokens - cached) * self.input + cached * self.cached_input + completion_tokens * self.output
        ) / _PER

    def describe(self) -> str:
        """``"$0.15 in ($0.075 cached) / $0.6 out"`` (per million tokens; the cached price when it differs)."""
        cached = f" (${_plain(self.cached_input)} cached)" if self.cached_input != self.input else ""
        return f"${_plain(self.input)} in{cached} / ${_plain(self.output)} out"


def _plain(price: float) -> str:
    """A price as written by hand: ``0.075``, ``2.5``, ``1,000,000`` (never ``1e+06``)."""
    return f"{price:,.6f}".rstrip("0").rstrip(".") if price else "0"


def _per_million(price: Any) -> float | None:
    """A genai-prices per-MTok price as a float: a flat ``Decimal``, or a tiered one's base (the price below its first
    threshold, ≥ 128k prompt tokens for every model listed, far above one sentence's call); None when absent."""
    if price is None:
        return None
    if isinstance(price, Decimal):
        return float(price)
    base = getattr(price, "base", None)
    return float(base) if isinstance(base, Decimal) else None


def batch_prices(prices: Prices) -> Prices:
    """``prices`` as the Batch API bills them: every price × :data:`BATCH_DISCOUNT` (50%)."""
    return Prices(
        input=prices.input * BATCH_DISCOUNT,
        output=prices.output * BATCH_DISCOUNT,
        cached_input=prices.cached_input * BATCH_DISCOUNT,
    )


@functools.lru_cache(maxsize=256)
def prices_for(model: str, *, base_url: str | None = None, batch: bool = False) -> Prices | None:
    """The prices of ``model`` served at ``base_url``, from genai-prices' bundled database; None when unknown.

    Args:
        model: the model name as sent to the server (``"gpt-4o-mini"``, ``"claude-3-5-sonnet"``).
        base_url: the API's base URL; genai-prices recognises providers by it (``https://api.openai.com/v1``,
            OpenRouter, Azure, …). A server it does not know (a local vLLM, a gateway, the simulator) makes the
            model unknown even when its name is a known one: a model served there is not billed at the provider's
            price. None: the provider is guessed from the model name.
        batch: the prices of the provider's Batch API: genai-prices' batch prices (its ``processing: batch``
            variant, e.g. gpt-4o-mini $0.075 / $0.30 against $0.15 / $0.60 live) where it lists them, else the live
            prices × :data:`BATCH_DISCOUNT` (:func:`batch_prices`).

    Returns:
        :class:`Prices` (input, output and cache-read prices per million tokens), or None when genai-prices does not
        know the provider or the model, or lists no token prices for it. Never raises, never uses the network.
    """
    try:
        from genai_prices import Usage, calc_price

        found = calc_price(
            Usage(input_tokens=0, output_tokens=0), model_ref=model, provider_api_url=base_url
        ).model_price
        input_price = _per_million(found.input_mtok)
        output_price = _per_million(found.output_mtok)
        cached_price = _per_million(found.cache_read_mtok)
        if batch and input_price is not None and output_price is not None:
            batched = calc_price(
                Usage(input_tokens=0, output_tokens=0),
                model_ref=model,
                provider_api_url=base_url,
                price_context={"processing": "batch"},
            ).model_price
            batch_in, batch_out = _per_million(batched.input_mtok), _per_million(batched.output_mtok)
            if batch_in is None or batch_out is None or (batch_in, batch_out) == (input_price, output_price):
                return batch_prices(Prices(input=input_price, output=output_price, cached_input=cached_price))
            cached = _per_million(batched.cache_read_mtok)
            return Prices(input=batch_in, output=batch_out, cached_input=cached if cached is not None else batch_in)
    except Exception as error:  # LookupError for an unknown model; a price lookup must never stop a run
        logger.debug("no prices for model %r at %r: %s", model, base_url, error)
        return None
    if input_price is None or output_price is None:
        return None
    return Prices(input=input_price, output=output_price, cached_input=cached_price)


def format_usd(amount: float) -> str:
    """``$1,234.57``, ``$4.999``, ``$0.0123``, ``$0.000015``: cents from $10 up, else four significant digits (never
    scientific notation, at least two decimals)."""
    if amount == 0 or not math.isfinite(amount):
        return "$0.00" if amount == 0 else f"${amount}"
    if abs(amount) >= 10:
        return f"${amount:,.2f}"
    digits = max(2, 3 - math.floor(math.log10(abs(amount))))
    text = f"{amount:.{digits}f}".rstrip("0")
    whole, _, decimals = text.partition(".")
    return f"${whole}.{decimals.ljust(2, '0')}"


@dataclass(eq=False, slots=True)
class BudgetReservation:
    """What one call holds of a :class:`Budget` until it is settled or released.

    Attributes:
        amount: the call's worst-case cost, USD.
        open: False once settled or released.
    """

    amount: float
    open: bool = True


class Budget:
    """A spending cap, in USD, shared by concurrent calls: each call reserves its worst case before it is sent and
    settles at its actual cost when its answer comes back, so calls in flight can never take the total past the cap
    (unless the server reports more tokens than the worst case allowed: a prompt longer than estimated).

    Single-threaded, like the rest of a run (one event loop); share one between orchestrators of that loop by
    passing it as ``Orchestrator(budget=...)``.

    Args:
        limit_usd: the cap, USD (> 0).

    Raises:
        ConfigurationError: ``limit_usd`` is not a finite number > 0.

    Example::

        budget = Budget(5.0)
        hold = budget.reserve(prices.cost(prompt_estimate, max_tokens))  # may raise BudgetExceededError
        try:
            response = await backend.complete(request)
        except BaseException:
            budget.release(hold)
            raise
        budget.settle(hold, prices.cost(response.prompt_tokens, response.completion_tokens))
    """

    def __init__(self, limit_usd: float) -> None:
        check_positive("budget", limit_usd, allow_none=False)
        self.limit_usd = float(limit_usd)
        self._spent = 0.0
        self._reserved = 0.0
        self._open = 0

    def __repr__(self) -> str:
        return f"Budget(limit_usd={self.limit_usd!r}, spent={self._spent!r}, reserved={self._reserved!r})"

    @property
    def spent(self) -> float:
        """USD settled so far."""
        return self._spent

    @property
    def reserved(self) -> float:
        """USD held by calls in flight (their worst cases)."""
        return self._reserved

    def reserve(self, worst_case_usd: float) -> BudgetReservation:
        """Hold ``worst_case_usd`` for a call about to be sent.

        Raises:
            BudgetExceededError: ``spent + reserved + worst_case_usd`` would be over the limit; nothing is held.
            ConfigurationError: ``worst_case_usd`` is not a finite number ≥ 0.
        """
        check_non_negative("worst_case_usd", worst_case_usd)
        if self._spent + self._reserved + worst_case_usd > self.limit_usd + _SLACK:
            held = f" and {format_usd(self._reserved)} held by calls in flight" if self._reserved > _SLACK else ""
            raise BudgetExceededError(
                f"the budget of {format_usd(self.limit_usd)} is reached: {format_usd(self._spent)} spent{held}, "
                f"and the next call could cost up to {format_usd(worst_case_usd)}, so it was not sent; "
                "rerun with a higher budget to resume",
                limit_usd=self.limit_usd,
                spent_usd=self._spent,
                reserved_usd=self._reserved,
                worst_case_usd=worst_case_usd,
            )
        self._reserved += worst_case_usd
        self._open += 1
        return BudgetReservation(worst_case_usd)

    def settle(self, reservation: BudgetReservation, actual_usd: float) -> None:
        """The call came back and cost ``actual_usd``: count it as spent, free the rest of its hold.

        Raises:
            ValueError: the reservation was already settled or released.
        """
        self._close(reservation)
        self._spent += actual_usd

    def release(self, reservation: BudgetReservation) -> None:
        """The call failed without usage (or was never sent): free its whole hold.

        Raises:
            ValueError: the reservation was already settled or released.
        """
        self._close(reservation)

    def _close(self, reservation: BudgetReservation) -> None:
        if not reservation.open:
            raise ValueError("this budget reservation was already settled or released")
        reservation.open = False
        self._open -= 1
        # with nothing in flight the hold is exactly 0, not the drift of adding and subtracting floats
        self._reserved = self._reserved - reservation.amount if self._open else 0.0
