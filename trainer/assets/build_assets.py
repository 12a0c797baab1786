"""Regenerate the bundled corpus and tokenizer.

    python -m trainer.assets.build_assets            # rewrite trainer/assets/{corpus,tokenizer}
    python -m trainer.assets.build_assets --check    # rebuild in a temp dir, fail if anything differs

Corpus. Real English text that may be shipped, available offline: CPython's own documentation, under the
PSF license (a copy is written next to the corpus, as the license asks).
  * ``pydoc_data.topics``: the Language Reference sections that ``help("topic")`` prints, one document each;
  * the docstrings of the public top-level stdlib modules (``Lib/*.py``), read with ``ast`` (never imported),
    one document per module: the module docstring, then each public class/function signature and docstring.
Both come from the running interpreter, so the output is a function of the CPython version (recorded in the
corpus README; rebuild with the same version to reproduce the committed files byte for byte).
About 5% of the characters go to validation: documents are ordered by a hash of their source name and taken
into val.jsonl until it holds 5%, so the split does not depend on collection order and adding a module moves
at most that module.

Tokenizer. Byte-level BPE (GPT-2 pre-tokenization, no normalizer, so decode(encode(x)) == x for any text)
trained with HF ``tokenizers`` on train.jsonl only, 2048 entries including the special tokens below, so it
fits the tiny model's vocab_size=2048. Saved as a ``PreTrainedTokenizerFast`` directory with bos/eos/pad set
and a ChatML chat template. BPE training is single-pass and deterministic for a fixed input order.
"""

from __future__ import annotations

import argparse
import ast
import filecmp
import hashlib
import json
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from trainer.assets import asset_path

BOS, EOS, PAD, IM_START, IM_END = "<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]
VOCAB_SIZE = 2048
VAL_FRACTION = 0.05

# ChatML (https://github.com/openai/openai-python/blob/v0.28.1/chatml.md), as Qwen and SmolLM use it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Modules whose "docstrings" are not prose (easter eggs) or are generated tables.
_SKIP_MODULES = {"this", "antigravity", "keyword", "token"}

Document = tuple[str, str]  # (source name, text)


# ------------------------------------------------------------------------------------------- corpus


def topic_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [(f"pydoc_data.topics:{name}", topics[name].strip()) for name in sorted(topics)]


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    return f"({ast.unparse(node.args)})"


def _module_document(name: str, source: str) -> str | None:
    """pydoc-like text for one module: its docstring, then each public class/function with its docstring."""
    tree = ast.parse(source)
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {name}\n\n{doc}")

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if node.name.startswith("_"):
                continue
            qualname = f"{prefix}.{node.name}"
            doc = ast.get_docstring(node)
            if isinstance(node, ast.ClassDef):
                if doc:
                    parts.append(f"class {qualname}\n\n{doc}")
                visit(node.body, qualname)
            elif doc:
                parts.append(f"{qualname}{_signature(node)}\n\n{doc}")

    visit(tree.body, name)
    return "\n\n\n".join(parts) if parts else None


def docstring_documents(stdlib: Path) -> list[Document]:
    docs = []
    for path in sorted(stdlib.glob("*.py")):
        name = path.stem
        if name.startswith("_") or name in _SKIP_MODULES:
            continue
        text = _module_document(name, path.read_text(encoding="utf-8"))
        if text:
            docs.append((f"stdlib-docstrings:{name}", text))
    return docs


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Hash-ordered documents fill validation up to val_fraction of the characters; order is kept in both."""
    total = sum(len(text) for _, text in docs)
    by_hash = sorted(docs, key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())
    val_names, val_chars = set(), 0
    for name, text in by_hash:
        if val_chars >= val_fraction * total:
            break
        val_names.add(name)
        val_chars += len(text)
    train = [d for d in docs if d[0] not in val_names]
    val = [d for d in docs if d[0] in val_names]
    return train, val


def write_jsonl(path: Path, docs: list[Document]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for name, text in docs:
            f.write(json.dumps({"text": text, "source": name}, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,  # counts the special tokens too
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable: no <unk>
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def save_hf_tokenizer(tok: Tokenizer, out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,  # keep decode(encode(x)) == x
        model_max_length=1_000_000,
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out_dir))


def check_tokenizer(tok_dir: Path, texts: list[str]) -> int:
    """Load the saved directory the way users will and check it; returns the token count of ``texts``."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(hf) <= VOCAB_SIZE, f"tokenizer has {len(hf)} entries, more than {VOCAB_SIZE}"
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS, EOS, PAD)
    ids = hf(texts, add_special_tokens=False)["input_ids"]
    for text, doc_ids in zip(texts, ids):
        assert hf.decode(doc_ids) == text, "byte-level BPE must round-trip the corpus"
    return sum(len(x) for x in ids)


# -------------------------------------------------------------------------------------------- driver


def _readme(train: list[Document], val: list[Document], n_tokens: dict[str, int]) -> str:
    def size(p: list[Document]) -> int:
        return sum(len(t.encode()) for _, t in p)

    return f"""# Bundled corpus

Real English text from CPython {sys.version.split()[0]}'s documentation, shipped under the
Python Software Foundation License (see `LICENSE-PSF.txt`, copied from that CPython):

- `pydoc_data.topics`: the Language Reference sections printed by `help("topic")`, one document each;
- docstrings of the public top-level standard-library modules (`Lib/*.py`, read with `ast`), one document
  per module (module docstring, then each public class/function signature and docstring).

| split | documents | UTF-8 bytes of text | tokens (bundled tokenizer) |
| --- | ---: | ---: | ---: |
| train.jsonl | {len(train)} | {size(train)} | {n_tokens['train']} |
| val.jsonl | {len(val)} | {size(val)} | {n_tokens['val']} |

One JSON object per line: `{{"text": ..., "source": ...}}`. Generated, with the tokenizer in `../tokenizer/`,
by `python -m trainer.assets.build_assets` (deterministic; rebuild with the same CPython version).
"""


def build(out_root: Path) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = topic_documents() + docstring_documents(stdlib)
    train, val = split_documents(docs, VAL_FRACTION)

    corpus_dir, tok_dir = out_root / "corpus", out_root / "tokenizer"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    if tok_dir.exists():
        shutil.rmtree(tok_dir)  # save_pretrained would leave stale files of an older layout behind
    tok_dir.mkdir(parents=True)
    write_jsonl(corpus_dir / "train.jsonl", train)
    write_jsonl(corpus_dir / "val.jsonl", val)
    shutil.copyfile(stdlib / "LICENSE.txt", corpus_dir / "LICENSE-PSF.txt")

    save_hf_tokenizer(train_tokenizer([t for _, t in train]), tok_dir)
    n_tokens = {"train": check_tokenizer(tok_dir, [t for _, t in train]),
                "val": check_tokenizer(tok_dir, [t for _, t in val])}
    (corpus_dir / "README.md").write_text(_readme(train, val, n_tokens), encoding="utf-8")
    print(f"wrote {out_root}: {len(train)} train / {len(val)} val documents, "
          f"{n_tokens['train']} / {n_tokens['val']} tokens")


def _differences(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b)
    diffs = [str(a / n) for n in cmp.left_only + cmp.right_only + cmp.diff_files + cmp.funny_files]
    for sub in cmp.common_dirs:
        diffs += _differences(a / sub, b / sub)
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=asset_path(), help="asset root to write (default: in place)")
    parser.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare with --out")
    args = parser.parse_args(argv)
    if not args.check:
        build(args.out)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        diffs = [d for sub in ("corpus", "tokenizer") for d in _differences(args.out / sub, Path(tmp) / sub)]
    for d in diffs:
        print(f"differs from a fresh build: {d}", file=sys.stderr)
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
