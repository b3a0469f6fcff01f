"""Bad input gets a clear error naming the field, and the system keeps serving."""

from __future__ import annotations

import grpc
import httpx
import pytest

from pantry.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from tests.e2e.local_system import LocalSystem

GOOD = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]
CONTEXT = 256  # the tiny models' max_position_embeddings


def _still_serves(system: LocalSystem) -> None:
    res = system.complete(GOOD, 4)
    assert len(res["choices"][0]["token_ids"]) == 4


def _bad_request(param: str, message: str) -> dict[str, object]:
    return {"error": {"message": f"{param}: {message}", "type": "invalid_request_error",
                      "param": param, "code": 400}}


TOO_LONG = "256 tokens do not fit the model's context of 256 tokens; shorten the prompt"
NO_ROOM = ("256 is too large: the 18-token prompt leaves room for 238 tokens in the context "
           "of 256")
NO_TOKENIZER = "this model has no tokenizer; send the prompt as token ids"
NOT_SERVED = "'{asked}' is not served here; use '{model}' (/v1/models)"


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        # Types and shapes: the request schema.
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": [1, "x"]}, "prompt[1]", 'must be an integer, got "x"'),
        ({"prompt": GOOD, "max_tokens": "ten"}, "max_tokens", 'must be an integer, got "ten"'),
        ({"prompt": GOOD, "n": 3}, "n",
         "only n=1 is supported; send one request per completion, got 3"),
        ({"prompt": GOOD, "stop": 7}, "stop", "must be a string or a list of strings"),
        ({"prompt": GOOD, "stop": ["a", 7]}, "stop[1]", "must be a string, got 7"),
        ({"prompt": GOOD, "stream_options": {"include_usage": "yes"}},
         "stream_options.include_usage", 'must be true or false, got "yes"'),
        ({"max_tokens": 3}, "prompt", "is required"),
        # Values: the conductor (check_prompt, SamplingParams).
        ({"prompt": []}, "prompt", "is empty; send at least one token"),
        ({"prompt": [1, 2, 512]}, "prompt", "token id 512 is outside the vocabulary [0, 512)"),
        ({"prompt": [1, -3]}, "prompt", "token id -3 is outside the vocabulary [0, 512)"),
        ({"prompt": list(range(10, 10 + CONTEXT))}, "prompt", TOO_LONG),
        ({"prompt": GOOD, "max_tokens": 0}, "max_tokens", "must be at least 1, got 0"),
        ({"prompt": GOOD, "max_tokens": -5}, "max_tokens", "must be at least 1, got -5"),
        ({"prompt": GOOD, "max_tokens": CONTEXT}, "max_tokens", NO_ROOM),
        ({"prompt": GOOD, "model": "gpt-4"}, "model", NOT_SERVED),
        ({"prompt": GOOD, "temperature": -1}, "temperature", "must be >= 0, got -1.0"),
        ({"prompt": GOOD, "top_p": 0}, "top_p", "must be in (0, 1], got 0.0"),
        ({"prompt": GOOD, "top_k": -2}, "top_k", "must be >= 0 (0 = off), got -2"),
        ({"prompt": "hello"}, "prompt", NO_TOKENIZER),  # a tiny model has no tokenizer
    ],
)
def test_completions_rejects_with_field(llama_system: LocalSystem, body: dict[str, object],
                                        param: str, message: str) -> None:
    body = {"model": llama_system.model, **body}
    resp = llama_system.post("/v1/completions", body)
    assert resp.status_code == 400, resp.text
    want = message.format(asked=body["model"], model=llama_system.model)
    assert resp.json() == _bad_request(param, want)


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"messages": "hi"}, "messages", 'must be a list, got "hi"'),
        ({"messages": [{"content": "hi"}]}, "messages[0].role", "is required"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": 5}]},
         "messages[1].content", "must be a string or a list of text parts"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content[0].type", "must be 'text', got \"image_url\""),
        ({"messages": []}, "messages", NO_TOKENIZER),
    ],
)
def test_chat_rejects_with_field(llama_system: LocalSystem, body: dict[str, object],
                                 param: str, message: str) -> None:
    resp = llama_system.post("/v1/chat/completions", body)
    assert resp.status_code == 400, resp.text
    assert resp.json() == _bad_request(param, message)


@pytest.mark.parametrize(("raw", "message"), [
    (b"{not json", "is not valid JSON: Expecting property name enclosed in double quotes: "
                   "line 1 column 2 (char 1)"),
    (b"[1, 2]", "must be a JSON object"),
    (b"\xff\xfe", "is not valid JSON: 'utf-8' codec can't decode byte 0xff in position 0: "
                  "invalid start byte"),
])
def test_malformed_json(llama_system: LocalSystem, raw: bytes, message: str) -> None:
    resp = httpx.post(llama_system.http + "/v1/completions", content=raw,
                      headers={"Content-Type": "application/json"}, timeout=30)
    assert resp.status_code == 400, resp.text
    assert resp.json() == _bad_request("body", message)
    _still_serves(llama_system)


def test_body_over_limit_is_refused(llama_system: LocalSystem) -> None:
    resp = httpx.post(llama_system.http + "/v1/completions", content=b"x" * (9 << 20),
                      headers={"Content-Type": "application/json"}, timeout=30)
    assert resp.status_code == 413
    assert resp.json() == {"error": {
        "message": "body: larger than the limit of 8388608 bytes (max_request_bytes)",
        "type": "invalid_request_error", "param": None, "code": 413}}
    _still_serves(llama_system)


def test_unknown_route_is_json_404(llama_system: LocalSystem) -> None:
    resp = httpx.get(llama_system.http + "/v1/nothing", timeout=10)
    assert resp.status_code == 404
    assert resp.json() == {"error": {"message": "Not Found", "type": "server_error",
                                     "param": None, "code": 404}}


def _grpc_generate(system: LocalSystem, req: generation_pb2.GenerateRequest
                   ) -> list[generation_pb2.GenerateResponse]:
    with grpc.insecure_channel(system.grpc_address) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        return list(stub.Generate(req, timeout=60))


def _sampled(**fields: float) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=GOOD),
                                          sampling=common_pb2.SamplingParams(**fields))


@pytest.mark.parametrize(
    ("req", "detail"),
    [
        (generation_pb2.GenerateRequest(), "prompt: is required: set text, token_ids or chat"),
        (generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=[])),
         "token_ids: is empty; send at least one token"),
        (generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=[1, 9999])),
         "token_ids: token id 9999 is outside the vocabulary [0, 512)"),
        (_sampled(max_tokens=-1), "max_tokens: must be at least 1, got -1"),
        (_sampled(max_tokens=4096), "max_tokens: 4096 is too large: the 18-token prompt leaves "
                                    "room for 238 tokens in the context of 256"),
        (_sampled(temperature=-1), "temperature: must be >= 0, got -1.0"),
        (_sampled(top_p=-0.5), "top_p: must be in (0, 1], got -0.5"),
        (generation_pb2.GenerateRequest(model="other", token_ids=generation_pb2.TokenIds(ids=GOOD)),
         "model: " + NOT_SERVED),
    ],
)
def test_grpc_invalid_argument(llama_system: LocalSystem, req: generation_pb2.GenerateRequest,
                               detail: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _grpc_generate(llama_system, req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == detail.format(asked="other", model=llama_system.model)
    _still_serves(llama_system)


def test_grpc_malformed_protobuf(llama_system: LocalSystem) -> None:
    with grpc.insecure_channel(llama_system.grpc_address) as ch:
        call = ch.unary_stream("/pantry.v1.Generation/Generate",
                               request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as info:
            list(call(b"\xff\xff\xff\xff\x0f", timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == (
        "request: not a GenerateRequest: Error parsing message with type "
        "'pantry.v1.GenerateRequest': Wire format was corrupt")
    _still_serves(llama_system)


def test_grpc_stream_matches_http(llama_system: LocalSystem) -> None:
    http = llama_system.complete(GOOD, 6)["choices"][0]["token_ids"]
    req = generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=GOOD),
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    msgs = _grpc_generate(llama_system, req)
    assert list(msgs[0].prompt_token_ids) == GOOD
    assert [t for m in msgs for t in m.token_ids] == http
    assert msgs[-1].finish_reason == "length"
    assert msgs[-1].usage.completion_tokens == 6
