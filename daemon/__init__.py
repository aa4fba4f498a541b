"""The coordinator daemon: HTTP API for consumers, WebSocket route for providers, routing.

`nursery/` holds the structured-concurrency core: the long-lived supervisor and the
per-request dispatch.
"""
