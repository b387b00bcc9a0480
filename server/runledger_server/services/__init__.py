"""Use cases: validation, transactions through the store interfaces, calls into the domain rules."""
