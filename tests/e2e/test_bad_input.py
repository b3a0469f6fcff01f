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


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": []}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, 2, 512]}, "prompt"),
        ({"prompt": [1, -3]}, "prompt"),
        ({"prompt": [1, "x"]}, "prompt"),
        ({"prompt": list(range(10, 10 + CONTEXT))}, "prompt"),
        ({"prompt": GOOD, "max_tokens": 0}, "max_tokens"),
        ({"prompt": GOOD, "max_tokens": -5}, "max_tokens"),
        ({"prompt": GOOD, "max_tokens": CONTEXT}, "max_tokens"),
        ({"prompt": GOOD, "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": GOOD, "model": "gpt-4"}, "model"),
        ({"prompt": GOOD, "temperature": -1}, "temperature"),
        ({"prompt": GOOD, "top_p": 0}, "top_p"),
        ({"prompt": GOOD, "n": 3}, "n"),
        ({"prompt": GOOD, "stop": 7}, "stop"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "hello"}, "prompt"),  # no tokenizer in a tiny model: ids are required
    ],
)
def test_completions_rejects_with_field(llama_system: LocalSystem, body: dict[str, object],
                                        field: str) -> None:
    resp = llama_system.post("/v1/completions", {"model": llama_system.model, **body})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == field
    assert err["message"].startswith(f"{field}:")
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "hi"}]}, "messages[0]"),
        ({"messages": "hi"}, "messages"),
    ],
)
def test_chat_rejects_with_field(llama_system: LocalSystem, body: dict[str, object],
                                 field: str) -> None:
    resp = llama_system.post("/v1/chat/completions", body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == field


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_malformed_json(llama_system: LocalSystem, raw: bytes) -> None:
    resp = httpx.post(llama_system.http + "/v1/completions", content=raw,
                      headers={"Content-Type": "application/json"}, timeout=30)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "body"
    _still_serves(llama_system)


def test_body_over_limit_is_refused(llama_system: LocalSystem) -> None:
    resp = httpx.post(llama_system.http + "/v1/completions", content=b"x" * (9 << 20),
                      headers={"Content-Type": "application/json"}, timeout=30)
    assert resp.status_code == 413
    assert "max_request_bytes" in resp.json()["error"]["message"]
    _still_serves(llama_system)


def test_unknown_route_is_json_404(llama_system: LocalSystem) -> None:
    resp = httpx.get(llama_system.http + "/v1/nothing", timeout=10)
    assert resp.status_code == 404
    assert "error" in resp.json()


def _grpc_generate(system: LocalSystem, req: generation_pb2.GenerateRequest
                   ) -> list[generation_pb2.GenerateResponse]:
    with grpc.insecure_channel(system.grpc_address) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        return list(stub.Generate(req, timeout=60))


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (generation_pb2.GenerateRequest(), "prompt"),
        (generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=[])), "token_ids"),
        (generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=[1, 9999])),
         "token_ids"),
        (generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=GOOD),
                                        sampling=common_pb2.SamplingParams(max_tokens=-1)),
         "max_tokens"),
        (generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=GOOD),
                                        sampling=common_pb2.SamplingParams(max_tokens=4096)),
         "max_tokens"),
        (generation_pb2.GenerateRequest(model="other", token_ids=generation_pb2.TokenIds(ids=GOOD)),
         "model"),
    ],
)
def test_grpc_invalid_argument(llama_system: LocalSystem, req: generation_pb2.GenerateRequest,
                               field: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _grpc_generate(llama_system, req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}:")
    _still_serves(llama_system)


def test_grpc_malformed_protobuf(llama_system: LocalSystem) -> None:
    with grpc.insecure_channel(llama_system.grpc_address) as ch:
        call = ch.unary_stream("/pantry.v1.Generation/Generate",
                               request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as info:
            list(call(b"\xff\xff\xff\xff\x0f", timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("request:")
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
