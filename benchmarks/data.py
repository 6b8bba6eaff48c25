"""Data-pipeline throughput: the prepare step (tokens/s) and shard reading per rank (tokens/s).

    python benchmarks/data.py                       # ~40M-token synthetic corpus, byte tokenizer
    python benchmarks/data.py --tokenizer-json PATH # also a Hugging Face tokenizer.json
    python benchmarks/data.py --quick               # a small smoke run

Measures, on this machine's CPU cores:
  1. prepare: text -> shards through `src.dataset.pretrain.prepare`, for each worker count;
  2. shard reading: batches of B x T windows for one rank of `--world-size`, straight from the
     batch source (memmap gather + shift) and through the `DataLoader` (background prefetch,
     pinned memory when CUDA is present), with and without document-aware metadata;
  3. streaming: on-the-fly tokenization and packing from an in-memory document stream.
A GPU step of a 1B model consumes well under 1M tokens/s per GPU, so reading must be far above that.
Prints a table, writes benchmarks/results/data_cpu_<N>cores.json (N = CPU cores) and a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.dataset.base import DataConfig  # noqa: E402
from src.dataset.pretrain import StreamingPretrainBatches, prepare, pretrain_batches  # noqa: E402
from src.dataset.tokenizer import build_tokenizer  # noqa: E402
from src.utils.config import from_dict  # noqa: E402

REQUIRED_READ_TOKENS_PER_S = 1_000_000


def default_out(cores: int, quick: bool = False) -> str:
    """benchmarks/results/data_cpu_<N>cores.json: named after the machine, as every benchmark's results
    are (`kernels_<gpu>.json`); this one runs on the CPU cores only. A --quick smoke run gets its own
    name so that it never overwrites the recorded figures."""
    name = f"data_cpu_{cores}cores{'_quick' if quick else ''}.json"
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)


def synthetic_corpus(path: str, target_bytes: int, seed: int = 0) -> tuple[int, int]:
    """Write a jsonl of English-like documents (random words from a fixed list, 50 to 2,000 words)."""
    words = ("the of and to in is that for it as was with be by on not he this are or his from at which but have "
             "an they you were her she there been one all we their has would when if so no more what up out about "
             "into than them can only other new some could time these two may first then do any like my now over "
             "such our man me even most made after also did many before must through back years where much your "
             "way down should because each just those people how too little state good very make world still own "
             "see men work long get here between both life being under never day same another know while last might "
             "us great old year off come since against go came right used take three").split()
    rng = np.random.default_rng(seed)
    vocab = np.array(words)
    docs, written = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            n = int(rng.integers(50, 2000))
            text = " ".join(vocab[rng.integers(0, len(vocab), n)]) + "."
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)
            docs += 1
    return docs, written


def train_bpe(corpus: str, path: str, vocab_size: int = 32000) -> str:
    """A byte-level BPE tokenizer.json trained on (the start of) the corpus: a realistic encode cost offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts(limit=20_000_000):
        read = 0
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                read += len(line)
                yield json.loads(line)["text"]
                if read > limit:
                    return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts(), trainer)
    tok.save(path)
    return path


def bench_prepare(corpus: str, out_root: str, tokenizer: dict, workers: int) -> dict:
    out = os.path.join(out_root, f"shards_{tokenizer['type']}_{workers}")
    cfg = from_dict(DataConfig, {"type": "shards", "path": out, "tokenizer": tokenizer, "val_fraction": 0.001,
                                 "source": {"type": "local", "path": corpus}})
    summary = prepare(cfg, out, workers=workers, overwrite=True, progress=False)
    name = "byte" if tokenizer["type"] == "byte" else "bpe" if tokenizer.get("path", "").endswith("bpe.json") else "hf"
    return {"tokenizer": name, "workers": workers, "tokens": summary["tokens"],
            "seconds": summary["seconds"], "tokens_per_s": summary["tokens_per_second"], "dir": out}


def time_batches(next_batch, n: int, tokens_per_batch: int) -> dict:
    for _ in range(3):  # warm-up: page cache, thread start
        next_batch()
    start = time.perf_counter()
    for _ in range(n):
        next_batch()
    seconds = time.perf_counter() - start
    return {"batches": n, "seconds": seconds, "batches_per_s": n / seconds, "tokens_per_s": n * tokens_per_batch / seconds}


def bench_read(shard_dir: str, tokenizer, *, batch_size: int, seq_len: int, world_size: int, n: int,
               document_aware: bool, through_loader: bool) -> dict:
    cfg = from_dict(DataConfig, {"type": "shards", "path": shard_dir, "document_aware": document_aware, "prefetch": 4})
    source = pretrain_batches(cfg, tokenizer, batch_size=batch_size, seq_len=seq_len, split="train", rank=0,
                              world_size=world_size, seed=0)
    if through_loader:
        import torch  # imported here, not at the top: spawned prepare workers re-import this module

        from src.dataset.loader import DataLoader

        loader = DataLoader(source, pin_memory=torch.cuda.is_available(), prefetch=cfg.prefetch)
        it = iter(loader)
        result = time_batches(lambda: next(it), n, batch_size * seq_len)
        loader.close()
        result["pinned"] = bool(torch.cuda.is_available())
    else:
        result = time_batches(source.next_batch, n, batch_size * seq_len)
    result.update(path="DataLoader (prefetch 4)" if through_loader else "batch source", document_aware=document_aware)
    return result


def bench_streaming(corpus: str, tokenizer, *, batch_size: int, seq_len: int, n: int) -> dict:
    with open(corpus, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    cfg = from_dict(DataConfig, {"type": "streaming", "path": "in-memory"})
    source = StreamingPretrainBatches(cfg.source_config(), tokenizer, batch_size=batch_size, seq_len=seq_len, rank=0,
                                      world_size=1, seed=0, val_documents=0, shuffle_buffer=0, document_aware=False,
                                      opener=lambda epoch: iter(rows))
    result = time_batches(source.next_batch, n, batch_size * seq_len)
    result.update(path="streaming (tokenize + pack)", document_aware=False)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus-mb", type=float, default=40.0, help="synthetic corpus size in MB (~tokens, byte level)")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="prepare worker counts (default 1 and all cores)")
    parser.add_argument("--tokenizer-json", help="measure prepare with this Hugging Face tokenizer.json (default: "
                        "a byte-level BPE trained on the corpus, when `tokenizers` is installed)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--world-size", type=int, default=8, help="ranks the windows are split over (rank 0 is timed)")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="small corpus and few batches (smoke test)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/data_cpu_<N>cores.json, "
                        "named after the machine like every benchmark's results; ..._quick.json with --quick)")
    args = parser.parse_args()
    if args.quick:
        args.corpus_mb, args.batches, args.world_size = 4.0, 20, 1
    cores = os.cpu_count() or 1
    args.out = args.out or default_out(cores, args.quick)
    workers = args.workers or sorted({1, cores})
    tmp = tempfile.mkdtemp(prefix="bench_data_")
    try:
        corpus = os.path.join(tmp, "corpus.jsonl")
        docs, size = synthetic_corpus(corpus, int(args.corpus_mb * 1e6))
        print(f"corpus: {docs:,} documents, {size / 1e6:.1f} MB, {cores} CPU cores", flush=True)
        tokenizers = [{"type": "byte"}]
        tokenizer_json = args.tokenizer_json
        if tokenizer_json is None:
            try:
                tokenizer_json = train_bpe(corpus, os.path.join(tmp, "bpe.json"))
            except ImportError:
                print("`tokenizers` not installed: prepare is measured with the byte tokenizer only")
        if tokenizer_json:
            tokenizers.append({"type": "huggingface", "path": tokenizer_json})
        prep = [bench_prepare(corpus, tmp, tok, w) for tok in tokenizers for w in workers]
        byte_tok = build_tokenizer(from_dict(DataConfig, {"type": "local", "path": "x"}).tokenizer)
        shard_dir = next(p["dir"] for p in prep if p["tokenizer"] == "byte")
        common = dict(batch_size=args.batch_size, seq_len=args.seq_len, world_size=args.world_size, n=args.batches)
        reads = [bench_read(shard_dir, byte_tok, document_aware=d, through_loader=l, **common)
                 for l in (False, True) for d in (False, True)]
        reads.append(bench_streaming(corpus, byte_tok, batch_size=args.batch_size, seq_len=args.seq_len,
                                     n=max(args.batches // 10, 5)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for p in prep:
        p.pop("dir")

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    record = {"machine": {"cpu_cores": cores, "platform": platform.platform(), "python": platform.python_version()},
              "corpus": {"documents": docs, "bytes": size}, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "world_size": args.world_size, "prepare": prep, "read": reads,
              "required_read_tokens_per_s": REQUIRED_READ_TOKENS_PER_S}
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    png = os.path.splitext(args.out)[0] + ".png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
        a.bar([f"{p['tokenizer']}\n{p['workers']} workers" for p in prep], [p["tokens_per_s"] / 1e6 for p in prep])
        a.set_yscale("log")
        a.set_ylabel("M tokens/s (log)")
        a.set_title("prepare (text -> shards)")
        labels = [f"{r['path']}\n{'doc-aware' if r['document_aware'] else 'plain'}" for r in reads]
        b.barh(labels, [r["tokens_per_s"] / 1e6 for r in reads])
        b.axvline(REQUIRED_READ_TOKENS_PER_S / 1e6, color="red", linestyle="--", label="1M tokens/s")
        b.set_xscale("log")
        b.set_xlabel("M tokens/s per rank (log)")
        b.set_title(f"reading {args.batch_size} x {args.seq_len} batches")
        b.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        print(f"wrote {args.out} and {png}")
    except ImportError:
        print(f"wrote {args.out} (matplotlib not installed: no PNG)")

    print(f"\nprepare (text -> shards), {cores} cores")
    print(f"{'tokenizer':<12}{'workers':>8}{'tokens':>14}{'seconds':>10}{'tokens/s':>14}")
    for p in prep:
        print(f"{p['tokenizer']:<12}{p['workers']:>8}{p['tokens']:>14,}{p['seconds']:>10.2f}{p['tokens_per_s']:>14,.0f}")
    print(f"\nreading, batches of {args.batch_size} x {args.seq_len} for rank 0 of {args.world_size} "
          f"(need >= {REQUIRED_READ_TOKENS_PER_S:,} tokens/s per rank)")
    print(f"{'path':<30}{'doc-aware':>10}{'batches/s':>12}{'tokens/s':>16}{'ok':>5}")
    for r in reads:
        ok = "yes" if r["tokens_per_s"] >= REQUIRED_READ_TOKENS_PER_S else "NO"
        print(f"{r['path']:<30}{str(r['document_aware']):>10}{r['batches_per_s']:>12,.1f}{r['tokens_per_s']:>16,.0f}{ok:>5}")


if __name__ == "__main__":
    main()
