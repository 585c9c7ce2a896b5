"""Request parsing, error objects, API-key checks and logprob shapes, without a server."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hyla.serve.auth import ApiKeyCheck
from hyla.serve.cli import banner
from hyla.serve.errors import validation_error
from hyla.serve.logprobs import chat_logprobs, completion_logprobs
from hyla.serve.protocol import ChatCompletionRequest, CompletionRequest


@pytest.mark.parametrize("prompt", ["hi", ["a", "b"], [1, 2, 3], [[1], [2, 3]]])
def test_every_openai_prompt_shape_parses(prompt):
    assert CompletionRequest.model_validate({"prompt": prompt}).prompt == prompt


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"prompt": [[1], "a"]}, "prompt", "invalid_value"),
        ({"prompt": []}, "prompt", "invalid_value"),
        ({"prompt": "x", "n": "2"}, "n", "invalid_value"),
        ({"prompt": "x", "top_p": 0}, "top_p", "invalid_value"),
        ({"prompt": "x", "stop": ["a"] * 17}, "stop", "invalid_value"),
        ({"prompt": "x", "extra": 1}, "extra", "unknown_parameter"),
    ],
)
def test_validation_errors_name_the_parameter(body, param, code):
    with pytest.raises(ValidationError) as caught:
        CompletionRequest.model_validate(body)
    error = validation_error(caught.value.errors())
    assert (error.status, error.param, error.code) == (400, param, code)
    assert param in error.body()["error"]["message"]


def test_chat_message_content_parts_and_roles():
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert ChatCompletionRequest.model_validate(body).messages[0].content[0].text == "hi"
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})


def test_api_key_check():
    assert ApiKeyCheck(None).accepts(None)
    check = ApiKeyCheck("s3cret")
    assert check.accepts("Bearer s3cret") and check.accepts("bearer s3cret")
    assert not check.accepts(None) and not check.accepts("s3cret") and not check.accepts("Bearer s3cre")
    assert check.accepts_metadata([("authorization", "Bearer s3cret")])
    assert not check.accepts_metadata([("x-other", "Bearer s3cret")])


def test_completion_logprobs_shape():
    entries = [None, {5: (-1.0, 2), 6: (-0.5, 1)}, {7: (-0.1, 1)}]
    out = completion_logprobs([4, 5, 7], entries, lambda t: f"<{t}>")
    assert out.tokens == ["<4>", "<5>", "<7>"] and out.text_offset == [0, 3, 6]
    assert out.token_logprobs == [None, -1.0, -0.1]
    assert out.top_logprobs == [None, {"<6>": -0.5, "<5>": -1.0}, {"<7>": -0.1}]
    chat = chat_logprobs([5], [entries[1]], lambda t: f"<{t}>", top=1)
    assert chat.content[0].logprob == -1.0 and [t.token for t in chat.content[0].top_logprobs] == ["<6>"]


def test_banner_examples_point_at_the_bound_ports():
    text = banner("my model", "0.0.0.0", 8123, 50123, with_key=True)
    assert "http://127.0.0.1:8123/v1/completions" in text and "127.0.0.1:50123" in text
    assert "Authorization: Bearer $HYLA_API_KEY" in text and '"model": "my model"' in text
    assert "grpc" not in banner("m", "127.0.0.1", 1, None, with_key=False).lower()
