"""``python -m trainer.data.preprocess`` (``meshtron-preprocess``): tokenize a corpus into Megatron's indexed
format ahead of training, with several worker processes.

    meshtron-preprocess --input corpus/ --format jsonl_text --output-prefix out/corpus --workers 8

writes ``out/corpus.bin``/``.idx`` (chat formats also ``out/corpus.targets.bin``/``.idx``: a uint8 0/1 target
per token, the same sequence lengths) and ``out/corpus.meta.json`` (bad rows skipped, how it was made).
megatron-core's ``IndexedDataset`` reads the pair, and ``data.format=megatron data.path=out/corpus`` trains on
it. Documents are exactly the trainer's own: the same readers (sources.py, sft.py), no special tokens,
whitespace-only documents skipped, and no EOD token: the trainer appends EOS itself when packing.
``--append-eod`` ends every document with the tokenizer's EOS, as Megatron's ``preprocess_data.py
--append-eod`` does, for files meant for Megatron-LM. The trainer reads those too: its one vocabulary scan of a
Megatron file notices that every document ends with EOS (TokenizedCorpus.eod) and then appends none, so the
rows are the same either way.

Work is split into parts (shared.plan_parts: whole files, or line-aligned byte ranges / Parquet row-group
ranges of a file larger than its share); each part is written under ``<prefix>.parts/`` with a done marker,
so an interrupted run resumes where it stopped (a changed input, tokenizer or setting starts over). The merge
concatenates the parts in input order and publishes the outputs atomically (.bin before .idx, meta last).
Bad paths, formats or rows: one line on stderr and exit status 2 (rows keep their file:line).
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from trainer.config import PRETRAIN_FORMATS, SFT_FORMATS, DataConfig
from trainer.errors import ConfigError
from trainer.data import pretrain, sft
from trainer.data.megatron_indexed import read_megatron, token_dtype
from trainer.data.shared import (merge_parts, part_bytes, part_stem, plan_id, plan_parts, read_meta,
                                 write_json_atomic, write_part)
from trainer.data.sources import Part, resolve_files
from trainer.data.tokenizer import load_tokenizer, tokenizer_fingerprint

FORMATS = tuple(f for f in PRETRAIN_FORMATS if f != "megatron") + SFT_FORMATS
_POLL_S = 0.25


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="meshtron-preprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", action="append", required=True,
                   help="a file, a directory (searched recursively) or a glob; repeatable, read in order")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--text-field", default="text", help="the text column/field (jsonl_text, parquet, hf_disk)")
    p.add_argument("--tokenizer", default=None, help="a local HF tokenizer directory (default: the bundled one)")
    p.add_argument("--chat-template", default=None, help="a .jinja chat template (default: the tokenizer's)")
    p.add_argument("--train-on", default="all_assistant", choices=("all_assistant", "last_assistant"))
    p.add_argument("--on-bad-row", default="error", choices=("error", "skip"))
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin/.idx (+ .targets.* for chat)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--append-eod", action="store_true",
                   help="end each document with EOS, as Megatron-LM's preprocess_data.py does (the trainer "
                        "recognises such files and appends no second EOS)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers={args.workers} must be at least 1")
    if args.append_eod and args.format in SFT_FORMATS:
        p.error("--append-eod is for pretraining formats; a chat template ends each conversation itself")
    return args


# ------------------------------------------------------------------------------------------- the job


class Job:
    """What every worker needs to tokenize a part; workers rebuild the tokenizer from its directory."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.fmt = args.format
        self.chat = args.format in SFT_FORMATS
        self.data_cfg = DataConfig(tokenizer=args.tokenizer, chat_template=args.chat_template,
                                   train_on=args.train_on, on_bad_row=args.on_bad_row)
        self.tokenizer = load_tokenizer(self.data_cfg, None)
        self.template = sft.resolve_chat_template(self.tokenizer, self.data_cfg) if self.chat else ""
        if self.chat and not getattr(self.tokenizer, "is_fast", False):
            raise ConfigError("chat formats need a fast (Rust) tokenizer: its character offsets locate the "
                              "assistant turns")
        fmt_files = "jsonl_text" if self.chat else self.fmt
        self.files = tuple(f for i, path in enumerate(args.input)
                           for f in resolve_files(path, fmt_files, f"--input[{i}]"))
        self.streams = [("", token_dtype(len(self.tokenizer)))] + ([(".targets", np.uint8)] if self.chat else [])

    def work(self):
        if self.chat:
            return functools.partial(sft.tokenize_chat_part, tokenizer=self.tokenizer, fmt=self.fmt,
                                     template=self.template, train_on=self.args.train_on,
                                     on_bad_row=self.args.on_bad_row)
        return functools.partial(pretrain.tokenize_part, tokenizer=self.tokenizer, fmt=self.fmt,
                                 field=self.args.text_field, on_bad_row=self.args.on_bad_row,
                                 append_eod=self.args.append_eod)

    def identity(self, parts: Sequence[Part]) -> str:
        """Changes with any input file, the tokenizer, a setting or the part layout: resume only the same job."""
        a = self.args
        return plan_id(parts, pretrain.files_identity(self.files), tokenizer_fingerprint(self.tokenizer),
                       self.fmt, a.text_field, self.template, a.train_on, a.on_bad_row, str(a.append_eod))


_JOB: Optional[Job] = None
_PROGRESS = None  # this process' progress callback: a shared counter in workers, the bar itself in-process


def _init_worker(args: argparse.Namespace, done, single_thread: bool) -> None:
    global _JOB, _PROGRESS
    if single_thread:  # one core per worker: the Rust tokenizer's threads would only contend
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _JOB = Job(args)

    def add(n: int) -> None:
        with done.get_lock():
            done.value += n

    _PROGRESS = add


def _run_part(task: tuple[Path, int, Part]) -> int:
    parts_dir, i, part = task
    write_part(parts_dir, i, part, _JOB.streams, _JOB.work(), _PROGRESS)
    return i


# ------------------------------------------------------------------------------------------- running


def _prepare_parts_dir(parts_dir: Path, identity: str) -> None:
    """Keep finished parts only when they belong to this very job."""
    if parts_dir.is_dir() and (read_meta(parts_dir / "job") or {}).get("identity") != identity:
        shutil.rmtree(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    if read_meta(parts_dir / "job") is None:
        write_json_atomic(parts_dir / "job.meta.json", {"identity": identity, "bad_rows": {}})


def _tokenize_parts(job: Job, args: argparse.Namespace, todo: list[tuple[Path, int, Part]], bar: tqdm) -> None:
    global _JOB, _PROGRESS
    workers = min(args.workers, len(todo))
    if workers <= 1:  # in this process: nothing to fork, errors keep their traceback
        _JOB, _PROGRESS = job, bar.update
        for task in todo:
            _run_part(task)
        return
    # fork: workers start in milliseconds with the modules already imported (spawn re-imports torch).
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    done = ctx.Value("q", 0)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(args, done, True)) as pool:
        results = pool.imap(_run_part, todo)  # in order: the first failing part's error is the one reported
        remaining, base = len(todo), bar.n
        while remaining:
            try:
                results.next(timeout=_POLL_S)
                remaining -= 1
            except mp.TimeoutError:
                pass
            bar.update(base + done.value - bar.n)


def run(args: argparse.Namespace) -> dict:
    job = Job(args)
    prefix = Path(args.output_prefix).expanduser()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    parts = plan_parts(job.files, job.fmt, args.workers, args.text_field)
    parts_dir = Path(f"{prefix}.parts")
    _prepare_parts_dir(parts_dir, job.identity(parts))
    sizes = [part_bytes(p, job.fmt) for p in parts]
    finished = [read_meta(part_stem(parts_dir, i)) is not None for i in range(len(parts))]
    todo = [(parts_dir, i, p) for i, p in enumerate(parts) if not finished[i]]
    start = time.monotonic()
    initial = sum(s for s, f in zip(sizes, finished) if f)
    with tqdm(total=sum(sizes), initial=initial, desc=f"tokenizing {len(parts)} part(s)", unit="B",
              unit_scale=True, file=sys.stderr) as bar:
        _tokenize_parts(job, args, todo, bar)
        bar.update(bar.total - bar.n)
    meta = {"inputs": [str(f) for f in job.files], "format": job.fmt, "text_field": args.text_field,
            "tokenizer": str(args.tokenizer or "bundled"), "append_eod": args.append_eod,
            "train_on": args.train_on if job.chat else None}
    meta = merge_parts(prefix, [part_stem(parts_dir, i) for i in range(len(parts))], job.streams, meta)
    shutil.rmtree(parts_dir)
    elapsed = time.monotonic() - start
    corpus = read_megatron(prefix)
    return {"prefix": str(prefix), "documents": corpus.num_docs, "tokens": int(corpus.offsets[-1]),
            "seconds": elapsed, "parts": len(parts), "resumed_parts": sum(finished), "bad_rows": meta["bad_rows"]}


# The data layer's messages name the trainer's config keys; here the same settings are flags.
FLAGS = {"data.on_bad_row": "--on-bad-row", "data.text_field": "--text-field", "data.chat_template": "--chat-template",
         "data.train_on": "--train-on", "data.tokenizer": "--tokenizer", "data.format": "--format",
         "data.path": "--input"}


def as_flags(message: str) -> str:
    """A data-layer error in this command's terms: `data.on_bad_row=skip` -> `--on-bad-row skip`."""
    keys = "|".join(re.escape(k) for k in FLAGS)
    return re.sub(rf"\b({keys})(=(\S+?))?(?=[\s),;:]|$)",
                  lambda m: FLAGS[m[1]] + (f" {m[3]}" if m[3] else ""), message)


def _parts_dir(output_prefix: str) -> Path:
    return Path(f"{Path(output_prefix).expanduser()}.parts")


def _kept_parts(output_prefix: str) -> str:
    """After an interruption: keep ``<prefix>.parts/`` only when it holds finished parts the same command resumes
    from, and say so; a directory with none is removed."""
    parts_dir = _parts_dir(output_prefix)
    if not parts_dir.is_dir():
        return ""
    done = sum(read_meta(Path(str(m).removesuffix(".meta.json"))) is not None
               for m in parts_dir.glob("part-*.meta.json"))
    if not done:
        shutil.rmtree(parts_dir, ignore_errors=True)
        return ""
    return (f" ({done} finished part{'' if done == 1 else 's'} kept in {parts_dir}: the same command resumes "
            f"from them; delete it to start over)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        out = run(args)
    except ConfigError as e:
        # Fixing it changes an input or a flag, and the parts are keyed by both: the next run starts over anyway.
        shutil.rmtree(_parts_dir(args.output_prefix), ignore_errors=True)
        print(f"meshtron-preprocess: error: {as_flags(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"meshtron-preprocess: interrupted{_kept_parts(args.output_prefix)}", file=sys.stderr)
        return 130
    secs = max(out["seconds"], 1e-9)
    for path, n in out["bad_rows"].items():
        print(f"skipped {n} bad row{'' if n == 1 else 's'} in {path} (--on-bad-row skip)", file=sys.stderr)
    print(f"wrote {out['prefix']}.bin/.idx: {out['documents']} documents, {out['tokens']} tokens in "
          f"{out['seconds']:.1f} s ({out['documents'] / secs:,.0f} docs/s, {out['tokens'] / secs:,.0f} tokens/s; "
          f"{out['parts']} parts, {out['resumed_parts']} already done)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
