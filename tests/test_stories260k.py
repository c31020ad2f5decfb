"""End to end on a real pretrained model (stories260K): generation and perplexity equal transformers'."""

from __future__ import annotations

import math

import numpy as np
import pytest
from click.testing import CliRunner

from lowbit.converter.export import convert
from lowbit.cli import main
from lowbit.runtime.evaluate import perplexity, transformers_perplexity
from lowbit.runtime.generate import SamplingConfig, generate_ids
from lowbit.runtime.session import create_session
from lowbit.runtime.tokenizer import load_tokenizer
from tests.conftest import SAMPLE_MODEL, WIKITEXT, genai_greedy

torch = pytest.importorskip("torch")
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("s260") / "onnx"
    convert(str(SAMPLE_MODEL), out, scheme="q0f32", target="ort")
    return out


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(SAMPLE_MODEL).eval()


def hf_greedy(hf_model, prompt_ids, n):
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(prompt_ids):].tolist()


def test_greedy_60_tokens_equal_transformers(converted, hf_model):
    tokenizer = load_tokenizer(converted)
    prompt = tokenizer.encode(PROMPT)
    ours = generate_ids(create_session(converted), [prompt], SamplingConfig(max_new_tokens=60))[0]
    assert ours == hf_greedy(hf_model, prompt, 60)
    assert "Lily" in tokenizer.decode(ours)


def test_cli_run_prints_transformers_text(converted, hf_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SAMPLE_MODEL)  # the reference text, from transformers end to end
    prompt = tokenizer(PROMPT)["input_ids"]
    expected = tokenizer.decode(prompt + hf_greedy(hf_model, prompt, 60), skip_special_tokens=True)
    result = CliRunner().invoke(main, ["run", str(converted), "--prompt", PROMPT, "--max-new-tokens", "60"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == expected.strip()


def test_batched_prompts_with_padding_equal_single_runs(converted):
    tokenizer = load_tokenizer(converted)
    session = create_session(converted)
    prompts = [tokenizer.encode(p) for p in ["Once upon a time", "The cat sat on the big red mat and"]]
    batched = generate_ids(session, prompts, SamplingConfig(max_new_tokens=20), pad_id=0)
    singles = [generate_ids(session, [p], SamplingConfig(max_new_tokens=20))[0] for p in prompts]
    assert batched == singles


def test_sampling_is_seeded_and_differs_from_greedy(converted):
    tokenizer = load_tokenizer(converted)
    session = create_session(converted)
    prompt = [tokenizer.encode(PROMPT)]
    config = SamplingConfig(max_new_tokens=30, do_sample=True, temperature=1.2, top_k=40, top_p=0.9, seed=7)
    a, b = generate_ids(session, prompt, config), generate_ids(session, prompt, config)
    assert a == b
    assert a != generate_ids(session, prompt, SamplingConfig(max_new_tokens=30))


@pytest.mark.skipif(not WIKITEXT.is_file(), reason="../shared/data/wikitext2_test.txt not present")
@pytest.mark.parametrize("seq_len,stride", [(256, 256), (256, 128)])
def test_perplexity_equals_transformers(converted, hf_model, seq_len, stride):
    tokenizer = load_tokenizer(converted)
    ids = np.asarray(tokenizer.encode(WIKITEXT.read_text()[:60000]), np.int64)
    ours = perplexity(create_session(converted), ids, seq_len, stride)
    expected, count = transformers_perplexity(hf_model, ids, seq_len, stride)
    assert ours.tokens == count
    assert f"{ours.perplexity:.4g}" == f"{expected:.4g}"
    assert 10 < ours.perplexity < 1000


@pytest.mark.skipif(not WIKITEXT.is_file(), reason="../shared/data/wikitext2_test.txt not present")
def test_cli_eval_json(converted):
    import json

    result = CliRunner().invoke(
        main, ["eval", str(converted), "--data", str(WIKITEXT), "--seq-len", "128", "--max-tokens", "2000", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["tokens"] == 2000 - math.ceil(2000 / 128)  # every window scores all but its first token
    assert 10 < data["perplexity"] < 1000


def test_onnxruntime_genai_runs_folder_with_same_greedy_tokens(converted, hf_model):
    tokenizer = load_tokenizer(converted)
    prompt = tokenizer.encode(PROMPT)
    tokens = genai_greedy(converted, prompt, 60)
    assert tokens == hf_greedy(hf_model, prompt, 60)


def test_cli_bench_and_inspect_json(converted):
    import json

    result = CliRunner().invoke(main, ["bench", str(converted), "--prompt-len", "16", "--new-tokens", "4",
                                       "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb", "model_bytes"):
        assert data[key] > 0
    assert data["batch"] == 1
    result = CliRunner().invoke(main, ["bench", str(converted), "--prompt-len", "16", "--new-tokens", "4",
                                       "--repeats", "1", "--batch", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["batch"] == 3
    result = CliRunner().invoke(main, ["inspect", str(converted), "--json"])
    info = json.loads(result.output)
    assert info["scheme"] == "q0f32" and info["ops"]["MatMul"] >= 5 * 4
