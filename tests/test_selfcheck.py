"""The provider's chat-template self-check: template sources, per-shape verdicts, time bound.

The templates under tests/data/templates are public ones (Gemma 3, Qwen2.5) and one written for
these tests in the style of Gemma's function-calling templates (it upper-cases parameter types).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import msgspec
import pytest
import trio
import trio.testing

from protocol.messages import ModelInfo, TemplateRender
from protocol.toolschema import normalize_tools
from provider import selfcheck
from provider.selfcheck import (
    FIXTURE_TOOL,
    TemplateVerdict,
    check_template,
    fixture_error,
    render_chat,
    render_fixtures,
    self_check,
    tool_fixtures,
    with_verdict,
)
from provider.templates import TemplateLoadError, TemplateSet, load_template

DATA = Path(__file__).parent / "data" / "templates"
GEMMA3 = (DATA / "gemma3-it.jinja").read_text()
QWEN25 = (DATA / "qwen2.5-instruct.jinja").read_text()
UPPER_TYPES = (DATA / "upper-types.jinja").read_text()

NESTED_LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
LOOPS_ON_TOOLS = "{% if tools %}" + NESTED_LOOP + "{% endif %}{{ messages[-1]['role'] }}"


def write_json(path: Path, document: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


def write_gguf(path: Path, chat_template: Any = None) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# Template sources ----------------------------------------------------------------------------


def test_jinja_file_is_the_template() -> None:
    loaded = load_template(DATA / "gemma3-it.jinja")
    assert loaded == TemplateSet(GEMMA3, None, str(DATA / "gemma3-it.jinja"))


def test_snapshot_with_chat_template_jinja_wins_over_tokenizer_config(tmp_path: Path) -> None:
    (tmp_path / "chat_template.jinja").write_text(GEMMA3)
    write_json(tmp_path / "tokenizer_config.json", {"chat_template": QWEN25})
    assert load_template(tmp_path).default == GEMMA3


def test_snapshot_additional_tool_use_template_serves_tools(tmp_path: Path) -> None:
    (tmp_path / "chat_template.jinja").write_text(GEMMA3)
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text(QWEN25)
    loaded = load_template(tmp_path)
    assert (loaded.default, loaded.tool_use) == (GEMMA3, QWEN25)
    assert render_fixtures(loaded, vision=False).render == TemplateRender(base=True, tools=True)


def test_snapshot_with_chat_template_json(tmp_path: Path) -> None:
    write_json(tmp_path / "chat_template.json", {"chat_template": QWEN25})
    assert load_template(tmp_path).default == QWEN25


def test_snapshot_with_tokenizer_config_string(tmp_path: Path) -> None:
    config = {"bos_token": {"content": "<bos>"}, "chat_template": GEMMA3, "eos_token": "<eos>"}
    write_json(tmp_path / "tokenizer_config.json", config)
    assert load_template(tmp_path) == TemplateSet(
        GEMMA3, None, str(tmp_path / "tokenizer_config.json")
    )


def test_named_templates_pick_default_and_tool_use(tmp_path: Path) -> None:
    named = [{"name": "default", "template": GEMMA3}, {"name": "tool_use", "template": QWEN25}]
    config = write_json(tmp_path / "tokenizer_config.json", {"chat_template": named})
    for source in (tmp_path, config):
        loaded = load_template(source)
        assert (loaded.default, loaded.tool_use) == (GEMMA3, QWEN25)
    # Gemma 3 alone fails the tool flow; the tool_use template is what renders it.
    verdict = render_fixtures(load_template(tmp_path), vision=True)
    assert verdict.render == TemplateRender(base=True, tools=True, vision=True)


def test_named_templates_without_default_are_an_error(tmp_path: Path) -> None:
    named = [{"name": "tool_use", "template": QWEN25}]
    write_json(tmp_path / "tokenizer_config.json", {"chat_template": named})
    with pytest.raises(TemplateLoadError, match="without a 'default'"):
        load_template(tmp_path)


def test_gguf_metadata_template(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "model.gguf", UPPER_TYPES)
    assert load_template(path) == TemplateSet(UPPER_TYPES, None, str(path))


def test_gguf_named_templates(tmp_path: Path) -> None:
    named = [{"name": "default", "template": GEMMA3}, {"name": "tool_use", "template": QWEN25}]
    loaded = load_template(write_gguf(tmp_path / "model.gguf", named))
    assert (loaded.default, loaded.tool_use) == (GEMMA3, QWEN25)


def test_gguf_without_template(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "base-model.gguf")
    with pytest.raises(TemplateLoadError, match=r"base-model\.gguf: GGUF metadata has no"):
        load_template(path)


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"definitely not a GGUF header")
    with pytest.raises(TemplateLoadError, match="not a readable GGUF file"):
        load_template(path)


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "chat_template.jinja"
    with pytest.raises(TemplateLoadError) as caught:
        load_template(missing)
    assert str(caught.value) == f"{missing}: no such file or directory"


@pytest.mark.parametrize(
    "files",
    [
        pytest.param({}, id="empty-directory"),
        pytest.param(
            {"tokenizer_config.json": {"model_max_length": 8192}}, id="no-chat-template-key"
        ),
        pytest.param({"chat_template.json": {"chat_template": "  "}}, id="blank-template"),
    ],
)
def test_directory_without_template(tmp_path: Path, files: dict[str, Any]) -> None:
    for name, document in files.items():
        write_json(tmp_path / name, document)
    with pytest.raises(
        TemplateLoadError, match=r"no chat template \(looked for chat_template\.jinja"
    ):
        load_template(tmp_path)


def test_malformed_config_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": 42}')
    with pytest.raises(
        TemplateLoadError, match=r"tokenizer_config\.json: unreadable .*chat_template"
    ):
        load_template(tmp_path)


def test_blank_jinja_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.jinja").write_text("\n")
    with pytest.raises(TemplateLoadError, match="the chat template is empty"):
        load_template(tmp_path / "empty.jinja")


# Rendering the fixtures ----------------------------------------------------------------------


def test_gemma3_renders_plain_chat_and_images_but_not_tool_turns() -> None:
    verdict = render_fixtures(GEMMA3, vision=True)
    assert verdict.render == TemplateRender(base=True, tools=False, vision=True)
    assert verdict.ok is False
    alternate = "Conversation roles must alternate user/assistant/user/assistant/..."
    assert verdict.reasons == {"tools": f"TemplateError: {alternate}"}


def test_qwen25_renders_the_tool_flow() -> None:
    verdict = render_fixtures(QWEN25, vision=False)
    assert verdict.render == TemplateRender(base=True, tools=True, vision=None)
    assert (verdict.ok, verdict.reasons) == (True, {})
    rendered = render_chat(QWEN25, **selfcheck.FIXTURES["tools"][2])
    assert '"nullable": true' in rendered
    assert "<tool_response>\n" in rendered


def test_a_text_only_template_fails_the_vision_shape() -> None:
    # Qwen2.5 concatenates `content` as a string: list-of-parts content breaks it.
    assert render_fixtures(QWEN25, vision=True).render.vision is False


def test_upper_casing_template_renders_the_normalized_tool() -> None:
    verdict = render_fixtures(UPPER_TYPES, vision=True)
    assert verdict.render == TemplateRender(base=True, tools=True, vision=True)
    declared = render_chat(UPPER_TYPES, **tool_fixtures(FIXTURE_TOOL)[0])
    assert "country:{type:STRING,description:<escape>ISO 3166" in declared
    assert "days:{type:ARRAY,description:<escape>Forecast days" in declared


RAW_TOOL: dict[str, Any] = json.loads(json.dumps(FIXTURE_TOOL))
RAW_TOOL["function"]["parameters"]["properties"]["location"]["properties"]["country"] = {
    "type": ["string", "null"],
    "description": "ISO 3166 country code, when known.",
}
del RAW_TOOL["function"]["parameters"]["properties"]["days"]["type"]


def test_fixture_tool_is_the_normalized_raw_tool() -> None:
    body = json.dumps({"model": "m", "tools": [RAW_TOOL]}).encode()
    assert json.loads(normalize_tools(body))["tools"] == [FIXTURE_TOOL]


def without_type(tool: dict[str, Any]) -> dict[str, Any]:
    copy: dict[str, Any] = json.loads(json.dumps(tool))
    del copy["function"]["parameters"]["properties"]["unit"]["type"]
    return copy


def with_nullable_array_type(tool: dict[str, Any]) -> dict[str, Any]:
    copy: dict[str, Any] = json.loads(json.dumps(tool))
    copy["function"]["parameters"]["properties"]["unit"]["type"] = ["string", "null"]
    return copy


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        pytest.param(RAW_TOOL, "an undefined value", id="pydantic-optional-and-missing-type"),
        pytest.param(with_nullable_array_type(FIXTURE_TOOL), "list", id="nullable-array-type"),
        pytest.param(without_type(FIXTURE_TOOL), "an undefined value", id="missing-type"),
    ],
)
def test_check_catches_the_upper_crash_on_raw_schemas(raw: dict[str, Any], kind: str) -> None:
    error = fixture_error(UPPER_TYPES, tool_fixtures(raw))
    assert error == f"TypeError: the upper filter needs a string, got {kind}"
    # Templates that never upper-case types are untouched by the raw schema.
    assert fixture_error(QWEN25, tool_fixtures(raw)) is None


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        pytest.param("{% for m in messages %}{{ m.role }", "TemplateSyntaxError", id="syntax"),
        pytest.param("{% for i in range(10**9) %}{% endfor %}", "OverflowError", id="range-cap"),
        pytest.param("{{ raise_exception('nope') }}", "TemplateError: nope", id="raise"),
        pytest.param("{{ messages.append(1) }}", "SecurityError", id="mutation"),
        pytest.param("{{ messages[0]['content'] + 1 }}", "TypeError", id="type-error"),
        pytest.param("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError", id="rec"),
    ],
)
def test_a_template_that_throws_is_false_for_every_shape(source: str, reason: str) -> None:
    verdict = render_fixtures(source, vision=True)
    assert verdict.render == TemplateRender(base=False, tools=False, vision=False)
    assert verdict.reasons["base"].startswith(reason)


def test_a_template_that_rejects_video_fails_only_the_vision_shape() -> None:
    source = (
        "{% for m in messages %}{% if m.content is sequence and m.content is not string %}"
        "{% for part in m.content %}"
        "{% if part.type == 'video' %}{{ raise_exception('video parts are not supported') }}"
        "{% endif %}{% endfor %}{% endif %}{% endfor %}ok"
    )
    verdict = render_fixtures(source, vision=True)
    assert verdict.render == TemplateRender(base=True, tools=True, vision=False)
    assert verdict.reasons == {"vision": "TemplateError: video parts are not supported"}


def test_environment_has_hugging_face_helpers() -> None:
    source = (
        "{{ bos_token }}[{{ strftime_now('%Y') | length }}]"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}{{ m | tojson(indent=1) }}{% endgeneration %}{% endfor %}"
        "{% if tools %}{{ tools[0].function.name }}{% endif %}{{ eos_token }}"
    )
    messages = [{"role": "user", "content": "é"}, {"role": "assistant", "content": "unseen"}]
    rendered = render_chat(source, messages, [FIXTURE_TOOL])
    assert rendered == '[4]{\n "role": "user",\n "content": "é"\n}get_weather'
    assert render_fixtures(source, vision=True).ok is True


def test_trim_and_lstrip_blocks_like_hugging_face() -> None:
    source = "  {% for m in messages %}\n{{ m.role }}\n  {% endfor %}\n"
    assert render_chat(source, [{"role": "user"}, {"role": "assistant"}]) == "user\nassistant\n"


# Verdicts and ModelInfo ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("render", "ok"),
    [
        (TemplateRender(), None),
        (TemplateRender(base=True, tools=True), True),
        (TemplateRender(base=True, tools=True, vision=True), True),
        (TemplateRender(base=True, tools=False, vision=True), False),
        (TemplateRender(base=None, tools=False), False),
    ],
)
def test_overall_verdict_is_tri_state(render: TemplateRender, ok: bool | None) -> None:
    assert TemplateVerdict(render).ok is ok


def test_model_info_carries_an_explicit_false_on_the_wire() -> None:
    model = ModelInfo(id="gemma3:4b", is_vision=True, context_length=8192)
    checked = with_verdict(model, render_fixtures(GEMMA3, vision=True))
    assert json.loads(msgspec.json.encode(checked)) == {
        "id": "gemma3:4b",
        "is_vision": True,
        "template_render_ok": False,
        "template_render": {"base": True, "tools": False, "vision": True},
        "context_length": 8192,
    }
    cleared = with_verdict(checked, None)
    assert cleared == model


# The bounded check in a child process --------------------------------------------------------


async def test_check_in_a_child_agrees_with_the_in_process_render() -> None:
    for source in (GEMMA3, UPPER_TYPES):
        checked = await check_template(source, vision=True)
        assert checked == render_fixtures(source, vision=True)


async def test_check_uses_the_tool_use_template_for_tools() -> None:
    checked = await check_template(TemplateSet(GEMMA3, QWEN25), vision=False)
    assert checked.render == TemplateRender(base=True, tools=True)


async def test_a_looping_template_is_false_within_the_bound() -> None:
    start = trio.current_time()
    verdict = await check_template(LOOPS_ON_TOOLS, vision=False, render_bound=1.0)
    elapsed = trio.current_time() - start
    assert verdict.render == TemplateRender(base=True, tools=False)
    assert verdict.reasons == {"tools": "did not render within 1 s"}
    # The bound, plus two child start-ups: the runaway child was killed, not waited for.
    assert 1.0 <= elapsed < 4.0


async def test_a_slow_start_up_does_not_count_against_the_bound(
    monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock
) -> None:
    # A busy machine (a backend loading its model beside the node) starts the child slowly: a
    # good template must still be true. The child times its render itself (the looping
    # template's test shows it); the parent waits past the bound for the start-up. Here the
    # child takes 1.5 virtual seconds to start and answer, over a 1 s bound.
    async def slow_child(command: Any, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        mock_clock.jump(1.5)
        # trio.lowlevel: a bare checkpoint, where a cancel at the bound would be delivered.
        await trio.lowlevel.checkpoint()
        return subprocess.CompletedProcess(command, 0, b'{"error": null}', b"")

    monkeypatch.setattr(trio, "run_process", slow_child)
    verdict = await check_template(GEMMA3, vision=False, render_bound=1.0)
    assert verdict.render == TemplateRender(base=True, tools=True)
    assert verdict.reasons == {}


async def test_a_memory_bomb_fails_inside_the_child() -> None:
    verdict = await check_template("{{ 'x' * (1536 * 2**20) }}", vision=False)
    assert verdict.render == TemplateRender(base=False, tools=False)
    assert verdict.reasons["base"] == "MemoryError"


async def test_a_syntax_error_is_false_in_the_child() -> None:
    verdict = await check_template("{% if %}", vision=False)
    assert verdict.render == TemplateRender(base=False, tools=False)
    assert verdict.reasons["base"].startswith("TemplateSyntaxError")


async def test_caller_cancellation_kills_the_render() -> None:
    start = trio.current_time()
    with trio.move_on_after(0.5) as scope:
        await check_template(NESTED_LOOP, vision=False, render_bound=60)
    assert scope.cancelled_caught
    assert trio.current_time() - start < 3.0


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        pytest.param((sys.executable, "-c", "pass"), "exited with 0 and no answer", id="no-answer"),
        pytest.param(("/nonexistent/python",), "could not start a render process", id="no-start"),
    ],
)
async def test_a_check_that_cannot_run_gives_no_opinion(
    monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...], reason: str
) -> None:
    monkeypatch.setattr(selfcheck, "_WORKER_COMMAND", command)
    verdict = await check_template(GEMMA3, vision=False)
    assert (verdict.render, verdict.ok) == (TemplateRender(), None)
    assert reason in verdict.reasons["base"]


# The node's entry point ----------------------------------------------------------------------


async def test_self_check_advertises_per_shape_results(caplog: pytest.LogCaptureFixture) -> None:
    model = ModelInfo(id="gemma3:4b", is_vision=True)
    with caplog.at_level(logging.WARNING, logger="provider.selfcheck"):
        checked = await self_check(model, DATA / "gemma3-it.jinja")
    assert checked.template_render_ok is False
    assert checked.template_render == TemplateRender(base=True, tools=False, vision=True)
    assert "model gemma3:4b: chat template fails the tools shape" in caplog.text


async def test_self_check_without_template_gives_no_verdict(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stale = ModelInfo(id="m", template_render_ok=True, template_render=TemplateRender(base=True))
    missing = tmp_path / "missing.gguf"
    with caplog.at_level(logging.WARNING, logger="provider.selfcheck"):
        checked = await self_check(stale, missing)
    assert checked == ModelInfo(id="m")
    assert f"model m: no chat-template verdict: {missing}: no such file" in caplog.text
    assert await self_check(stale, None) == ModelInfo(id="m")
