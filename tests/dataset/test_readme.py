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


def test_data_benchmark_writes_the_file_the_readmes_name():
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("bench_data", "benchmarks/data.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # defines functions only; main() is not run
    out = bench.default_out(2)
    assert out == os.path.abspath("benchmarks/results/data_cpu_2cores.json")
    assert bench.default_out(2, quick=True).endswith("data_cpu_2cores_quick.json")  # never the recorded figures
    for readme in ("src/dataset/README.md", "benchmarks/README.md"):
        assert os.path.basename(out) in open(readme, encoding="utf-8").read()
