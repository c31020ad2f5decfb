"""Our transformers-free tokenizer, streaming detokenizer and chat against transformers' own."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import lowbit
from lowbit.cli import main
from lowbit.runtime.chat import Chat
from lowbit.runtime.generate import SamplingConfig, TextStream, generate_ids
from lowbit.runtime.tokenizer import load_tokenizer
from tests.conftest import SAMPLE_MODEL

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Once upon a time",
    "  two leading spaces, trailing ",
    "emoji 😀🎉 and ünïcödé, 日本語のテキスト",
    "",
    "lines\nand\n\n  tabs\tend",
    "<s> special tokens inside </s> the text",
    "don't stop . ? ! it's fine",
]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2 = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ '<<SYS>>' + m['content'] + '<</SYS>> ' }}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] | trim + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory):
    """A GPT-2-style byte-level BPE tokenizer trained here, saved by transformers with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [t * 3 for t in TEXTS] + ["the cat sat on the mat and the dog ran to the park"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML
    folder = tmp_path_factory.mktemp("bytelevel")
    fast.save_pretrained(folder)
    return folder


def assert_same_as_transformers(folder, texts):
    ours = load_tokenizer(folder)
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    for text in texts:
        ids = ref(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"], text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    assert ours.eos_token_id == ref.eos_token_id and ours.pad_token_id == ref.pad_token_id
    return ours, ref


def test_sentencepiece_bpe_tokenizer_equals_transformers():
    assert_same_as_transformers(SAMPLE_MODEL, TEXTS)


def test_byte_level_tokenizer_equals_transformers(byte_level_dir):
    assert_same_as_transformers(byte_level_dir, TEXTS)


def test_tokenizer_model_only_falls_back_to_sentencepiece(tmp_path):
    pytest.importorskip("sentencepiece")
    folder = tmp_path / "sp"
    shutil.copytree(SAMPLE_MODEL, folder)
    (folder / "tokenizer.json").unlink()
    ours = load_tokenizer(folder)
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    # sentencepiece's own normalisation folds repeated spaces and reads special-token text as plain text,
    # where transformers does neither: the fallback matches it on ordinary text (docs/api.md says so)
    for text in [t for t in TEXTS if "  " not in t and "<s>" not in t]:
        assert ours.encode(text) == ref(text)["input_ids"], text
        assert ours.decode(ref(text)["input_ids"]) == ref.decode(ref(text)["input_ids"], skip_special_tokens=True)


@pytest.mark.parametrize("template", [CHATML, LLAMA2])
def test_chat_template_renders_like_transformers(byte_level_dir, tmp_path, template):
    folder = tmp_path / "t"
    shutil.copytree(byte_level_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(chat_template=template, bos_token="<|im_start|>")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    ours = load_tokenizer(folder)
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there "},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "日本語?"}]
    for prompt in (True, False):
        assert ours.apply_chat_template(conversation, prompt) == ref.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=prompt)
    if template == LLAMA2:
        with pytest.raises(lowbit.LowbitError, match="unknown role tool"):
            ours.apply_chat_template([{"role": "tool", "content": "x"}])


def random_text(rng, n: int) -> str:
    """Words, spaces, punctuation and multi-byte characters (accents, CJK, emoji)."""
    alphabet = list("abcdefghij klmnop ,.!?'\n") + list("éüñ日本語テ😀🎉™€")
    return "".join(rng.choice(alphabet, n))


def test_text_stream_pieces_concatenate_to_the_whole_decode(byte_level_dir, rng):
    """Random text with characters that span several byte tokens, streamed token by token."""
    for folder in (SAMPLE_MODEL, byte_level_dir):
        tokenizer = load_tokenizer(folder)
        for _ in range(20):
            prompt = tokenizer.encode(random_text(rng, int(rng.integers(0, 8))))
            new = tokenizer.encode(random_text(rng, 40), add_special_tokens=False)
            whole = tokenizer.decode(prompt + new)
            stream = TextStream(tokenizer, prompt, include_prompt=True)
            pieces = [stream.push(t) for t in new] + [stream.flush()]
            assert "".join(pieces) == whole
            assert all("\ufffd" not in p for p in pieces)  # no half character is ever shown
            stream = TextStream(tokenizer, prompt)  # continuation only
            continuation = "".join(stream.push(t) for t in new) + stream.flush()
            assert tokenizer.decode(prompt) + continuation == whole


def test_multibyte_characters_are_held_until_complete():
    tokenizer = load_tokenizer(SAMPLE_MODEL)
    ids = tokenizer.encode("a 😀 b", add_special_tokens=False)
    stream = TextStream(tokenizer, [])
    pieces = [stream.push(t) for t in ids]
    assert "".join(pieces) + stream.flush() == "a 😀 b"
    assert "😀" in pieces and "" in pieces  # the emoji's 4 byte tokens: held, then emitted whole


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    out = tmp_path_factory.mktemp("stories") / "q0f32"
    lowbit.convert(SAMPLE_MODEL, out, "q0f32")
    return out


@pytest.fixture(scope="module")
def stories_chat(stories, tmp_path_factory):
    """The stories260K folder with a chat template added (the model has none of its own)."""
    folder = tmp_path_factory.mktemp("chat") / "q0f32"
    shutil.copytree(stories, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = LLAMA2.replace("[INST] ", "").replace(" [/INST]", ". ")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_cli_run_streams_the_same_text_as_a_batch_run(stories):
    prompts = ["Once upon a time", "The dog"]
    single = [CliRunner().invoke(main, ["run", str(stories), "--prompt", p, "--max-new-tokens", "40"]) for p in prompts]
    batch = CliRunner().invoke(main, ["run", str(stories), "--prompt", prompts[0], "--prompt", prompts[1],
                                      "--max-new-tokens", "40"])
    assert all(r.exit_code == 0 for r in single) and batch.exit_code == 0, batch.output
    assert batch.output.splitlines() == [r.output.rstrip("\n") for r in single]


def test_api_generate_and_stream_agree(stories):
    model = lowbit.load(stories)
    prompt = "Once upon a time"
    text = model.generate(prompt, max_new_tokens=50)
    assert "".join(model.stream(prompt, max_new_tokens=50)) == text
    ids = model.encode(prompt)
    new = generate_ids(model.session, [ids], SamplingConfig(50), model.eos_ids)[0]
    assert model.tokenizer.decode(ids) + text == model.tokenizer.decode(ids + new)
    sampled = model.generate([prompt, "Tom"], max_new_tokens=20, do_sample=True, top_k=5, seed=3)
    assert sampled == model.generate([prompt, "Tom"], max_new_tokens=20, do_sample=True, top_k=5, seed=3)


def test_cli_run_chat_uses_the_template(stories_chat, stories):
    model = lowbit.load(stories_chat)
    conversation = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "Lily and the cat"}]
    ids = model.tokenizer.encode(model.tokenizer.apply_chat_template(conversation), add_special_tokens=False)
    assert ids[0] == model.tokenizer.bos_token_id and ids.count(model.tokenizer.bos_token_id) == 1
    expected = model.tokenizer.decode(generate_ids(model.session, [ids], SamplingConfig(30), model.eos_ids)[0])
    result = CliRunner().invoke(main, ["run", str(stories_chat), "--chat", "--system", "Tell a story.",
                                       "--prompt", "Lily and the cat", "--max-new-tokens", "30"])
    assert result.exit_code == 0, result.output
    assert result.output.rstrip("\n") == expected
    result = CliRunner().invoke(main, ["run", str(stories), "--chat", "--prompt", "hi"])
    assert result.exit_code == 2 and "no chat template" in result.output
    result = CliRunner().invoke(main, ["run", str(stories), "--system", "x", "--prompt", "hi"])
    assert result.exit_code == 2 and "--system needs --chat" in result.output


def test_chat_reuses_the_kv_cache_and_matches_a_fresh_run(stories_chat):
    model = lowbit.load(stories_chat)
    chat = Chat(model, system="Tell a story.")
    first = "".join(chat.send("Tom had a red ball", max_new_tokens=25))
    second = "".join(chat.send("Then the dog came", max_new_tokens=25))
    fresh = Chat(model, system="Tell a story.")
    fresh.messages = chat.messages[:2]
    assert chat.reused_tokens >= len(fresh.prompt_ids())  # the first turn's prompt was not fed again
    fresh = Chat(model, system="Tell a story.")
    fresh.messages = chat.messages[:-1]  # the same conversation up to the second user turn, no cache
    ids = fresh.prompt_ids()
    expected = model.tokenizer.decode(generate_ids(model.session, [ids], SamplingConfig(25), model.eos_ids)[0])
    assert second == expected
    assert chat.messages[2] == {"role": "assistant", "content": first}


def test_interactive_chat_command(stories_chat):
    result = CliRunner().invoke(main, ["chat", str(stories_chat), "--max-new-tokens", "10"],
                                input="Tom had a ball\n\nThe end\n/exit\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("> ") == 4  # three prompts answered or skipped, then /exit
    model = lowbit.load(stories_chat)
    chat = Chat(model)
    replies = ["".join(chat.send(t, 10)) for t in ("Tom had a ball", "The end")]
    for reply in replies:
        assert reply in result.output


def test_run_reads_no_heavy_modules(stories):
    import subprocess
    import sys

    code = (
        "import sys\nfrom lowbit.cli import main\n"
        f"main(['run', {str(stories)!r}, '--prompt', 'hi', '--max-new-tokens', '3'], standalone_mode=False)\n"
        "heavy = [m for m in ('torch', 'transformers', 'onnx', 'onnx_ir', 'lowbit.converter') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_generate_ids_is_stream_ids_collected(stories, rng):
    model = lowbit.load(stories)
    prompts = [rng.integers(3, 500, n).tolist() for n in (4, 9)]
    ids = generate_ids(model.session, prompts, SamplingConfig(12), model.eos_ids)
    singles = [generate_ids(model.session, [p], SamplingConfig(12), model.eos_ids)[0] for p in prompts]
    assert ids == singles
    assert all(isinstance(t, int) for row in ids for t in row) and np.asarray(ids[0]).size > 0
