"""The data block is strict; bad input files give errors naming the file and line, or counted skips."""

import json
import logging

import pytest

from src.dataset import DataError, build_dataloader, build_tokenizer
from src.dataset.base import DataConfig
from src.dataset.sources import SkipLog, iter_local_rows, resolve_local_files
from src.utils.config import ConfigError

from .helpers import data_cfg, write_jsonl

TOK = build_tokenizer(data_cfg(type="local", path="x").tokenizer)


def loader(cfg, task="pretrain", **kw):
    args = dict(batch_size=2, seq_len=8, split="train", rank=0, world_size=1, seed=0, pin_memory=False)
    args.update(kw)
    return build_dataloader(task, cfg, TOK, **args)


def test_unknown_key_names_the_closest():
    with pytest.raises(ConfigError, match="Did you mean 'val_fraction'"):
        data_cfg(type="local", path="x", val_fractoin=0.1)
    with pytest.raises(ConfigError, match="Did you mean 'local'"):
        data_cfg(type="locall", path="x")


@pytest.mark.parametrize("block, message", [
    (dict(type="local", path="x", subset="en"), "streaming only"),
    (dict(type="streaming", path="x", val_fraction=0.1), "val_documents"),
    (dict(type="local", path="x", val_documents=5), "val_fraction"),
    (dict(type="local", path="x", val_fraction=1.0), r"\[0, 1\)"),
    (dict(type="shards", path="x", subset="en"), "data.source"),
    (dict(type="local", path="x", source={"type": "local", "path": "y"}), "prepare step"),
    (dict(type="local", path="x", shuffle_buffer=10), "streaming only"),
    (dict(type="local", path=""), "empty"),
])
def test_cross_field_checks(block, message):
    with pytest.raises(ConfigError, match=message):
        data_cfg(**block)


def test_task_checks_in_build_dataloader(tmp_path):
    with pytest.raises(ConfigError, match="shards holds pretraining"):
        loader(data_cfg(type="shards", path="x"), task="sft")
    with pytest.raises(ConfigError, match="packing applies to sft"):
        loader(data_cfg(type="local", path="x", packing=True))
    with pytest.raises(ConfigError, match="needs data.packing"):
        loader(data_cfg(type="local", path="x", document_aware=True), task="sft")
    with pytest.raises(ConfigError, match="unknown task"):
        loader(data_cfg(type="local", path="x"), task="ppo")


@pytest.mark.parametrize("task, block, message", [
    ("pretrain", dict(format="messages"), "data.format applies to sft only"),
    ("dpo", dict(format="alpaca"), "data.format applies to sft only"),
    ("pretrain", dict(overlong="skip"), "data.overlong applies to sft and dpo"),
    ("sft", dict(type="streaming", shuffle_buffer=100), "data.shuffle_buffer applies to streaming pretraining"),
    ("dpo", dict(num_workers=4), "data.num_workers applies to the prepare step of pretraining"),
    ("sft", dict(shard_size=1000), "data.shard_size applies to the prepare step of pretraining"),
])
def test_fields_of_other_tasks_are_refused(task, block, message):
    cfg = data_cfg(**{"type": "local", "path": "x", **block})
    with pytest.raises(ConfigError, match=message):
        loader(cfg, task=task)


def test_fields_of_the_task_are_accepted(tmp_path):
    sft = write_jsonl(tmp_path / "s.jsonl", [{"instruction": "q", "output": "a"}] * 2)
    loader(data_cfg(type="local", path=sft, format="alpaca", overlong="skip", prefetch=0), task="sft", seq_len=256)
    dpo = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 2)
    loader(data_cfg(type="local", path=dpo, overlong="skip", prefetch=0), task="dpo", seq_len=32)
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "alpha " * 10}])
    loader(data_cfg(type="local", path=text, num_workers=4, shard_size=1000, prefetch=0))  # shards' prepare settings


def test_unreadable_files_name_the_file_and_the_fix(tmp_path):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8 \(byte 0xe9\); re-save the file as UTF-8"):
        list(iter_local_rows(str(latin1)))
    latin1_json = tmp_path / "latin1.json"
    latin1_json.write_bytes(b'[\n{"text": "fine"},\n{"text": "caf\xe9"}\n]')
    with pytest.raises(DataError, match=r"latin1\.json:3: not valid UTF-8"):
        list(iter_local_rows(str(latin1_json)))
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1garbage")
    with pytest.raises(DataError, match=r"corrupt\.parquet: cannot read it as parquet .*re-write the file"):
        loader(data_cfg(type="local", path=str(corrupt)))
    # A UTF-8 byte-order mark (as some editors write) is accepted.
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"text": "one"}\n{"text": "two"}\n')
    bom_json = tmp_path / "bom.json"
    bom_json.write_bytes(b'\xef\xbb\xbf[{"text": "three"}]')
    assert [r["text"] for _, r in iter_local_rows(str(tmp_path / "bom.*"))] == ["three", "one", "two"]


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "broken"\n{"text": "never read"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        loader(data_cfg(type="local", path=str(path)))
    other = tmp_path / "bad.json"
    other.write_text('[\n {"text": "a"},\n {"text": }\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: malformed JSON"):
        list(iter_local_rows(str(other)))
    not_objects = tmp_path / "list.jsonl"
    not_objects.write_text('["a", "b"]\n')
    with pytest.raises(DataError, match=r"list\.jsonl:1: expected a JSON object"):
        list(iter_local_rows(str(not_objects)))


def test_missing_fields_are_counted_skips(tmp_path, caplog):
    rows = [{"text": "alpha " * 20}, {"body": "no text here"}, {"text": 5}, {"text": "  "}, {"text": "beta " * 20}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(loader(data_cfg(type="local", path=path))))
    assert batch["input_ids"].shape == (2, 8)
    text = caplog.text
    assert "no 'text' field" in text and "a.jsonl:2" in text and "not a string" in text and "empty 'text'" in text
    assert "used 2 of 5 rows" in text


def test_nothing_usable_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"content": "x"}, {"content": "y"}])
    with pytest.raises(DataError, match="none of the 2 rows is usable.*rename with data.columns"):
        loader(data_cfg(type="local", path=path))
    # ... and data.columns is the fix
    batch = next(iter(loader(data_cfg(type="local", path=path, columns={"content": "text"}), batch_size=1, seq_len=2)))
    assert batch["input_ids"].shape == (1, 2)


def test_empty_files(tmp_path, caplog):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="every file is empty"):
        loader(data_cfg(type="local", path=str(tmp_path / "empty.jsonl")))
    write_jsonl(tmp_path / "full.jsonl", [{"text": "alpha " * 10}])
    with caplog.at_level(logging.WARNING):
        files = resolve_local_files(str(tmp_path))
        rows = list(iter_local_rows(str(tmp_path)))
    assert [f.rsplit("/", 1)[1] for f in files] == ["empty.jsonl", "full.jsonl"]
    assert len(rows) == 1 and "skipping empty file" in caplog.text


def test_paths_directories_globs_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "d" / "a.jsonl", [{"text": "one"}])
    (tmp_path / "d" / "b.json").write_text(json.dumps([{"text": "two"}, {"text": "three"}]))
    pq.write_table(pa.table({"text": ["four", "five"]}), tmp_path / "d" / "c.parquet")
    (tmp_path / "d" / "notes.txt").write_text("ignored in a directory")
    got = [r["text"] for _, r in iter_local_rows(str(tmp_path / "d"))]
    assert got == ["one", "two", "three", "four", "five"]
    assert [r["text"] for _, r in iter_local_rows(str(tmp_path / "d" / "*.json*"))] == ["one", "two", "three"]
    with pytest.raises(DataError, match="does not exist"):
        resolve_local_files(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="no .jsonl/.json/.parquet files"):
        resolve_local_files(str(tmp_path / "d" / "*.csv"))
    with pytest.raises(DataError, match="cannot read .*notes.txt"):
        resolve_local_files(str(tmp_path / "d" / "*.txt"))


def test_skiplog_summary():
    skips = SkipLog("x")
    skips.skip("bad", "f:1")
    skips.skip("bad", "f:2")
    skips.note("truncated")
    assert skips.summary(10) == "x: used 8 of 10 rows (2 bad; 1 truncated)"


def test_source_config_of_shards():
    cfg = data_cfg(type="shards", path="out", source={"type": "streaming", "path": "some/dataset", "subset": "en"})
    assert cfg.source_config().subset == "en" and cfg.source_config().source_split == "train"
    with pytest.raises(ConfigError, match="nothing to prepare"):
        data_cfg(type="shards", path="out").source_config()
    assert isinstance(cfg, DataConfig)
