"""Memory at pretraining scale (issue 12): per-rank peak RSS of real `python -m trainer` runs, side by side.

    .venv/bin/python bench/scale.py --work DIR [--parts corpus model] [--tokens 1e8 1e9] [--shards 1 2 4]

corpus: a synthetic Megatron .bin/.idx corpus per --tokens (uint16 tokens below the bundled tokenizer's
    vocabulary, documents of ~--doc-len tokens: ~1e6 documents for 1e9 tokens), written once under --work,
    trains 3 steps of the tiny default model on --corpus-ranks ranks. Per size: each rank's peak RSS, the
    trainer's `ready in` start-up time and the whole run's wall time; the two sizes should be nearly equal.
    Goals (1e9 tokens, 2 ranks): <= 1.5 GiB per rank, <= 120 s for the whole run.
model: a ~145M-parameter model (hidden 768, 12 layers, ffn 4096, the bundled tokenizer's 2048 vocabulary)
    trains 3 steps with the HF export on, at FSDP over each --shards count. Against the ideal: 16 bytes per
    parameter (fp32 weights, gradients, two Adam moments) / shards + a fixed overhead, the overhead taken
    from the 1-process run (its peak minus 16 bytes/parameter: interpreter, libraries, activations). Goal:
    the 4-rank peak <= 0.40 x the 1-process peak.

Each rank records its own peak (getrusage ru_maxrss, exact) when it exits; a poller sums the RSS of the
whole process tree and kills it past --limit-gib, so a run that grows too far fails instead of taking the
machine down.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "trainer" / "assets" / "tokenizer"
VOCAB = 2048  # the bundled tokenizer's
MODEL_150M = ["model.hidden_size=768", "model.ffn_hidden_size=4096", "model.num_layers=12",
              "model.num_attention_heads=12", "model.num_query_groups=12", "model.init_std=0.02"]
RUN = ["trainer.max_steps=3", "trainer.eval_every=0", "logging.wandb=false", "trainer.log_every=1",
       "trainer.checkpoint.every_steps=0"]
GIB = 2**30

# ------------------------------------------------------------------------------------------ corpus


def write_corpus(work: Path, tokens: int, doc_len: int, seed: int = 0) -> Path:
    """A Megatron indexed corpus (prefix.bin / prefix.idx, uint16) of `tokens` tokens; kept once written."""
    prefix = work / f"synthetic_{tokens:.0e}_{doc_len}".replace("+", "")
    done = prefix.with_suffix(".done")
    if done.exists():
        return prefix
    rng = np.random.default_rng(seed)
    n_docs = max(1, tokens // doc_len)
    lengths = rng.integers(doc_len // 2, doc_len * 3 // 2 + 1, n_docs).astype(np.int64)
    lengths = np.maximum(1, lengths * tokens // lengths.sum())
    lengths[-1] += tokens - lengths.sum()  # exactly `tokens` in all (the scaled sum is at most that)
    work.mkdir(parents=True, exist_ok=True)
    chunk = 1 << 24
    with open(prefix.with_suffix(".bin"), "wb") as f:
        for start in range(0, tokens, chunk):
            f.write(rng.integers(0, VOCAB, min(chunk, tokens - start), dtype=np.uint16).tobytes())
            print(f"\rwriting {prefix.name}.bin: {min(start + chunk, tokens) / tokens:.0%}", end="", flush=True)
    print()
    _write_idx(prefix.with_suffix(".idx"), lengths)
    done.touch()
    return prefix


def _write_idx(path: Path, lengths: np.ndarray) -> None:
    """Megatron's .idx (megatron/core/datasets/indexed_dataset.py _IndexWriter): header, version 1, dtype code
    (8 = uint16), sequence and document counts, int32 lengths, int64 byte pointers, int64 document indices."""
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1] * 2)]).astype(np.int64)
    documents = np.arange(len(lengths) + 1, dtype=np.int64)  # one sequence per document
    with open(path, "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(np.array([1], "<u8").tobytes() + np.array([8], "u1").tobytes())
        f.write(np.array([len(lengths), len(documents)], "<u8").tobytes())
        f.write(lengths.astype("<i4").tobytes() + pointers.astype("<i8").tobytes() + documents.tobytes())


# -------------------------------------------------------------------------------------------- runs


def _tree_rss(root_pid: int) -> int:
    """Summed RSS of a process and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)
        rss[pid] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def run_trainer(nproc: int, overrides: list[str], out: Path, limit: int, timeout: float) -> dict:
    """One training run; returns each rank's peak RSS, `ready in` seconds and wall seconds, or an error."""
    peaks = out / "peaks"
    peaks.mkdir(parents=True, exist_ok=True)
    args = [__file__, "--rank-child", str(peaks), "--", f"trainer.output_dir={out / 'run'}", *overrides]
    cmd = ([sys.executable, *args] if nproc == 1 else
           [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(nproc), *args])
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "XDG_CACHE_HOME": str(out / "xdg")}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, killed as one
    killed: list[str] = []

    def guard() -> None:
        while proc.poll() is None:
            used = _tree_rss(proc.pid)
            why = (f"over --limit-gib ({used / GIB:.1f} GiB)" if used > limit else
                   f"over {timeout:.0f} s" if time.perf_counter() - started > timeout else None)
            if why:
                killed.append(why)
                os.killpg(proc.pid, signal.SIGKILL)
                return
            time.sleep(0.2)

    threading.Thread(target=guard, daemon=True).start()
    output = proc.communicate()[0]
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        return {"error": killed[0] if killed else f"exit {proc.returncode}: " + output.strip()[-600:]}
    ready = re.search(r"ready in ([\d.]+) s", output)
    ranks = sorted(peaks.glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    return {"peaks": [json.loads(p.read_text())["peak"] for p in ranks], "wall": wall,
            "ready": float(ready[1]) if ready else float("nan")}


def rank_child(peaks: Path, overrides: list[str]) -> None:
    """Inside one rank: the trainer's own entry point; the rank's peak RSS is written however it exits."""
    rank = os.environ.get("RANK", "0")
    sys.argv = ["trainer", *overrides]
    try:
        from trainer.__main__ import main

        main()
    finally:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        (peaks / f"rank{rank}.json").write_text(json.dumps({"peak": peak}))


# ----------------------------------------------------------------------------------------- reports


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def bench_corpus(args, extra: list[str]) -> None:
    rows = []
    for tokens in args.tokens:
        prefix = write_corpus(args.work / "corpora", int(tokens), args.doc_len)
        data = ["data=megatron_indexed", f"data.path={prefix}", f"data.tokenizer={TOKENIZER}",
                f"data.seq_len={args.seq_len}", f"data.cache_dir={args.work / 'cache'}", "trainer.export_hf=false"]
        par = ["parallel=fsdp"] if args.corpus_ranks > 1 else []
        r = run_trainer(args.corpus_ranks, [*data, *par, *RUN, f"trainer.global_batch_size={args.batch}",
                                            "parallel.microbatch_size=1", *extra],
                        args.work / f"corpus_{int(tokens)}", args.limit, args.timeout)
        rows.append((int(tokens), r))
    print(f"\ncorpus: tiny model, 3 steps on {args.corpus_ranks} rank(s), seq_len {args.seq_len}")
    print("| tokens | documents | peak RSS GiB per rank | max | ready s | whole run s |")
    print("|---|---|---|---|---|---|")
    for tokens, r in rows:
        docs = tokens // args.doc_len
        if "error" in r:
            print(f"| {tokens:.0e} | {docs:,} | failed: {r['error']} | | | |")
        else:
            print(f"| {tokens:.0e} | {docs:,} | {' / '.join(_gib(p) for p in r['peaks'])} | {_gib(max(r['peaks']))} "
                  f"| {r['ready']:.1f} | {r['wall']:.1f} |")
    ok = [r for _, r in rows if "error" not in r]
    if len(ok) == len(rows) >= 2:
        small, big = rows[0][1], rows[-1][1]
        print(f"ratio largest / smallest corpus: peak RSS {max(big['peaks']) / max(small['peaks']):.2f}, "
              f"ready {big['ready'] / small['ready']:.2f}, whole run {big['wall'] / small['wall']:.2f} (goal ~1)")
    if rows and "error" not in rows[-1][1]:
        big = rows[-1][1]
        print(f"goal ({rows[-1][0]:.0e} tokens): peak <= 1.5 GiB/rank: {_gib(max(big['peaks']))} GiB -> "
              f"{'met' if max(big['peaks']) <= 1.5 * GIB else 'missed'}; whole run <= 120 s: {big['wall']:.0f} s -> "
              f"{'met' if big['wall'] <= 120 else 'missed'}")


def param_count(model: list[str]) -> int:
    """Parameters of the model these overrides give (the trainer's own count)."""
    from hydra import compose, initialize_config_module

    from trainer.config_io import to_config
    from trainer.loop import cfg_param_count

    with initialize_config_module(config_module="conf", version_base="1.3"):
        return cfg_param_count(to_config(compose("config", overrides=model)))


def bench_model(args, extra: list[str]) -> None:
    model = [*MODEL_150M, *args.model_overrides]
    n = param_count(model)
    results = {}
    for shards in args.shards:
        par = ["parallel=fsdp"] if shards > 1 else []
        results[shards] = run_trainer(shards, [*model, *par, *RUN, f"data.seq_len={args.seq_len}",
                                               f"trainer.global_batch_size={args.batch}", "parallel.microbatch_size=1",
                                               "trainer.export_hf=true", *extra],
                                      args.work / f"model_fsdp{shards}", args.limit, args.timeout)
    one = results.get(1)
    overhead = max(one["peaks"]) - 16 * n if one and "error" not in one else None
    print(f"\nmodel: {n / 1e6:.1f}M parameters, 3 steps + HF export, seq_len {args.seq_len}, "
          f"global batch {args.batch}; ideal = 16 B x {n / 1e6:.1f}M / shards + fixed "
          + (f"{_gib(overhead)} GiB (1-process peak - 16 B/param)" if overhead is not None else "(needs --shards 1)"))
    print("| FSDP shards | peak RSS GiB per rank | max | ideal | max / ideal | vs 1 process | whole run s |")
    print("|---|---|---|---|---|---|---|")
    for shards, r in results.items():
        if "error" in r:
            print(f"| {shards} | failed: {r['error']} | | | | | |")
            continue
        peak = max(r["peaks"])
        ideal = 16 * n / shards + overhead if overhead is not None else None
        cells = [_gib(ideal), f"{peak / ideal:.2f}", f"{peak / max(one['peaks']):.2f}"] if ideal else ["n/a"] * 3
        print(f"| {shards} | {' / '.join(_gib(p) for p in r['peaks'])} | {_gib(peak)} | {' | '.join(cells)} "
              f"| {r['wall']:.1f} |")
    top = max(results)
    if overhead is not None and top > 1 and "error" not in results[top]:
        ratio = max(results[top]["peaks"]) / max(one["peaks"])
        print(f"ratio {top}-rank / 1-process peak RSS: {ratio:.2f} (goal <= 0.40) -> "
              f"{'met' if ratio <= 0.40 else 'missed'}")


def main() -> None:
    if "--rank-child" in sys.argv:
        i = sys.argv.index("--rank-child")
        rank_child(Path(sys.argv[i + 1]), sys.argv[sys.argv.index("--") + 1:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="corpora, token caches and run outputs")
    parser.add_argument("--parts", nargs="+", default=["corpus", "model"], choices=["corpus", "model"])
    parser.add_argument("--tokens", nargs="+", type=float, default=[1e8, 1e9])
    parser.add_argument("--doc-len", type=int, default=1000, help="mean document length of the corpora")
    parser.add_argument("--corpus-ranks", type=int, default=2)
    parser.add_argument("--shards", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="trainer.global_batch_size")
    parser.add_argument("--model-overrides", nargs="*", default=[],
                        help="replace the ~150M shape, e.g. model.num_layers=2 for a smoke run")
    parser.add_argument("--limit-gib", type=float, default=16.0, help="RSS cap of a run's whole process tree")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    args, extra = parser.parse_known_args()
    args.limit = int(args.limit_gib * GIB)
    args.shards = sorted(set(args.shards))
    if "corpus" in args.parts:
        bench_corpus(args, extra)
    if "model" in args.parts:
        bench_model(args, extra)


if __name__ == "__main__":
    main()
