"""The prepare step and the shard format: round trip, dtype, determinism, metadata checks."""

import filecmp
import json
import os

import numpy as np
import pytest

from src.dataset import DataError, TokenizerConfig, build_tokenizer
from src.dataset.pretrain import main, prepare
from src.dataset.shards import open_shards, read_meta
from src.dataset.sources import is_validation

from .helpers import data_cfg, texts, word_level_tokenizer_json, write_jsonl


def shards_cfg(out, src, **kw):
    return data_cfg(type="shards", path=str(out), source={"type": "local", "path": str(src)}, **kw)


@pytest.fixture
def corpus(tmp_path):
    docs = texts(300)
    return docs, write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in docs])


def read_all(directory, split, tok):
    return [(np.array(s.tokens), np.array(s.doc_starts)) for s in open_shards(str(directory), split, tok)]


def test_round_trip_equals_direct_tokenization(tmp_path, corpus):
    docs, src = corpus
    out = tmp_path / "shards"
    summary = prepare(shards_cfg(out, src, val_fraction=0.1, shard_size=2000), str(out), progress=False)
    tok = build_tokenizer(TokenizerConfig())
    for split in ("train", "val"):
        want = [d for i, d in enumerate(docs) if is_validation(i, 0.1) == (split == "val")]
        got = []
        for tokens, starts in read_all(out, split, tok):
            assert len(tokens) <= 2000 or len(starts) == 1  # rollover at document boundaries
            ends = list(starts[1:]) + [len(tokens)]
            for a, b in zip(starts, ends):
                assert tokens[b - 1] == tok.eos_id
                got.append(tok.decode(tokens[a : b - 1].tolist()))
        assert got == want
    meta = read_meta(str(out))
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["fingerprint"] == tok.fingerprint
    assert len(meta["splits"]["train"]["shards"]) > 1
    assert summary["train_tokens"] + summary["val_tokens"] == summary["tokens"] == sum(
        len(d.encode()) + 1 for d in docs)


def test_uint32_for_large_vocabularies(tmp_path):
    tj = word_level_tokenizer_json(tmp_path / "big.json", 70000)
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": "alpha beta w69999"}, {"text": "gamma"}])
    out = tmp_path / "s"
    prepare(shards_cfg(out, src, tokenizer={"type": "huggingface", "path": tj}), str(out), progress=False)
    tok = build_tokenizer(TokenizerConfig(type="huggingface", path=tj))
    assert read_meta(str(out))["dtype"] == "uint32"
    assert os.path.getsize(out / "train_00000.bin") == 6 * 4
    ((tokens, starts),) = read_all(out, "train", tok)
    assert tokens.dtype == np.uint32 and tokens.tolist() == [2, 3, 69999, 1, 4, 1] and starts.tolist() == [0, 4]


def test_rerun_is_identical_for_any_worker_count(tmp_path, corpus):
    _, src = corpus
    outs = []
    for name, workers in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path / name
        prepare(shards_cfg(out, src, val_fraction=0.2, shard_size=3000), str(out), workers=workers, progress=False)
        outs.append(out)
    for other in outs[1:]:
        cmp = filecmp.dircmp(outs[0], other)
        assert sorted(os.listdir(outs[0])) == sorted(os.listdir(other))
        _, mismatch, errors = filecmp.cmpfiles(outs[0], other, os.listdir(outs[0]), shallow=False)
        assert not mismatch and not errors, (cmp.left_only, cmp.right_only, mismatch)


def test_existing_output_needs_overwrite(tmp_path, corpus):
    _, src = corpus
    out = tmp_path / "s"
    prepare(shards_cfg(out, src), str(out), progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare(shards_cfg(out, src), str(out), progress=False)
    prepare(shards_cfg(out, src), str(out), overwrite=True, progress=False)
    assert not os.path.exists(str(out) + ".tmp")


def test_metadata_mismatches_fail_clearly(tmp_path, corpus):
    _, src = corpus
    out = tmp_path / "s"
    prepare(shards_cfg(out, src, val_fraction=0.1), str(out), progress=False)
    byte = build_tokenizer(TokenizerConfig())
    other_vocab = build_tokenizer(TokenizerConfig(type="huggingface", path=word_level_tokenizer_json(tmp_path / "t.json", 300)))
    with pytest.raises(DataError, match="vocabulary of 259.*run uses 300"):
        open_shards(str(out), "train", other_vocab)
    same_size = build_tokenizer(TokenizerConfig(type="huggingface", path=word_level_tokenizer_json(tmp_path / "u.json", 259)))
    with pytest.raises(DataError, match="tokenized with tokenizer 'byte'.*fingerprint"):
        open_shards(str(out), "train", same_size)
    with open(out / "train_00000.bin", "r+b") as f:
        f.truncate(os.path.getsize(out / "train_00000.bin") - 2)
    with pytest.raises(DataError, match="truncated or overwritten"):
        open_shards(str(out), "train", byte)
    os.remove(out / "val_00000.idx")
    with pytest.raises(DataError, match="missing shard file"):
        open_shards(str(out), "val", byte)
    meta = json.loads((out / "meta.json").read_text())
    meta["format_version"] = 99
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="format version 99"):
        open_shards(str(out), "train", byte)
    with pytest.raises(DataError, match="no meta.json.*prepare"):
        open_shards(str(tmp_path), "train", byte)


def test_no_val_split_is_clear(tmp_path, corpus):
    _, src = corpus
    out = tmp_path / "s"
    prepare(shards_cfg(out, src), str(out), progress=False)
    with pytest.raises(DataError, match="no 'val' shards.*val_fraction"):
        open_shards(str(out), "val", build_tokenizer(TokenizerConfig()))


def test_cli_reads_the_data_block(tmp_path, corpus, capsys):
    _, src = corpus
    config = tmp_path / "train.yaml"
    out = tmp_path / "cli_shards"
    config.write_text(f"model_config_path: whatever.yaml\ndata:\n  type: shards\n  path: {out}\n"
                      f"  source: {{type: local, path: {src}}}\n")
    main(["prepare", "--config", str(config), "--no-progress", "data.val_fraction=0.25"])
    meta = read_meta(str(out))
    assert meta["source"]["val_fraction"] == 0.25 and meta["splits"]["val"]["documents"] > 0
    assert "tokens/s" in capsys.readouterr().out


def test_cli_mistakes_are_one_line_errors(tmp_path, corpus, capsys):
    """The prepare command's usual mistakes end with one `error:` line and exit status 2, not a
    traceback: an existing output, a missing config, a key typo, a missing data file."""
    _, src = corpus
    out = tmp_path / "cli_shards"
    config = tmp_path / "train.yaml"
    config.write_text(f"data:\n  type: shards\n  path: {out}\n  source: {{type: local, path: {src}}}\n")
    main(["prepare", "--config", str(config), "--no-progress"])
    capsys.readouterr()
    cases = [
        (["--config", str(config)], "exists; pass --overwrite"),
        (["--config", str(tmp_path / "nope.yaml")], "config file not found"),
        (["--config", str(config), "--overwrite", "data.val_fractio=0.1"], "Did you mean 'val_fraction'"),
        (["--config", str(config), "--overwrite", f"data.source.path={tmp_path / 'nope.jsonl'}"], "does not exist"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["prepare", "--no-progress", *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("python -m src.dataset.pretrain: error: ") and message in err, err
        assert "Traceback" not in err


def test_the_prepare_module_runs_without_a_second_import_warning(tmp_path):
    """`python -m src.dataset.pretrain` is not imported by its package first (runpy would warn)."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "src.dataset.pretrain", "--help"], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "prepare" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr, proc.stderr
