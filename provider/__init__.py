"""The reference provider node: connects a local OpenAI-compatible model server to a daemon."""
