"""The real SmolLM2-135M-Instruct served over HTTP: greedy output through the openai client equals the
engine's offline output."""

from __future__ import annotations

import openai
import pytest

from hyla.runtime.engine import LLMEngine
from hyla.runtime.engine_config import EngineConfig
from hyla.runtime.engine_thread import EngineThread
from hyla.runtime.sampling_params import SamplingParams
from hyla.serve.app import ServerSettings
from hyla.serve.background import ServerThread

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_smollm2_greedy_completions_and_chat_equal_offline_engine():
    thread = EngineThread()  # built, run offline and served on one thread, as `hyla serve` does
    engine = thread.call(LLMEngine.from_config, EngineConfig(model="smollm2-135m", cache_memory="256MiB",
                                                             max_num_seqs=4, max_model_len=1024))
    greedy = SamplingParams(max_tokens=16, temperature=0)
    chat_ids = engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]
    offline = thread.call(engine.generate, [PROMPT, list(chat_ids)], greedy)
    completion_ref, chat_ref = (out.outputs[0].text for out in offline)
    assert "Paris" in chat_ref

    settings = ServerSettings("smollm2-135m", port=0, grpc_port=None, log_level="warning")
    with ServerThread(engine, settings, thread) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=16, temperature=0)
        assert reply.choices[0].text == completion_ref
        stream = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=16, temperature=0,
                                           stream=True)
        assert "".join(c.choices[0].text for c in stream) == completion_ref

        chat = client.chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_tokens=16, temperature=0)
        assert chat.choices[0].message.content == chat_ref
        stream = client.chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_tokens=16,
                                                temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == chat_ref
