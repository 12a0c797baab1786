"""Training-step throughput on one GPU: meshtron's attention backends against transformers, in one run.

    python bench/gpu_throughput.py                                   # Llama-3.2-1B shape, seq 8192, every config
    python bench/gpu_throughput.py --configs hf-sdpa-pad meshtron-varlen+chunk meshtron-varlen+chunk+compile
    python bench/gpu_throughput.py --append-results bench/RESULTS.md # add a dated section (GPU runs only)
    python bench/gpu_throughput.py --device cpu                      # the CI smoke: tiny shape, 2 steps

Every configuration trains the same model shape (conf/model/llama3_2_1b.yaml, random init, bf16 autocast over
fp32 weights, AdamW with the same lr, gradient clipping at 1.0) for --warmup untimed steps and --steps timed
ones, each in its own subprocess, so peak memory is that configuration's alone and one that fails (out of
memory, a missing kernel) is printed and the rest still run.

Data: synthetic documents with lognormal lengths (median --median-doc, sigma 1.0, capped at seq), random
tokens, labels = the next token of the same document.
- meshtron-*: documents packed into rows of seq (concatenate and chunk, as trainer/data/packing.py does for
  pretraining: a document that does not fit continues in the next row as a new piece), position ids and
  document ids restarting per piece. Driven through the trainer's own pieces: trainer.loop.prepare,
  parallel.parallelize.build_parallel_model with a single-process ParallelDims, trainer.optim.StageOptimizers,
  trainer.step.local_batch + forward_backward, parallel.collectives.clip_grad_norm_. Backends sdpa (the
  dense-mask path on packed rows), varlen, flex; "+chunk" sets trainer.loss_chunk_size=1024 (else 0),
  "+compile" sets parallel.compile=true.
- hf-sdpa-pad: transformers' LlamaForCausalLM, each document alone in a row padded to seq (right padding,
  no attention mask: under a causal mask real tokens never see the padding after them, so this is exact and
  lets sdpa take its causal flash kernel; padding carries no labels).
- hf-sdpa-bucket: the same, each document padded only to its length bucket (seq / 2^k, k = 0..5), rows of one
  bucket batched so every micro-batch holds seq slots (HF Trainer's group_by_length, a stronger baseline).
- hf-sdpa-packed / hf-flex-packed: the meshtron rows fed to LlamaForCausalLM with position_ids and no
  attention mask, from which transformers derives per-document masks (masking_utils.find_packed_sequence_indices):
  a dense mask for sdpa, a BlockMask for attn_implementation="flex_attention".

Real tokens/s counts non-padding tokens only. TFLOP/s are model FLOPs of the real tokens (trainer/flops.py:
6 x matmul parameters per token x real tokens + causal attention over the actual document lengths, nothing
for padding); MFU is given against the device's datasheet bf16 dense peak (trainer/flops.py's table) and
against a bf16 8192^3 matmul measured in the same run. Ratios are to hf-sdpa-pad and hf-sdpa-bucket when
they ran in the same invocation.

Needs on the GPU machine: torch, transformers, numpy, and hydra-core + omegaconf (trainer/config.py imports
them). A GPU run of every configuration takes longer than 10 minutes (each +compile run compiles 16 layers):
split it with --configs (keep hf-sdpa-pad in each part for the ratios) or bound it with --time-limit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.flops import attention_flops, detected_peak_tflops, matmul_params_per_token  # noqa: E402
from trainer.loss import IGNORE_INDEX  # noqa: E402

MESHTRON = {f"meshtron-{b}{'+chunk' if chunk else ''}{'+compile' if comp else ''}": dict(backend=b, chunk=chunk,
                                                                                       compile=comp)
            for b in ("sdpa", "varlen", "flex") for comp in (False, True) for chunk in (False, True)}
# fp8 (trainer.precision=fp8, torchao rowwise; needs torchao, and fp8 GEMMs or it is refused): the varlen paths
# with the chunked loss, eager and compiled. MFU is counted against the same bf16 peak, and the summary prints each
# one's speed-up over its bf16 twin.
MESHTRON.update({f"{n}+fp8": {**s, "fp8": True} for n, s in list(MESHTRON.items())
                 if s["backend"] == "varlen" and s["chunk"]})
HF = {"hf-sdpa-pad": dict(attn="sdpa", layout="pad"), "hf-sdpa-bucket": dict(attn="sdpa", layout="bucket"),
      "hf-sdpa-packed": dict(attn="sdpa", layout="packed"), "hf-flex-packed": dict(attn="flex_attention",
                                                                                   layout="packed")}
CONFIGS = [*HF, *MESHTRON]
BASELINES = ("hf-sdpa-pad", "hf-sdpa-bucket")
CHUNK = 1024
SIGMA = 1.0
MATMUL_N = {"cuda": 8192, "cpu": 1024}  # 8192^3 in bf16 takes minutes on a CPU


# ----------------------------------------------------------------------------------------------- shapes


def model_config(args):
    """The Llama-3.2-1B shape from conf/ on CUDA; a 2-layer, width-64 model in the CPU smoke."""
    from omegaconf import OmegaConf

    from trainer.config import ModelConfig

    if args.device == "cpu":
        return ModelConfig(name="smoke", vocab_size=1024, hidden_size=64, ffn_hidden_size=176, num_layers=2,
                           num_attention_heads=4, num_query_groups=2, max_position_embeddings=args.seq)
    raw = OmegaConf.load(ROOT / "conf" / "model" / "llama3_2_1b.yaml")
    raw.pop("defaults", None)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))


def model_flops(m, piece_lengths: np.ndarray) -> float:
    """Training FLOPs of the real tokens of these document pieces, by trainer/flops.py's formula (the one
    behind the trainer's `tflops` metric): 6 x matmul parameters per token x tokens + causal attention."""
    lengths = np.asarray(piece_lengths, dtype=np.int64)
    return 6.0 * matmul_params_per_token(m) * float(lengths.sum()) + float(attention_flops(m, lengths))


def datasheet_peak(device: str) -> tuple[str, float | None]:
    if device != "cuda":
        return platform.processor() or "cpu", None
    name = torch.cuda.get_device_name()
    return name, detected_peak_tflops(name)


# ------------------------------------------------------------------------------------------------ data


def draw_lengths(rng: np.random.Generator, n: int, median: float, seq: int) -> np.ndarray:
    return np.clip(np.rint(rng.lognormal(math.log(median), SIGMA, n)), 2, seq).astype(np.int64)


def documents(rng: np.random.Generator, median: float, seq: int, vocab: int):
    """Endless (inputs, labels) of synthetic documents: labels are the inputs shifted by one token."""
    while True:
        for length in draw_lengths(rng, 256, median, seq):
            tokens = rng.integers(0, vocab, int(length) + 1)
            yield tokens[:-1], tokens[1:]


def packed_rows(docs, rows: int, seq: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """`rows` full rows of packed document pieces, and the pieces' lengths (what attention sees)."""
    fields = {k: np.zeros((rows, seq), np.int64) for k in ("input_ids", "labels", "position_ids", "document_ids")}
    pieces, carry = [], None
    for r in range(rows):
        at, piece = 0, 0
        while at < seq:
            ids, labels = carry if carry is not None else next(docs)
            n = min(len(ids), seq - at)
            carry = (ids[n:], labels[n:]) if n < len(ids) else None
            span = slice(at, at + n)
            fields["input_ids"][r, span], fields["labels"][r, span] = ids[:n], labels[:n]
            fields["position_ids"][r, span], fields["document_ids"][r, span] = np.arange(n), piece
            pieces.append(n)
            at, piece = at + n, piece + 1
    return {k: torch.from_numpy(v) for k, v in fields.items()}, pieces


def padded_rows(docs, width: int, count: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """`count` documents of at most `width` tokens, each alone in a right-padded row of `width` slots."""
    ids, labels, lengths = np.zeros((count, width), np.int64), np.full((count, width), IGNORE_INDEX, np.int64), []
    for r in range(count):
        x, y = next(docs)
        ids[r, :len(x)], labels[r, :len(y)] = x, y
        lengths.append(len(x))
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}, lengths


def bucketed_micro_batches(docs, seq: int, count: int) -> list[tuple[dict[str, torch.Tensor], list[int]]]:
    """`count` micro-batches of seq slots, each of seq // width documents padded to one bucket width."""
    widths = [seq >> k for k in range(6) if seq >> k >= 2]
    waiting: dict[int, list] = {w: [] for w in widths}
    out = []
    while len(out) < count:
        doc = next(docs)
        width = min(w for w in widths if w >= len(doc[0]))
        waiting[width].append(doc)
        if len(waiting[width]) == seq // width:
            out.append(padded_rows(iter(waiting[width]), width, seq // width))
            waiting[width] = []
    return out


def make_steps(layout: str, args, vocab: int, n_steps: int) -> list[tuple[list[dict], list[int]]]:
    """Per step: its micro-batches (host tensors, pinned for CUDA as the trainer's loader pins them) and every
    document piece's length in them. The same seed draws the same document stream for every configuration."""
    docs = documents(np.random.default_rng(args.seed), args.median_doc, args.seq, vocab)
    steps = []
    for _ in range(n_steps):
        if layout == "packed":
            mbs = [packed_rows(docs, 1, args.seq) for _ in range(args.rows)]
        elif layout == "pad":
            mbs = [padded_rows(docs, args.seq, 1) for _ in range(args.rows)]
        else:
            mbs = bucketed_micro_batches(docs, args.seq, args.rows)
        pin = args.device == "cuda"
        steps.append(([{k: v.pin_memory() if pin else v for k, v in mb.items()} for mb, _ in mbs],
                      [n for _, lengths in mbs for n in lengths]))
    return steps


# --------------------------------------------------------------------------------------------- workers


def optim_config(args):
    """One AdamW for both sides: the trainer's defaults (betas, eps, decay groups, fused on CUDA, clip 1.0)
    at a constant --lr."""
    from trainer.config import OptimConfig

    return OptimConfig(lr=args.lr, min_lr=args.lr, warmup_steps=0, decay="constant")


def meshtron_config(args, spec: dict):
    """The trainer's own Config for a configuration, checked by the trainer's own set-up checks."""
    from parallel.float8 import check_fp8
    from trainer.config import Config, DataConfig, ParallelConfig, TrainerConfig
    from trainer.loop import pick_device, prepare
    from trainer.model import attention

    model = model_config(args)
    model.attention_backend = spec["backend"]
    cfg = Config(model=model, parallel=ParallelConfig(compile=spec["compile"], microbatch_size=1),
                 data=DataConfig(seq_len=args.seq),
                 optim=optim_config(args),
                 trainer=TrainerConfig(precision="fp8" if spec.get("fp8") else "bf16", device=args.device,
                                       global_batch_size=args.rows,
                                       loss_chunk_size=CHUNK if spec["chunk"] else 0, eval_every=0,
                                       max_steps=args.warmup + args.steps, export_hf=False, seed=args.seed))
    cfg, dims = prepare(cfg, world_size=1)
    device = pick_device(cfg.trainer.device)
    attention.check_attention_backend(cfg.model, device.type, dims.cp_enabled)
    check_fp8(cfg, dims.tp, device)
    return cfg, dims, device


def meshtron_worker(args, spec: dict):
    from parallel.collectives import clip_grad_norm_
    from parallel.parallelize import build_parallel_model
    from trainer.loss import count_valid
    from trainer.optim import StageOptimizers
    from trainer.step import forward_backward, local_batch

    cfg, dims, device = meshtron_config(args, spec)
    pm = build_parallel_model(cfg, dims, None, device)
    opt = StageOptimizers(pm.modules, cfg.optim, device, cfg.trainer.max_steps)
    # One global batch per step: the packed rows stacked, split again into micro-batches by the trainer.
    cat = (lambda ts: torch.cat(ts).pin_memory()) if device.type == "cuda" else torch.cat
    steps = [({k: cat([mb[k] for mb in mbs]) for k in mbs[0]}, lengths)
             for mbs, lengths in make_steps("packed", args, cfg.model.vocab_size, args.warmup + args.steps)]

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        normalizer = count_valid(batch["labels"])
        loss_sum = forward_backward(pm, local_batch(batch, pm), normalizer, cfg, device)
        clip_grad_norm_(pm.parameters(), cfg.optim.grad_clip, pm.mesh, pm.duplicates)
        opt.step()
        opt.zero_grad()
        return loss_sum / normalizer

    result = timed(step, steps, args, device, cfg.model)
    if spec["compile"] and not result["graphs"]:
        raise RuntimeError("parallel.compile=true, yet torch.compile traced no graph: nothing was compiled")
    return result


def hf_worker(args, spec: dict):
    from transformers import AutoModelForCausalLM

    from checkpoint_convert.hf import hf_config
    from trainer.optim import build_optimizer

    device = torch.device(args.device)
    m = model_config(args)
    torch.manual_seed(args.seed)
    with device:
        model = AutoModelForCausalLM.from_config(hf_config(m, use_cache=False), attn_implementation=spec["attn"],
                                                 dtype=torch.float32).to(device)
    model.train()
    optim = optim_config(args)
    opt = build_optimizer(model.parameters(), optim, device)
    steps = make_steps(spec["layout"], args, m.vocab_size, args.warmup + args.steps)
    packed = spec["layout"] == "packed"

    def step(mbs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        normalizer = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in mbs)  # on the host: no sync
        total = torch.zeros((), device=device)
        for mb in mbs:
            mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
            labels, position_ids = mb["labels"], mb["position_ids"] if packed else None
            with torch.autocast(device.type, dtype=torch.bfloat16):
                # Our labels are already the next tokens: shift_labels tells transformers not to shift again.
                loss = model(input_ids=mb["input_ids"], position_ids=position_ids, labels=labels,
                             shift_labels=labels, num_items_in_batch=normalizer, use_cache=False).loss
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    return timed(step, steps, args, device, m)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def timed(step, steps: list, args, device: torch.device, m) -> dict:
    """Runs warm-up steps (compilation, allocator growth), then times the rest between two syncs; counts
    graphs torch.compile traced, so recompilation inside the timed steps shows in the table."""
    t0 = time.perf_counter()
    for batch, _ in steps[:args.warmup]:
        step(batch)
    sync(device)
    warmup_s = time.perf_counter() - t0
    measured, graphs = steps[args.warmup:], compiled_graphs()
    t0 = time.perf_counter()
    for batch, _ in measured:
        loss = step(batch)
    loss = float(loss)
    sync(device)
    seconds = time.perf_counter() - t0
    lengths = np.array([n for _, ls in measured for n in ls])
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"tokens_per_s": float(lengths.sum()) / seconds, "tflops": model_flops(m, lengths) / seconds / 1e12,
            "peak_gib": peak / 2**30, "loss": loss, "warmup_s": warmup_s, "step_s": seconds / len(measured),
            "graphs": compiled_graphs(), "graphs_timed": compiled_graphs() - graphs}


def matmul_worker(args) -> dict:
    """bf16 n x n x n matmul TFLOP/s on this device: what its dense tensor cores deliver in practice."""
    device, n = torch.device(args.device), MATMUL_N[args.device]
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    iters, warmup = (100, 10) if device.type == "cuda" else (3, 1)
    for _ in range(warmup):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    seconds = time.perf_counter() - t0
    name, peak = datasheet_peak(device.type)
    return {"n": n, "tflops": 2 * n**3 * iters / seconds / 1e12, "device_name": name, "datasheet_tflops": peak}


def worker(args) -> None:
    name = args.worker
    result = (matmul_worker(args) if name == "matmul" else
              hf_worker(args, HF[name]) if name in HF else meshtron_worker(args, MESHTRON[name]))
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------- driver


def preflight(name: str, args) -> dict | None:
    """Why a configuration cannot run here ({"skipped" | "refused" | "failed": why}), found before any
    subprocess or allocation; None if it can run."""
    if name == "hf-flex-packed" and args.device == "cpu":
        return {"skipped": "needs CUDA (flex_attention has no backward on CPU)"}
    if name not in MESHTRON:
        return None
    from trainer.errors import ConfigError

    try:
        meshtron_config(args, MESHTRON[name])
    except ConfigError as err:
        reason = " ".join(str(err).split())
        return {"skipped": f"needs CUDA ({reason})"} if "CUDA" in reason else {"refused": reason}
    except Exception as err:  # noqa: BLE001 - a broken configuration is reported, the others still run
        return {"failed": f"{type(err).__name__}: {err}"}
    if args.device == "cpu" and MESHTRON[name]["compile"] and not args.named_configs:
        return {"skipped": "compile is left out of the CPU smoke (inductor's C++ build takes longer than the "
                           "smoke's budget); name the configuration in --configs to run it"}
    return None


def worker_argv(args, name: str) -> list[str]:
    flags = ("device", "seq", "rows", "warmup", "steps", "median_doc", "lr", "seed")
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", name]
    for flag in flags:
        argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return argv


def run_config(name: str, args, timeout: float) -> dict:
    """One configuration in its own process: its RESULT line, or why it has none."""
    try:
        proc = subprocess.run(worker_argv(args, name), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout:.0f} s"}
    results = [line[len("RESULT "):] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode == 0 and results:
        return json.loads(results[-1])
    tail = [line for line in proc.stderr.splitlines() if line.strip()]
    print(f"--- {name} exited {proc.returncode}; its stderr ends:\n" + "\n".join(tail[-25:]), file=sys.stderr)
    # The exception line, not the hints some libraries print after it (dynamo's TORCHDYNAMO_VERBOSE line).
    raised = [line for line in tail if re.match(r"[\w.]+(Error|Exception|Unsupported|Interrupt)\b", line)]
    why = (raised or tail or [f"exit code {proc.returncode}"])[-1].strip()
    return {"failed": why[:300]}


def run_all(args) -> tuple[dict, dict[str, dict]]:
    start, results = time.perf_counter(), {}
    names = ["matmul", *args.configs]
    for i, name in enumerate(names):
        left = args.time_limit - (time.perf_counter() - start) if args.time_limit else args.config_timeout
        t0 = time.perf_counter()
        results[name] = (preflight(name, args) if name != "matmul" else None) or (
            {"skipped": "--time-limit reached"} if left <= 0
            else run_config(name, args, min(left, args.config_timeout)))
        print(f"[{i + 1}/{len(names)}] {name}: {status(results[name])} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    return results.pop("matmul"), results


def status(r: dict) -> str:
    for kind in ("skipped", "refused", "failed"):
        if kind in r:
            return f"{kind}: {r[kind]}"
    if "n" in r:
        return f"{r['tflops']:.1f} TFLOP/s bf16 matmul {r['n']}^3 on {r['device_name']}"
    return f"{r['tokens_per_s']:,.0f} real tokens/s, {r['tflops']:.2f} TFLOP/s"


def table(results: dict[str, dict], matmul: dict, device: str) -> list[str]:
    mem = "peak mem GiB" if device == "cuda" else "peak RSS GiB"
    head = ["config", "real tok/s", "TFLOP/s", "MFU datasheet", "MFU matmul", mem, "loss", "warmup s",
            *(f"vs {b}" for b in BASELINES), "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    peak, measured = matmul.get("datasheet_tflops"), matmul.get("tflops")
    for name, r in results.items():
        if "tokens_per_s" not in r:
            cells = ["-"] * (len(head) - 2) + [status(r).replace("|", "/")[:240]]
        else:
            ratios = [f"{r['tokens_per_s'] / results[b]['tokens_per_s']:.2f}x" if "tokens_per_s" in results.get(b, {})
                      else "-" for b in BASELINES]
            cells = [f"{r['tokens_per_s']:,.0f}", f"{r['tflops']:.4g}", percent(r["tflops"], peak),
                     percent(r["tflops"], measured), f"{r['peak_gib']:.2f}", f"{r['loss']:.3f}",
                     f"{r['warmup_s']:.1f}", *ratios,
                     f"ok, {r['graphs_timed']} graphs traced while timed" if r.get("graphs_timed") else "ok"]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return lines


def percent(tflops: float, peak: float | None) -> str:
    return f"{100 * tflops / peak:.1f}%" if peak else "-"


def summary(results: dict[str, dict], matmul: dict) -> list[str]:
    """The reference line, the ratio line and the two goals."""
    peak = matmul.get("datasheet_tflops")
    lines = [f"reference: {status(matmul)}; datasheet bf16 dense peak: "
             + (f"{peak:.0f} TFLOP/s" if peak else "unknown for this device")]
    ran = {n: r for n, r in results.items() if n in MESHTRON and "tokens_per_s" in r}
    if not ran:
        return lines + ["ratio: n/a (no meshtron configuration ran)"]
    best = max(ran, key=lambda n: ran[n]["tokens_per_s"])
    ratios = {b: ran[best]["tokens_per_s"] / results[b]["tokens_per_s"] for b in BASELINES
              if "tokens_per_s" in results.get(b, {})}
    lines.append(f"ratio: best meshtron ({best}) real tokens/s = "
                 + (", ".join(f"{v:.2f}x {b}" for b, v in ratios.items()) or "n/a (no transformers baseline ran)"))
    top = max(ran, key=lambda n: ran[n]["tflops"])
    mfu = ran[top]["tflops"] / peak if peak else None
    lines.append("goal: MFU >= 40% of datasheet (packed): " + (
        f"{100 * mfu:.1f}% ({top}) -> {'met' if mfu >= 0.40 else 'missed'}" if mfu is not None
        else "n/a (no datasheet peak for this device)"))
    pad = ratios.get(BASELINES[0])
    lines.append(f"goal: >= 1.5x {BASELINES[0]} real tokens/s: " + (
        f"{pad:.2f}x ({best}) -> {'met' if pad >= 1.5 else 'missed'}" if pad is not None
        else f"n/a ({BASELINES[0]} did not run)"))
    for name in ran:
        twin = name.removesuffix("+fp8")
        if name.endswith("+fp8") and twin in ran:
            lines.append(f"fp8: {name} real tokens/s = {ran[name]['tokens_per_s'] / ran[twin]['tokens_per_s']:.2f}x "
                         f"{twin} (bf16)")
    return lines


def append_results(path: Path, args, matmul: dict, rows: list[str], notes: list[str]) -> None:
    import transformers

    now = datetime.datetime.now(datetime.timezone.utc)
    command = shlex.join(["python", *sys.argv])
    section = [f"## {now:%Y-%m-%d %H:%M} UTC, {matmul.get('device_name', 'unknown device')}", "",
               f"torch {torch.__version__}, CUDA {torch.version.cuda}, transformers {transformers.__version__}, "
               f"Python {platform.python_version()}; seq {args.seq}, {args.rows} rows per step, {args.warmup} "
               f"warm-up + {args.steps} timed steps, median document {args.median_doc:.0f} tokens", "",
               f"    {command}", "", *rows, "", *(f"- {note}" for note in notes), ""]
    with open(path, "a") as f:
        f.write("\n" + "\n".join(section))
    print(f"appended to {path}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, help="default: all of them")
    p.add_argument("--seq", type=int, help="row length (default 8192; 256 on cpu)")
    p.add_argument("--rows", type=int, default=2, help="micro-batches (of seq slots each) per optimizer step")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 2; 1 on cpu)")
    p.add_argument("--steps", type=int, help="timed steps (default 5; 2 on cpu)")
    p.add_argument("--median-doc", type=float, help="median document length (default 1500 x seq / 8192)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--config-timeout", type=float, default=600.0, help="seconds per configuration")
    p.add_argument("--time-limit", type=float, help="start no configuration after this many seconds")
    p.add_argument("--append-results", type=Path, help="append a dated section to this file (GPU runs only)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.named_configs, args.configs = bool(args.configs), args.configs or CONFIGS
    args.seq = args.seq or (256 if cpu else 8192)
    args.warmup = 1 if cpu and args.warmup is None else 2 if args.warmup is None else args.warmup
    args.steps = args.steps or (2 if cpu else 5)
    args.median_doc = args.median_doc or 1500 * args.seq / 8192
    if args.append_results and cpu:
        p.error("--append-results records GPU measurements; a --device cpu run is a smoke test, not a result")
    if not cpu and not args.worker and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device; use --device cpu for the smoke run")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    matmul, results = run_all(args)
    rows, notes = table(results, matmul, args.device), summary(results, matmul)
    print("\n".join(["", *rows, "", *notes]), flush=True)
    if args.append_results:
        append_results(args.append_results, args, matmul, rows, notes)


if __name__ == "__main__":
    main()
