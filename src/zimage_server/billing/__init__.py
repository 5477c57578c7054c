"""Credits: the price of an image and the append-only ledger that holds and releases it."""

from zimage_server.billing.ledger import Ledger
from zimage_server.billing.pricing import Pricing, format_credits, to_micro

__all__ = ["Ledger", "Pricing", "format_credits", "to_micro"]
