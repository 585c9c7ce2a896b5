"""lm-eval's `local-completions` client scores loglikelihoods through our server exactly as in-process."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from hyla.runtime.engine import LLMEngine
from hyla.runtime.engine_config import EngineConfig
from hyla.runtime.loading import load_model, load_tokenizer
from hyla.serve.app import ServerSettings
from hyla.serve.background import ServerThread
from tests.tiny_models import tiny_teacher_dir

PAIRS = [
    ("The capital of France is", " Paris"),
    ("Question: what is two plus two?\nAnswer:", " four, of course."),
    ("Once upon a time", " there was a tiny model"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    return tiny_teacher_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(model_dir):
    engine = LLMEngine.from_config(EngineConfig(model=str(model_dir), cache_memory="64MiB", max_num_seqs=4))
    with ServerThread(engine, ServerSettings("tiny", port=0, grpc_port=None, log_level="warning")) as running:
        yield running


def in_process(model_dir) -> list[tuple[float, bool]]:
    """Loglikelihood and greedy flag of each continuation from the HF model's own log_softmax."""
    model, tok = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    results = []
    for context, continuation in PAIRS:
        whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
        n_context = len(tok(context, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
        rows = logprobs[n_context - 1 : len(whole) - 1]
        target = torch.tensor(whole[n_context:])
        total = rows.gather(1, target[:, None]).sum().item()
        results.append((total, bool((rows.argmax(-1) == target).all())))
    return results


def test_local_completions_loglikelihood_matches_in_process(server, model_dir):
    lm = get_model("local-completions")(
        model="tiny", base_url=server.base_url + "/v1/completions", tokenizer_backend="huggingface",
        tokenizer=str(model_dir), num_concurrent=1, max_retries=1, batch_size=2,
    )
    instances = [
        Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(PAIRS)
    ]
    served = lm.loglikelihood(instances)
    expected = in_process(model_dir)
    assert [g for _, g in served] == [g for _, g in expected]
    assert [lp for lp, _ in served] == pytest.approx([lp for lp, _ in expected], abs=1e-3)
