"""The eligibility predicate, gate by gate: which (provider, model) may serve which request.

Also home of `make_entry`, the ProviderEntry factory the registry and admission tests share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from daemon.config import load_settings
from daemon.nursery.supervisor import build_registry
from daemon.routing.breaker import Shape
from daemon.routing.eligibility import AWAITING_ATTESTATION, refusal
from daemon.routing.types import RequestTraits
from protocol.messages import ModelInfo, TemplateRender
from tests.fakes.entries import make_entry

# The predicate table ----------------------------------------------------------------------

PLAIN = ModelInfo(id="m")
NOW = 10_000.0
MAX_AGE = 960.0  # DINFER_CHALLENGE_MAX_AGE_S default: 16 minutes


@dataclass(frozen=True)
class Case:
    refusal: str | None
    entry: dict[str, Any] = field(default_factory=dict)
    model: ModelInfo = PLAIN
    traits: dict[str, Any] = field(default_factory=dict)
    # (shape, seconds before NOW) of a breaker cooldown opened on (p1, m, shape).
    cooldown: tuple[Shape, float] | None = None


TOO_OLD = "too old for tools (needs version >= 0.6.3)"
TOOLS = {"has_tools": True}
MEDIA = {"has_media": True}
VISION_MODEL = ModelInfo(id="m", is_vision=True)
TOOLS_FENCED = ModelInfo(id="m", is_vision=True, template_render=TemplateRender(tools=False))
RENDER_FAILED = ModelInfo(id="m", is_vision=True, template_render_ok=False)
BASE_RENDERS = ModelInfo(
    id="m", template_render_ok=False, template_render=TemplateRender(base=True)
)

CASES = {
    "eligible": Case(None),
    # Trust and attestation freshness
    "first-challenge-outstanding": Case(
        AWAITING_ATTESTATION, entry={"trusted": False, "last_challenge_pass": None}
    ),
    "first-challenge-outstanding-reports-capability-first": Case(
        TOO_OLD,
        entry={"trusted": False, "last_challenge_pass": None, "version": "0.6.2"},
        traits=TOOLS,
    ),
    "first-challenge-failed": Case(
        "untrusted",
        entry={"trusted": False, "last_challenge_pass": None, "challenge_failures": 1},
    ),
    "challenge-passed-15m59s-ago": Case(None, entry={"last_challenge_pass": NOW - MAX_AGE + 1}),
    "challenge-passed-16m-ago-is-stale": Case(
        "waiting for a fresh attestation", entry={"last_challenge_pass": NOW - MAX_AGE}
    ),
    "untrusted-after-failed-challenges": Case(
        "untrusted", entry={"trusted": False, "challenge_failures": 3}
    ),
    "banned": Case("untrusted", entry={"trusted": False, "banned_reason": "bad chunk"}),
    "draining": Case("draining", entry={"draining": True}),
    # The model
    "model-not-advertised": Case('not serving "other"', traits={"model": "other"}),
    # Render gate, per shape when template_render is sent
    "render-tools-false-fences-tools": Case(
        "unable to render tools requests with its chat template", model=TOOLS_FENCED, traits=TOOLS
    ),
    "render-tools-false-still-serves-base": Case(None, model=TOOLS_FENCED),
    "render-tools-false-still-serves-vision": Case(None, model=TOOLS_FENCED, traits=MEDIA),
    "render-vision-false-fences-vision": Case(
        "unable to render vision requests with its chat template",
        model=ModelInfo(id="m", is_vision=True, template_render=TemplateRender(vision=False)),
        traits=MEDIA,
    ),
    "render-tools-with-media-is-tools-shape": Case(
        None,
        model=ModelInfo(id="m", is_vision=True, template_render=TemplateRender(vision=False)),
        traits={**TOOLS, **MEDIA},
    ),
    "render-per-shape-overrides-overall-false": Case(
        None,
        model=BASE_RENDERS,
    ),
    "render-per-shape-absent-shape-is-no-opinion": Case(
        None,
        model=BASE_RENDERS,
        traits=TOOLS,
    ),
    # Render gate without template_render: an explicit false fences every shape
    "render-ok-false-fences-base": Case(
        "unable to render base requests with its chat template", model=RENDER_FAILED
    ),
    "render-ok-false-fences-tools": Case(
        "unable to render tools requests with its chat template", model=RENDER_FAILED, traits=TOOLS
    ),
    "render-ok-false-fences-vision": Case(
        "unable to render vision requests with its chat template", model=RENDER_FAILED, traits=MEDIA
    ),
    "render-ok-true-serves": Case(None, model=ModelInfo(id="m", template_render_ok=True)),
    # Version floor for tools
    "tools-version-at-floor": Case(None, entry={"version": "0.6.3"}, traits=TOOLS),
    "tools-version-below-floor": Case(TOO_OLD, entry={"version": "0.6.2"}, traits=TOOLS),
    "tools-version-compares-numerically": Case(None, entry={"version": "0.6.10"}, traits=TOOLS),
    "tools-version-0.10-beats-0.6": Case(None, entry={"version": "0.10.0"}, traits=TOOLS),
    "tools-version-missing": Case(TOO_OLD, entry={"version": ""}, traits=TOOLS),
    "tools-version-unparseable": Case(TOO_OLD, entry={"version": "0.7.0-beta"}, traits=TOOLS),
    "tools-version-with-v-prefix": Case(TOO_OLD, entry={"version": "v0.7.0"}, traits=TOOLS),
    "old-version-still-serves-base": Case(None, entry={"version": "0.5.0"}),
    "old-version-still-serves-vision": Case(
        None, entry={"version": "0.5.0"}, model=VISION_MODEL, traits=MEDIA
    ),
    # Vision
    "media-needs-a-vision-model": Case("without image or video support", traits=MEDIA),
    "media-is-vision-false": Case(
        "without image or video support", model=ModelInfo(id="m", is_vision=False), traits=MEDIA
    ),
    "media-on-a-vision-model": Case(None, model=VISION_MODEL, traits=MEDIA),
    # Allowlist of provider ids
    "allowlist-names-the-provider": Case(None, traits={"allowlist": frozenset({"p1", "p2"})}),
    "allowlist-leaves-it-out": Case(
        "outside the request's provider allowlist", traits={"allowlist": frozenset({"p2"})}
    ),
    # Breaker cooldown per (provider, model, shape)
    "cooldown-on-base-blocks-base": Case("cooling down after errors", cooldown=("base", 0.0)),
    "cooldown-on-tools-blocks-tools": Case(
        "cooling down after errors", traits=TOOLS, cooldown=("tools", 0.0)
    ),
    "cooldown-on-tools-does-not-block-base": Case(None, cooldown=("tools", 0.0)),
    "cooldown-on-base-does-not-block-vision": Case(
        None, model=VISION_MODEL, traits=MEDIA, cooldown=("base", 0.0)
    ),
    "cooldown-ends-after-300s": Case(None, cooldown=("base", 300.0)),
    "cooldown-holds-until-its-end": Case("cooling down after errors", cooldown=("base", 299.0)),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_refusal(case: Case) -> None:
    gates = build_registry(load_settings({})).gates
    if case.cooldown is not None:
        shape, ago = case.cooldown
        for _ in range(2):  # DINFER_BREAKER_THRESHOLD default
            gates.breaker.record_failure(("p1", "m", shape), 500, NOW - ago)
    entry = make_entry("p1", [case.model], **{"last_challenge_pass": NOW, **case.entry})
    traits = RequestTraits(**{"model": "m", **case.traits})
    assert refusal(entry, traits, gates, NOW) == case.refusal
