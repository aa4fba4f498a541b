"""Accounts: what consumers used (the usage ledger and its queries)."""
