"""The routing traits a chat body yields: the prompt estimate behind the first-token deadline."""

from __future__ import annotations

import json

import pytest

from daemon.api.chat_request import parse_chat_request
from daemon.api.handler import timing_for
from daemon.config import load_settings


def _traits(content: object) -> tuple[int, bool]:
    body = {"model": "m", "messages": [{"role": "user", "content": content}]}
    traits = parse_chat_request(json.dumps(body).encode()).traits
    return traits.prompt_tokens, traits.has_media


@pytest.mark.parametrize(
    ("parts", "tokens", "media"),
    [
        ([{"type": "text", "text": "x" * 400}], 4 + 100, False),
        ([{"type": "image_url", "image_url": {"url": "data:"}}], 4 + 300, True),
        ([{"type": "input_image"}, {"type": "image"}], 4 + 600, True),
        ([{"type": "video_url", "video_url": {"url": "data:"}}], 4 + 1500, True),
        ([{"type": "input_video"}, {"type": "video"}, {"type": "image_url"}], 4 + 3300, True),
    ],
    ids=["text", "image", "two-images", "video", "two-videos-and-an-image"],
)
def test_each_image_counts_300_tokens_and_each_video_1500(
    parts: list[dict[str, object]], tokens: int, media: bool
) -> None:
    assert _traits(parts) == (tokens, media)


def test_a_video_moves_the_first_token_deadline_by_its_tokens() -> None:
    settings = load_settings({})
    text_only, _ = _traits("hi")
    with_video, _ = _traits([{"type": "text", "text": "hi"}, {"type": "video_url"}])
    # 1 ms per token by default: a video's 1,500 tokens are 1.5 s more to the first token.
    assert with_video - text_only == 1500
    assert timing_for(settings, with_video).ttft - timing_for(settings, text_only).ttft == 1.5
