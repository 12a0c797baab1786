"""HF -> Megatron -> HF on a synthetic bf16 Llama, in both Megatron formats (torch_dist, the layout-free default,
and legacy torch at TP2 x PP2), against `cp -r` of the same bytes, in one run.

    .venv/bin/python bench/convert.py                 # ~1B parameters (about 2 GB of bf16)
    .venv/bin/python bench/convert.py --params 50e6   # a quick run
    .venv/bin/python bench/convert.py --tp 2 --pp 2 --shard-mb 500 --dir /scratch

The checkpoint is made on the fly (random bf16 tensors, sharded safetensors with an index) in a temporary
directory. Each conversion runs as its own `python -m checkpoint_convert` process, so its wall time includes
interpreter start-up and imports (measured separately and printed), and its peak RSS (wait4, forked by a
small helper process) is that process's alone. Prints wall time as a ratio to `cp -r` of the HF directory;
peak RSS as a ratio to the checkpoint size, in full and its anonymous part (without the pages of
memory-mapped input files, which the kernel can drop); and checks that the round trip is bitwise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from checkpoint_convert.hf import hf_config_dict  # noqa: E402
from trainer.config import ModelConfig  # noqa: E402

VOCAB = 32000


def llama_shape(params: float, pp: int) -> ModelConfig:
    """A Llama-shaped config of about `params` parameters (untied, GQA 4:1, head dim 64, SwiGLU 8/3 h)."""
    hidden = 2048 if params >= 5e8 else 1024 if params >= 1e8 else 512
    heads = hidden // 64
    groups = max(1, heads // 4)
    ffn = -(-(8 * hidden // 3) // 256) * 256
    per_layer = hidden * (heads + 2 * groups) * 64 + heads * 64 * hidden + 3 * hidden * ffn + 2 * hidden
    layers = max(pp, round((params - 2 * VOCAB * hidden) / per_layer / pp) * pp)
    return ModelConfig(name="bench-llama", family="llama", vocab_size=VOCAB, hidden_size=hidden, ffn_hidden_size=ffn,
                       num_layers=layers, num_attention_heads=heads, num_query_groups=groups,
                       max_position_embeddings=4096, rotary_base=500000.0)


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, d = cfg.hidden_size, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (cfg.num_attention_heads * d, h),
            p + "self_attn.k_proj.weight": (cfg.num_query_groups * d, h),
            p + "self_attn.v_proj.weight": (cfg.num_query_groups * d, h),
            p + "self_attn.o_proj.weight": (h, cfg.num_attention_heads * d),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (cfg.ffn_hidden_size, h),
            p + "mlp.up_proj.weight": (cfg.ffn_hidden_size, h),
            p + "mlp.down_proj.weight": (h, cfg.ffn_hidden_size),
        })
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (cfg.vocab_size, h)})
    return shapes


def make_checkpoint(cfg: ModelConfig, out: Path, shard_bytes: int) -> int:
    """Random bf16 tensors written shard by shard (never the whole model in memory); returns the bytes."""
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    shards: list[list[tuple[str, tuple]]] = [[]]
    size = total = 0
    for name, shape in hf_shapes(cfg).items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
        total += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in shard}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps({**hf_config_dict(cfg), "dtype": "bfloat16"}, indent=2))
    return total


# Runs argv[1:] and prints {"wall", "maxrss", "anon", "code"} as its last line. A fresh interpreter without
# torch forks the command: a forked child's peak RSS counts the parent's pages until exec, so forking straight
# from this (multi-GB) script would report its memory, not the converter's. maxrss (wait4) includes pages of
# memory-mapped files the converter touched (reclaimable); "anon" samples /proc/<pid>/status RssAnon every
# 10 ms: memory the converter itself allocated.
_MEASURE = """
import json, os, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:])
anon = 0
while proc.poll() is None:
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            anon = max([anon] + [int(l.split()[1]) for l in f if l.startswith("RssAnon:")])
    except (OSError, ValueError):
        pass
    time.sleep(0.01)
print(json.dumps({"wall": time.perf_counter() - t0, "anon": anon, "code": proc.returncode,
                  "maxrss": __import__("resource").getrusage(__import__("resource").RUSAGE_CHILDREN).ru_maxrss}))
"""


def timed(cmd: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS, peak anonymous RSS in bytes; 0 where /proc is missing) of one child alone."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, timeout=3600)
    result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {"code": proc.returncode}
    if result["code"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({result['code']}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    kib = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    return result["wall"], result["maxrss"] * kib, result["anon"] * 1024


def tensors_of(d: Path) -> dict[str, Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        return {n: d / f for n, f in json.loads(index.read_text())["weight_map"].items()}
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        return dict.fromkeys(f.keys(), d / "model.safetensors")


def bitwise_equal(a: Path, b: Path) -> tuple[bool, str]:
    ta, tb = tensors_of(a), tensors_of(b)
    if ta.keys() != tb.keys():
        return False, f"tensor names differ: {sorted(ta.keys() ^ tb.keys())[:5]}"
    for name in ta:  # one tensor at a time, memory-mapped
        with safe_open(str(ta[name]), framework="pt") as fa, safe_open(str(tb[name]), framework="pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.int16), y.view(torch.int16)):
                return False, f"{name} differs"
    return True, f"{len(ta)} tensors bitwise equal"


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=1e9, help="approximate parameter count (default 1e9)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--shard-mb", type=int, default=1000, help="HF shard size of the synthetic checkpoint")
    parser.add_argument("--dir", type=Path, default=None, help="where to make the temporary directory")
    args = parser.parse_args()
    cfg = llama_shape(args.params, args.pp)
    py = [sys.executable, "-m", "checkpoint_convert"]
    with tempfile.TemporaryDirectory(prefix="meshtron-bench-convert-", dir=args.dir) as tmp:
        tmp = Path(tmp)
        hf = tmp / "hf"
        t0 = time.perf_counter()
        size = make_checkpoint(cfg, hf, args.shard_mb * 2**20)
        n_params = size // 2
        print(f"synthetic Llama: {n_params / 1e9:.3f}B parameters, {cfg.num_layers} layers, hidden "
              f"{cfg.hidden_size}, ffn {cfg.ffn_hidden_size}, {cfg.num_attention_heads} heads / "
              f"{cfg.num_query_groups} groups, vocab {cfg.vocab_size}; {gb(size)} bf16 "
              f"(made in {time.perf_counter() - t0:.1f}s); {os.cpu_count()} CPUs", flush=True)

        cp_wall, _, _ = timed(["cp", "-r", str(hf), str(tmp / "hf_copy")])
        shutil.rmtree(tmp / "hf_copy")
        start_wall, start_rss, start_anon = timed([sys.executable, "-c", "import checkpoint_convert.cli, "
                                       "checkpoint_convert.megatron, checkpoint_convert.megatron_dist_read, checkpoint_convert.hf"])
        print(f"{'':<30} {'wall':>8} {'vs cp -r':>9} {'(- startup)':>11} {'peak RSS':>10} {'RSS/ckpt':>9} "
              f"{'anon RSS':>10} {'anon/ckpt':>9}")
        print(f"{'cp -r':<30} {cp_wall:>7.2f}s {1.0:>9.2f}")
        print(f"{'python start-up + imports':<30} {start_wall:>7.2f}s {start_wall / cp_wall:>9.2f} {'':>11} "
              f"{gb(start_rss):>10} {start_rss / size:>9.3f} {gb(start_anon):>10} {start_anon / size:>9.3f}",
              flush=True)
        ok = True
        for fmt in ("torch_dist", "torch"):
            meg, back = tmp / f"megatron_{fmt}", tmp / f"back_{fmt}"
            runs = [
                (f"hf -> {fmt} tp{args.tp} pp{args.pp}",
                 [*py, "hf-to-megatron", "--hf", str(hf), "--out", str(meg), "--format", fmt, "--tp", str(args.tp),
                  "--pp", str(args.pp), "--no-progress"]),
                (f"{fmt} -> hf", [*py, "megatron-to-hf", "--megatron", str(meg), "--out", str(back), "--no-progress"]),
            ]
            for label, cmd in runs:
                wall, rss, anon = timed(cmd)
                print(f"{label:<30} {wall:>7.2f}s {wall / cp_wall:>9.2f} {(wall - start_wall) / cp_wall:>11.2f} "
                      f"{gb(rss):>10} {rss / size:>9.3f} {gb(anon):>10} {anon / size:>9.3f}", flush=True)
            same, detail = bitwise_equal(hf, back)
            print(f"round trip through {fmt}: {'OK' if same else 'FAILED'}: {detail}", flush=True)
            ok = ok and same
            shutil.rmtree(meg)
            shutil.rmtree(back)
        peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"(this script's own peak RSS, making and checking the checkpoint: {gb(peak_self)})")
        if not ok:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
