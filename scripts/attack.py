"""The security suite's attack catalogue (tests/attacks.py) against a real daemon this script
starts on loopback: every route with bad credentials, provider impersonation over the real
WebSocket, hostile bodies, size limits, the queue, held boilerplate, idle, slow and
non-reading clients. Then it checks nothing is left held (requests, slots, queue entries,
tasks) and greps the daemon's DEBUG log for every key, token and message text it used.

Run as `.venv/bin/python scripts/attack.py [--log PATH]` (about a minute). Prints the attacks
tried and refused by category and every one that got through; exits 1 if any did.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
import tempfile
from collections import Counter
from functools import partial
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.api.serve import RunningDaemon, serve
from daemon.config import load_settings
from daemon.log_format import TEXT_FORMAT, JsonFormatter
from tests.attacks import (
    CATEGORIES,
    Target,
    Verdict,
    prepare,
    settle,
    target_env,
    task_count,
)


async def run(log_path: Path, log_format: str) -> int:
    admin_key = "adm_" + secrets.token_urlsafe(24)
    verdicts: list[Verdict] = []
    with tempfile.TemporaryDirectory() as data:
        env = {
            "DINFER_LISTEN": "127.0.0.1:0",
            "DINFER_METRICS_LISTEN": "127.0.0.1:0",
            "DINFER_ADMIN_KEY": admin_key,
            "DINFER_PROVIDER_AUTH": "open",  # impostors must reach the challenge
            "DINFER_DATA_DIR": data,
            "DINFER_LOG_LEVEL": "debug",
            "DINFER_LOG_FORMAT": log_format,
            **{f"DINFER_{k.upper()}": v for k, v in target_env().items()},
        }
        settings = load_settings(env)
        async with trio.open_nursery() as nursery:
            daemon: RunningDaemon = await nursery.start(
                partial(serve, settings, shutdown_trigger=trio.sleep_forever)
            )
            target = Target(daemon, admin_key, nursery)
            await prepare(target)
            baseline = task_count()
            for name, attack in CATEGORIES.items():
                print(f"attacking: {name} ...", flush=True)
                verdicts += await attack(target)
            leaked = await settle(target, baseline)
            nursery.cancel_scope.cancel(reason="the attacks are over")
    log_text = await trio.Path(log_path).read_text(errors="replace")
    in_log = [s for s in target.secrets if s in log_text]
    verdicts.append(
        Verdict("logs", f"{len(target.secrets)} secrets grepped in the debug log", not in_log)
    )
    verdicts.append(Verdict("leaks", "nothing held after the attacks", not leaked, str(leaked)))
    tried = Counter(v.category for v in verdicts)
    refused = Counter(v.category for v in verdicts if v.refused)
    print(f"\n{'category':<15}{'tried':>7}{'refused':>9}")
    for category in tried:
        print(f"{category:<15}{tried[category]:>7}{refused[category]:>9}")
    print(f"{'total':<15}{sum(tried.values()):>7}{sum(refused.values()):>9}")
    through = [v for v in verdicts if not v.refused]
    for v in through:
        print(f"GOT THROUGH [{v.category}] {v.attack}: {v.detail}")
    print(f"(daemon log: {log_path})")
    return 1 if through else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "attack.log")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    args = parser.parse_args()
    handler = logging.FileHandler(args.log, mode="w")
    # The daemon's own formatters (daemon/log_format.py), to a file instead of stderr.
    json_lines = args.log_format == "json"
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=logging.DEBUG, handlers=[handler], force=True)
    sys.exit(trio.run(run, args.log, args.log_format))


if __name__ == "__main__":
    main()
