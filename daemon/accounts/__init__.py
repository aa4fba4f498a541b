"""Consumer accounts: what a key may do (`limits`) and what it used (the usage `ledger` and
its queries, `usage`)."""
