"""Every `data:` block shown in src/dataset/README.md is a valid DataConfig."""

import re

import yaml

from src.dataset.base import DataConfig
from src.utils.config import from_dict


def test_readme_data_blocks_parse():
    text = open("src/dataset/README.md", encoding="utf-8").read()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)]
    blocks = [b["data"] for b in blocks if isinstance(b, dict) and "data" in b]
    assert len(blocks) >= 5
    types = {from_dict(DataConfig, b, where="src/dataset/README.md", prefix="data.").type for b in blocks}
    assert types == {"local", "streaming", "shards"}
