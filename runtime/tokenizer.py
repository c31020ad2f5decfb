"""Tokenizers of a converted folder without transformers: `tokenizer.json` through the `tokenizers`
library (sentencepiece's `tokenizer.model` as a fallback), special tokens and the chat template from
`tokenizer_config.json`. Nothing here imports torch or transformers, so generation starts fast."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lowbit.errors import LowbitError

# transformers' `clean_up_tokenization` (applied on decode when the folder asks for it)
CLEAN_UP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


@dataclass
class Tokenizer:
    """Encode, decode and chat-format text the way the model's Hugging Face tokenizer does."""

    backend: object  # tokenizers.Tokenizer, or a SentencePieceBackend
    config: dict = field(default_factory=dict)
    generation_eos: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.pad_token_id = self.token_to_id(_token_text(self.config.get("pad_token")))
        self.chat_template = self.config.get("chat_template")
        self.special_ids = set(self.backend.special_ids()) | {
            i for i in (self.bos_token_id, self.eos_token_id, self.pad_token_id) if i is not None
        }
        # tokenizer.json's post-processor adds BOS/EOS, unless the config says so explicitly (transformers
        # rebuilds the post-processor from add_bos_token / add_eos_token for Llama-style tokenizers)
        self.explicit_specials = "add_bos_token" in self.config or "add_eos_token" in self.config

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_ids(self) -> set[int]:
        """Every id that ends generation: the tokenizer's EOS and generation_config's."""
        return {i for i in [self.eos_token_id, *self.generation_eos] if i is not None}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not self.explicit_specials:
            return self.backend.encode(text, add_special_tokens)
        ids = self.backend.encode(text, False)
        if add_special_tokens and self.config.get("add_bos_token") and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        if add_special_tokens and self.config.get("add_eos_token") and self.eos_token_id is not None:
            ids = [*ids, self.eos_token_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        text = self.backend.decode(ids)
        if self.config.get("clean_up_tokenization_spaces"):
            for old, new in CLEAN_UP:
                text = text.replace(old, new)
        return text

    def check_chat_template(self) -> None:
        if not self.chat_template:
            raise LowbitError("this model's folder has no chat template (tokenizer_config.json or chat_template.jinja)")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, rendered like transformers' `apply_chat_template`."""
        self.check_chat_template()
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def strftime_now(fmt):
            from datetime import datetime

            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        specials = {k: _token_text(v) for k, v in self.config.items() if k.endswith("_token")}
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **specials
            )
        except jinja2.exceptions.TemplateError as e:
            raise LowbitError(f"chat template: {e}") from None


class TokenizersBackend:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.tok = HFTokenizer.from_file(str(path))

    def encode(self, text, add_special_tokens):
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token):
        return self.tok.token_to_id(token)

    def special_ids(self):
        return [i for i, t in self.tok.get_added_tokens_decoder().items() if t.special]


class SentencePieceBackend:
    """`tokenizer.model` alone (no tokenizer.json): sentencepiece encodes and decodes."""

    def __init__(self, path: Path):
        try:
            import sentencepiece
        except ImportError:
            raise LowbitError(f"{path.parent}: has only tokenizer.model; pip install sentencepiece to read it") from None
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))

    def encode(self, text, add_special_tokens):
        ids = self.sp.encode(text)
        return [self.sp.bos_id(), *ids] if add_special_tokens and self.sp.bos_id() >= 0 else ids

    def decode(self, ids):
        return self.sp.decode(ids)

    def token_to_id(self, token):
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def special_ids(self):
        return [i for i in range(self.sp.get_piece_size()) if self.sp.is_control(i)]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LowbitError(f"{path}: cannot read ({e.__class__.__name__})") from None


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").is_file():
        try:
            backend = TokenizersBackend(model_dir / "tokenizer.json")
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own exception type
            raise LowbitError(f"{model_dir / 'tokenizer.json'}: cannot load it ({str(e).splitlines()[0]})") from None
    elif (model_dir / "tokenizer.model").is_file():
        backend = SentencePieceBackend(model_dir / "tokenizer.model")
    else:
        raise LowbitError(f"{model_dir}: no tokenizer.json or tokenizer.model")
    config = _read_json(model_dir / "tokenizer_config.json")
    if (model_dir / "chat_template.jinja").is_file():
        config["chat_template"] = (model_dir / "chat_template.jinja").read_text()
    if isinstance(config.get("chat_template"), list):  # named templates: use the default one
        named = {t.get("name"): t.get("template") for t in config["chat_template"] if isinstance(t, dict)}
        config["chat_template"] = named.get("default")
    eos = _read_json(model_dir / "generation_config.json").get("eos_token_id")
    generation_eos = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    return Tokenizer(backend, config, generation_eos)
