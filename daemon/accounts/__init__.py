"""Consumer accounts: what a key may do (`limits`)."""
