"""Security suite: nothing secret in the daemon's logs. The credential and impersonation
attacks and an honest request run with every logger at DEBUG; the captured text (messages
and tracebacks) holds no API key, admin key, provider token or message text."""

from __future__ import annotations

import logging

import pytest

from tests.attacks import Target, attack_bodies, attack_credentials, attack_providers
from tests.security_fixtures import assert_refused


# httpx's body generator, cut short when a route answers (404) without reading a big body.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_no_key_token_or_message_text_reaches_the_log(
    target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    verdicts = await attack_credentials(target)
    verdicts += await attack_providers(target)
    verdicts += await attack_bodies(target)
    assert_refused(verdicts)
    text = caplog.text
    assert "dinfer" in text  # the capture did see the daemon's debug logging
    leaked = [secret for secret in target.secrets if secret in text]
    assert not leaked, f"{len(leaked)} secret(s) in the log"
