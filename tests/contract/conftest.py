"""Fixtures for the contract acceptance tests; the helpers live in contract_helpers.py."""

from contract_helpers import checkout_copy  # noqa: F401  (re-exported fixture)
