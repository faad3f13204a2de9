"""The Ollama client against a real HTTP server on 127.0.0.1 speaking Ollama's wire format."""

from __future__ import annotations

import pickle
import time

import pytest
from ollama_fake import Action, FakeOllama, free_port

from neuronmap.errors import ConfigError, NeuronMapError
from neuronmap.prompts import load_prompts
from neuronmap.questions.ollama import (OllamaClient, OllamaError, OllamaModelNotFoundError, OllamaTimeoutError,
                                        OllamaUnavailableError, generate_ollama)


class SleepRecorder:
    """Stands in for time.sleep: records the backoff delays without waiting."""

    def __init__(self):
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def client_for(server: FakeOllama, **kwargs) -> OllamaClient:
    kwargs.setdefault("timeout", 5.0)
    kwargs.setdefault("sleep", SleepRecorder())
    return OllamaClient(server.url, **kwargs)


def test_server_binds_loopback_only():
    with FakeOllama() as server:
        assert server.host == "127.0.0.1"


def test_non_streaming_success_sends_ollama_request():
    with FakeOllama([Action(text="Why is the sky blue?")]) as server:
        client = client_for(server)
        text = client.generate("llama3.2", "Ask a question.", options={"temperature": 0.5, "seed": 7})
    assert text == "Why is the sky blue?"
    (request,) = server.requests
    assert (request.method, request.path) == ("POST", "/api/generate")
    assert request.body == {"model": "llama3.2", "prompt": "Ask a question.", "stream": False,
                            "options": {"temperature": 0.5, "seed": 7}}
    assert client.attempts == 1


def test_streaming_joins_chunks_and_reports_each():
    pieces = ["Why ", "is ", "the sky ", "blue?"]
    seen: list[str] = []
    with FakeOllama([Action(stream=pieces)]) as server:
        text = client_for(server).generate("llama3.2", "Ask.", stream=True, on_chunk=seen.append)
    assert text == "Why is the sky blue?"
    assert seen == pieces
    assert server.requests[0].body["stream"] is True


def test_http_500_is_retried_with_backoff_then_succeeds():
    with FakeOllama([Action(status=500, error="boom"), Action(status=503, error="busy"), Action(text="ok")]) as server:
        client = client_for(server, backoff=0.5, jitter=0.1, seed=3)
        assert client.generate("llama3.2", "p") == "ok"
    assert len(server.generate_requests()) == 3
    delays = client._sleep.delays
    assert len(delays) == 2
    assert 0.5 <= delays[0] <= 0.55 and 1.0 <= delays[1] <= 1.1  # doubles, jitter at most 10 %
    # the jitter is seeded: the same client settings wait the same times
    again = OllamaClient("http://127.0.0.1:1", backoff=0.5, jitter=0.1, seed=3)
    assert [again.delay(1), again.delay(2)] == delays


def test_persistent_500_gives_one_line_error_after_bounded_attempts():
    with FakeOllama([Action(status=500, error="model runner crashed")] * 10) as server:
        with pytest.raises(OllamaError) as info:
            client_for(server, retries=2).generate("llama3.2", "p")
    assert len(server.generate_requests()) == 3
    message = str(info.value)
    assert "\n" not in message and "failed 3 attempts" in message and "model runner crashed" in message


def test_model_not_found_is_one_request_with_a_clear_error():
    with FakeOllama([Action(status=404, error="model 'nope' not found")] * 5) as server:
        client = client_for(server)
        with pytest.raises(OllamaModelNotFoundError) as info:
            client.generate("nope", "p")
    assert len(server.generate_requests()) == 1, "404 must not be retried"
    assert client._sleep.delays == []
    message = str(info.value)
    assert "ollama pull nope" in message and "llama3.2:latest" in message  # installed models suggested
    assert isinstance(info.value, LookupError) and isinstance(info.value, NeuronMapError)


def test_slow_answer_times_out_then_retry_succeeds():
    with FakeOllama([Action(delay=3.0, text="too late"), Action(text="fast")]) as server:
        start = time.monotonic()
        text = client_for(server, timeout=0.3).generate("llama3.2", "p")
        elapsed = time.monotonic() - start
    assert text == "fast"
    assert len(server.generate_requests()) == 2
    assert elapsed < 2.5


def test_always_slow_gives_timeout_error():
    with FakeOllama([Action(delay=3.0)] * 3) as server:
        with pytest.raises(OllamaTimeoutError) as info:
            client_for(server, timeout=0.2, retries=1).generate("llama3.2", "p")
    assert "did not answer within 0.2 s (2 attempts)" in str(info.value)
    assert "--timeout" in str(info.value)


def test_stream_cut_before_done_and_error_mid_stream_are_retried():
    script = [Action(stream=["Why "], cut=True), Action(stream=["Why "], stream_error="runner died"),
              Action(stream=["Why?"])]
    with FakeOllama(script) as server:
        assert client_for(server).generate("llama3.2", "p", stream=True) == "Why?"
    assert len(server.generate_requests()) == 3


def test_connection_refused_fails_fast_with_clear_message():
    port = free_port()
    start = time.monotonic()
    with pytest.raises(OllamaUnavailableError) as info:
        OllamaClient(f"http://127.0.0.1:{port}").generate("llama3.2", "p")  # default retries and backoff
    elapsed = time.monotonic() - start
    assert elapsed < 6.0
    message = str(info.value)
    assert message.startswith(f"no Ollama server answers at http://127.0.0.1:{port}: start it with `ollama serve` "
                              "or pass --ollama-url")
    assert "\n" not in message
    assert isinstance(info.value, ConnectionError)


def test_not_an_ollama_server_is_not_retried():
    with FakeOllama([Action(raw=b"<html>hello</html>")]) as server:
        with pytest.raises(OllamaError, match="not JSON.*Ollama server"):
            client_for(server).generate("llama3.2", "p")
    assert len(server.generate_requests()) == 1


def test_list_models_and_version():
    with FakeOllama() as server:
        client = client_for(server)
        assert client.list_models() == ["llama3.2:latest", "qwen2.5:0.5b"]
        assert client.version() == "0.0.0-fake"


def test_errors_are_picklable_and_bad_settings_rejected():
    error = OllamaUnavailableError("no Ollama server answers at http://x")
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is OllamaUnavailableError and str(clone) == str(error)
    with pytest.raises(ConfigError, match="not an http"):
        OllamaClient("127.0.0.1:11434")
    with pytest.raises(ConfigError, match="timeout"):
        OllamaClient(timeout=0)
    with pytest.raises(ConfigError, match="retries"):
        OllamaClient(retries=-1)


@pytest.mark.parametrize("stream", [False, True])
def test_generate_ollama_collects_distinct_labelled_questions(stream):
    with FakeOllama() as server:
        df = generate_ollama("llama3.2", 7, seed=4, url=server.url, stream=stream, timeout=5)
        again = generate_ollama("llama3.2", 7, seed=4, url=server.url, stream=stream, timeout=5)
    assert len(df) == 7 and df["text"].is_unique
    assert df.equals(again)
    assert not df["text"].str.match(r"^\d").any(), "list numbering is stripped"
    assert set(df.columns) == {"text", "family", "model", "source_prompt", "topic", "request"}
    first = server.generate_requests()[0].body
    assert first["options"] == {"seed": 4 * 1_000_003, "temperature": 0.8, "num_predict": 256}
    assert first["stream"] is stream
    loaded = load_prompts(df)
    assert loaded["text"].tolist() == df["text"].tolist() and "topic" in loaded.columns


def test_generate_ollama_gives_up_after_max_requests():
    with FakeOllama([Action(text="Same question?")] * 10) as server:
        with pytest.raises(ConfigError, match=r"gave only 1 distinct prompts in 4 requests \(asked for 3\)"):
            generate_ollama("llama3.2", 3, url=server.url, max_requests=4, timeout=5)
