"""The README's run command: a working network on one machine, then a curl line to try it.

Starts a real model (Gemma 3 270M from PyPI, served by llama-cpp-python), the daemon on
127.0.0.1:8000 (loopback only, open provider auth), and one provider node in front of the
model; prints an API key and a `curl` that streams an answer; runs until Ctrl-C.
State and logs go to `.dinfer/quickstart/`.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from localnet import (
    MODEL_ALIAS,
    free_port,
    model_file,
    port_is_free,
    run_daemon,
    run_model_server,
    run_provider,
)

STATE = Path(".dinfer/quickstart").resolve()
# The model's chat template as the model server applies it (`--chat_format gemma`): the node
# counts a prompt's tokens with it, as the server does, since the server streams no usage.
CHAT_TEMPLATE = Path(__file__).resolve().parent.parent / "tests/data/templates/gemma3-it.jinja"


async def main() -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    say("writing the model file (first run only)...")
    model = await trio.to_thread.run_sync(model_file, STATE / "models")
    async with trio.open_nursery() as nursery:
        say("starting the model server (llama-cpp-python)...")
        backend = await nursery.start(
            run_model_server, model, free_port(), STATE / "model-server.log"
        )
        port = 8000 if port_is_free(8000) else free_port()
        daemon = await nursery.start(run_daemon, STATE / "daemon", STATE / "daemon.log", None, port)
        say(f"daemon listening on {daemon.url}")
        node = await nursery.start(
            run_provider,
            daemon,
            backend.url,
            STATE / "provider",
            STATE / "provider.log",
            ["--chat-template", f"{MODEL_ALIAS}={CHAT_TEMPLATE}"],
        )
        say(f"provider {node.provider_id} connected and trusted")
        key = await daemon.create_key()
        print(_instructions(daemon.url, key, daemon.admin_key, daemon.keys_command()), flush=True)
        await _until_interrupted()
        say("stopping...")
        nursery.cancel_scope.cancel()


def _instructions(url: str, key: str, admin_key: str, keys_command: str) -> str:
    body = (
        f'{{"model": "{MODEL_ALIAS}", "stream": true, "max_tokens": 64, '
        '"messages": [{"role": "user", "content": "Write a haiku about the sea."}]}'
    )
    return f"""
dinfer is running: a daemon, a provider node and a real (tiny, base) model.

  API key:    {key}
  admin key:  {admin_key}
  logs:       {STATE}/*.log

Stream an answer (the model is a 270M base model: expect gibberish, fast):

  curl -N {url}/v1/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{body}'

See the providers:  curl -s {url}/v1/admin/providers -H "Authorization: Bearer {admin_key}"

Another API key, in this daemon's own store (a plain `dinfer keys create` run elsewhere
would use another store, and this daemon would refuse its key):

  {keys_command}
Press Ctrl-C to stop.
"""


async def _until_interrupted() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


def say(text: str) -> None:
    print(f"[quickstart] {text}", flush=True)


if __name__ == "__main__":
    trio.run(main)
