"""The reference provider node: connects a local OpenAI-compatible model server to a daemon.

`dinfer provider` (`provider.cli`) loads the options (`config`) and the key files (`keys`),
then runs `node.serve`: the supervisor (`node`) keeps one WebSocket session (`session`, over
`link`) alive with backoff (`backoff`), polls the backend's models (`backend`, `models`, the
chat-template self-check in `selfcheck`/`templates`) and drains on SIGTERM. Each request
(`request`) is repaired (`repair`), streamed through the backend, judged by the stream success
rule (`stream`) and ends in one terminal, failures mapped by `failures`.
"""
