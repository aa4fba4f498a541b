"""The consumer API: OpenAI-shaped routes served as hand-written ASGI handlers."""
