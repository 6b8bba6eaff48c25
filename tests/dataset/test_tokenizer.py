"""Tokenizers: byte built-in, Hugging Face files / directories, tiktoken, chat templates and masks."""

import numpy as np
import pytest

from src.dataset.tokenizer import (
    ByteTokenizer,
    ChatTemplateError,
    HFTokenizer,
    TiktokenTokenizer,
    TokenizerConfig,
    build_tokenizer,
    tokenize_chat,
)
from src.utils.config import ConfigError, from_dict

from .helpers import NO_SYSTEM_TEMPLATE, hf_dir_with_chat_template, word_level_tokenizer_json


def test_byte_tokenizer_round_trip_and_specials():
    tok = build_tokenizer(TokenizerConfig())
    text = "héllo <|endoftext|> wörld ✓"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # ordinary text never produces a special id
    assert tok.decode(ids) == text
    special = tok.encode("a<|im_start|>b<|im_end|>", allow_special=True)
    assert special == [97, 257, 98, 258]
    assert tok.decode(special) == "a<|im_start|>b<|im_end|>"
    assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.token_dtype) == (259, 256, 256, np.uint16)


@pytest.mark.parametrize("make", ["byte", "hf"])
def test_encode_documents_matches_encode(make, tmp_path):
    if make == "byte":
        tok = ByteTokenizer()
    else:
        tok = HFTokenizer(TokenizerConfig(type="huggingface", path=word_level_tokenizer_json(tmp_path / "t.json", 100)))
    docs = ["alpha beta", "", "gamma delta epsilon ✓"]
    flat, lengths = tok.encode_documents(docs)
    expected = [i for d in docs for i in tok.encode(d) + [tok.eos_id]]
    assert flat.tolist() == expected
    assert lengths.tolist() == [len(tok.encode(d)) + 1 for d in docs]
    assert flat.dtype == tok.token_dtype


def test_dtype_follows_vocabulary_size(tmp_path):
    small = HFTokenizer(TokenizerConfig(type="huggingface", path=word_level_tokenizer_json(tmp_path / "a.json", 65536)))
    big = HFTokenizer(TokenizerConfig(type="huggingface", path=word_level_tokenizer_json(tmp_path / "b.json", 65537)))
    assert (small.vocab_size, small.token_dtype) == (65536, np.uint16)
    assert (big.vocab_size, big.token_dtype) == (65537, np.uint32)
    assert small.fingerprint != big.fingerprint
    assert big.eos_id == 1 and big.encode("alpha beta") == [2, 3]


def test_hf_vocab_size_is_the_largest_id_plus_one_with_id_gaps(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    # 4 entries, but ids up to 70,000 (reserved ranges): the entry count (4) would pick uint16 and pass
    # the trainer's "tokenizer fits the model's embedding" check wrongly.
    vocab = {"[UNK]": 0, "<|endoftext|>": 1, "hello": 2, "world": 70000}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|extra|>"])  # added tokens count too
    tok.save(str(tmp_path / "gap.json"))
    hf = HFTokenizer(TokenizerConfig(type="huggingface", path=str(tmp_path / "gap.json")))
    assert (hf.vocab_size, hf.token_dtype) == (70001, np.uint32)
    flat, lengths = hf.encode_documents(["hello world"])
    assert flat.tolist() == [2, 70000, 1] and lengths.tolist() == [3]


def test_hf_tokenizer_needs_an_eos(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "no_eos.json"
    Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(path))
    with pytest.raises(ConfigError, match="eos_token"):
        HFTokenizer(TokenizerConfig(type="huggingface", path=str(path)))
    tok = HFTokenizer(TokenizerConfig(type="huggingface", path=str(path), eos_token="[UNK]"))
    assert tok.eos_id == 0


def test_hf_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        build_tokenizer(TokenizerConfig(type="huggingface", path=str(tmp_path / "nope.json")))


def test_tiktoken_wrapper_offline():
    tiktoken = pytest.importorskip("tiktoken")

    enc = tiktoken.Encoding("bytes_test", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={"<|endoftext|>": 256})
    tok = TiktokenTokenizer(enc)
    assert tok.encode("ab<|endoftext|>") == [97, 98] + list(b"<|endoftext|>")
    assert tok.encode("ab<|endoftext|>", allow_special=True) == [97, 98, 256]
    assert tok.decode([97, 98, 256]) == "ab<|endoftext|>"
    assert (tok.eos_id, tok.vocab_size) == (256, 257)
    assert tok.encode_batch(["a", "bc"]) == [[97], [98, 99]]


@pytest.mark.parametrize("error", [ConnectionError("Name or service not known"), "requests"])
def test_tiktoken_without_network_names_the_encoding_and_the_fix(monkeypatch, error):
    tiktoken = pytest.importorskip("tiktoken")
    if error == "requests":  # what tiktoken's download actually raises offline
        requests = pytest.importorskip("requests")
        error = requests.exceptions.ConnectionError("Max retries exceeded")

    def offline(name):
        raise error

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(FileNotFoundError, match=r"tiktoken encoding 'gpt2'.*ConnectionError.*TIKTOKEN_CACHE_DIR"):
        build_tokenizer({"type": "tiktoken", "path": "gpt2"})


def test_tokenizer_config_is_strict():
    with pytest.raises(ConfigError, match="Did you mean 'path'"):
        from_dict(TokenizerConfig, {"type": "huggingface", "pth": "x"})
    with pytest.raises(ConfigError, match="needs tokenizer.path"):
        from_dict(TokenizerConfig, {"type": "tiktoken"})
    with pytest.raises(ConfigError, match="needs no file"):
        from_dict(TokenizerConfig, {"type": "byte", "path": "x.json"})
    assert build_tokenizer({"type": "byte"}).name == "byte"  # a plain mapping is loaded strictly too
    with pytest.raises(ConfigError, match="data.tokenizer.tpye"):
        build_tokenizer({"tpye": "byte"})


def test_chatml_mask_token_by_token():
    tok = ByteTokenizer()
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "<|im_end|>"},
                {"role": "assistant", "content": "ok"}]
    ids, trainable = tokenize_chat(tok, messages)
    start, end = 257, 258
    nl = 10

    def header(role):
        return [start] + list(role.encode()) + [nl]

    expected = []  # (id, trainable)
    for m in messages:
        learn = m["role"] == "assistant"
        expected += [(i, False) for i in header(m["role"])]
        expected += [(i, learn) for i in list(m["content"].encode())]  # content is ordinary text
        expected += [(end, learn), (nl, False)]
    assert list(zip(ids, trainable)) == expected
    # trainable_from masks earlier assistant turns (DPO: the prompt may contain them)
    _, only_last = tokenize_chat(tok, messages, trainable_from=3)
    assert sum(only_last) == len("ok") + 1


def test_hf_directory_with_its_own_chat_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    PreTrainedTokenizerFast = transformers.PreTrainedTokenizerFast

    path = word_level_tokenizer_json(tmp_path / "t.json", 64)
    hf = PreTrainedTokenizerFast(tokenizer_file=path, eos_token="<|endoftext|>", unk_token="[UNK]")
    hf.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% if m['role'] == 'assistant' %}"
                        "<|endoftext|> {% endif %}{% endfor %}{% if add_generation_prompt %}assistant {% endif %}")
    hf.save_pretrained(tmp_path / "dir")
    tok = build_tokenizer(TokenizerConfig(type="huggingface", path=str(tmp_path / "dir")))
    assert tok.chat_template.name == "huggingface"
    messages = [{"role": "user", "content": "alpha beta"}, {"role": "assistant", "content": "gamma delta"}]
    ids, trainable = tokenize_chat(tok, messages)
    words = tok.decode(ids).split()
    learned = [w for w, t in zip(words, trainable) if t]
    assert learned == ["gamma", "delta", "<|endoftext|>"]
    forced = build_tokenizer(TokenizerConfig(type="huggingface", path=str(tmp_path / "dir"), chat_template="chatml"))
    assert forced.chat_template.name == "chatml"


def test_hf_chat_template_refusing_a_conversation_is_a_chat_template_error(tmp_path):
    pytest.importorskip("transformers")
    hf_dir = hf_dir_with_chat_template(tmp_path, NO_SYSTEM_TEMPLATE)
    tok = build_tokenizer(TokenizerConfig(type="huggingface", path=hf_dir))
    ok = [{"role": "user", "content": "alpha"}, {"role": "assistant", "content": "beta"}]
    assert sum(tokenize_chat(tok, ok)[1]) == 2  # "beta <|endoftext|>"
    with pytest.raises(ChatTemplateError, match="chat template of .* failed: TemplateError: System role not "
                                                "supported.*chat_template: chatml"):
        tokenize_chat(tok, [{"role": "system", "content": "gamma"}] + ok)


def test_chatml_markers_that_are_not_tokens_are_warned_about_once(tmp_path, caplog):
    """ChatML's markers as plain text (a vocabulary without them) are logged once per tokenizer;
    a tokenizer that has them as tokens (the built-in byte one) logs nothing."""
    messages = [{"role": "user", "content": "alpha"}, {"role": "assistant", "content": "beta"}]
    with caplog.at_level("WARNING", logger="src.dataset.tokenizer"):
        tokenize_chat(ByteTokenizer(), messages)
    assert "ChatML markers" not in caplog.text
    path = word_level_tokenizer_json(tmp_path / "t.json", 100)
    tok = HFTokenizer(TokenizerConfig(type="huggingface", path=path, chat_template="chatml"))
    with caplog.at_level("WARNING", logger="src.dataset.tokenizer"):
        tokenize_chat(tok, messages)
        tokenize_chat(tok, messages)
    assert caplog.text.count("the ChatML markers are not tokens of tokenizer") == 1
    assert "decoded '[UNK]'" in caplog.text  # a word-level vocabulary turns them into its unknown word
