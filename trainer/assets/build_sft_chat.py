"""Regenerate the bundled chat SFT set ``trainer/assets/sft_chat/`` from the bundled text corpus.

    python -m trainer.assets.build_sft_chat            # rewrite sft_chat/{train,val}.jsonl and README.md
    python -m trainer.assets.build_sft_chat --check    # rebuild in a temp dir, fail if anything differs

Every answer is real text: passages of CPython's documentation from ``corpus/train.jsonl`` (train split) and
``corpus/val.jsonl`` (val split), so the two splits share no source document and the PSF license of the
corpus carries over. Each document is cut into sections (the Language Reference's underlined headings, or
one section per class/function signature in the stdlib docstrings); a conversation asks about a section
("Explain X", "What does f(...) do?") and is answered with its leading paragraphs, cut at a sampled length
so answers range from one short paragraph to well over 256 tokens. Follow-up turns (up to 4 user/assistant
exchanges) ask to go on (the next paragraphs), for an example (a code block of the same section), for a
one-sentence summary (the answer's first sentence) or about a neighbouring section. About a third of the
conversations start with a system prompt. Questions and system prompts are from small fixed lists.

Deterministic: no network, no clock, one ``random.Random`` seeded by a fixed string per split, inputs read
in file order. Contents never begin or end with whitespace (see trainer/data/sft.py on BPE boundaries).
"""

from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from trainer.assets import BUNDLED_TRAIN, BUNDLED_VAL, asset_path, write_or_check

OUT_DIR = asset_path("sft_chat")
COUNTS = {"train": 400, "val": 40}
MAX_ANSWER_CHARS = 2600

SYSTEM_PROMPTS = [
    "You are a helpful assistant who answers questions about Python.",
    "You are an expert on the Python language and its standard library. Answer from the documentation.",
    "Answer precisely, quoting the Python documentation where it helps.",
    "You are a patient tutor explaining Python to a programmer coming from another language.",
]
QUESTIONS = ["Explain {}.", "What is {}?", "Tell me about {}.", "Can you describe {}?",
             "What does the documentation say about {}?", "I'd like to understand {}. Can you help?"]
SIGNATURE_QUESTIONS = ["What does {} do?", "Explain {}.", "How do I use {}?", "What is {} for?"]
MORE = ["Go on.", "Tell me more.", "Can you continue?", "What else should I know?"]
EXAMPLE = ["Can you show an example?", "What does that look like in code?", "Show me the syntax."]
SUMMARY = ["Summarize that in one sentence.", "Give me the short version.", "TL;DR?"]
NEIGHBOUR = ["And what about {}?", "How about {}?", "Now explain {}."]


@dataclass
class Section:
    topic: str
    question_kind: str  # "topic" or "signature"
    paragraphs: list[str]  # prose and code blocks, in document order


def _is_heading(par: str) -> bool:
    lines = par.split("\n")
    return len(lines) == 2 and len(set(lines[1])) == 1 and lines[1][0] in "=*-" and len(lines[1]) >= 3


def _is_signature(par: str) -> bool:
    return "\n" not in par and bool(re.fullmatch(r"(class )?[A-Za-z_][\w.]*\.[\w]+(\(.*\))?", par))


def _is_code(par: str) -> bool:
    return all(line.startswith(" ") for line in par.split("\n"))


def sections(doc: dict) -> list[Section]:
    """A document cut at headings (Language Reference) or class/function signatures (stdlib docstrings)."""
    pars = [p.rstrip() for p in re.split(r"\n(?:[ \t]*\n)+", doc["text"]) if p.strip()]
    first = pars.pop(0)
    if _is_heading(first):
        first = first.split("\n")[0]
    title = f"the {first.split()[1]} module" if first.startswith("Module ") else first
    out = [Section(title, "topic", [])]
    for par in pars:
        if _is_heading(par):
            out.append(Section(par.split("\n")[0], "topic", []))
        elif _is_signature(par):
            out.append(Section(par.removeprefix("class "), "signature", []))
        else:
            out[-1].paragraphs.append(par)
    # An answer must open with prose: a code block first would start the content with indentation.
    return [s for s in out if s.paragraphs and not _is_code(s.paragraphs[0])]


def _take(pars: list[str], start: int, budget: int) -> tuple[str, int]:
    """Paragraphs from ``start`` until about ``budget`` characters; returns (text, next index)."""
    taken, size, i = [], 0, start
    while i < len(pars) and (not taken or size + len(pars[i]) <= budget):
        if size + len(pars[i]) > MAX_ANSWER_CHARS and taken:
            break
        taken.append(pars[i])
        size += len(pars[i]) + 2
        i += 1
    return "\n\n".join(taken).strip(), i


def _budget(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.35:
        return rng.randint(120, 400)  # one short paragraph
    if r < 0.8:
        return rng.randint(400, 1000)
    return rng.randint(1000, 2400)  # several hundred tokens: truncation and drop policies matter


def _first_sentence(text: str) -> str:
    prose = " ".join(text.split("\n\n")[0].split())
    m = re.match(r"(.+?[.!?])(\s|$)", prose)
    return (m.group(1) if m else prose).strip()


def conversation(rng: random.Random, secs: list[Section], idx: int) -> dict:
    sec = secs[idx]
    messages = []
    if rng.random() < 0.35:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    qs = SIGNATURE_QUESTIONS if sec.question_kind == "signature" else QUESTIONS
    prose = [p for p in sec.paragraphs if not _is_code(p)]
    start = rng.randrange(len(prose)) if len(prose) > 3 and rng.random() < 0.3 else 0
    start = sec.paragraphs.index(prose[start])
    answer, nxt = _take(sec.paragraphs, start, _budget(rng))
    messages += [{"role": "user", "content": rng.choice(qs).format(sec.topic)},
                 {"role": "assistant", "content": answer}]
    turns = rng.choices([1, 2, 3, 4], weights=[30, 35, 20, 15])[0]
    kind = "first"
    while len(messages) < 2 * turns + (messages[0]["role"] == "system"):
        code = [p for p in sec.paragraphs if _is_code(p)]
        options = ["summary"] * (kind != "summary") + ["more"] * (nxt < len(sec.paragraphs)) + ["example"] * bool(code) \
            + ["neighbour"] * (len(secs) > 1)
        kind = rng.choice(options)
        if kind == "summary":
            q, a = rng.choice(SUMMARY), _first_sentence(answer)
        elif kind == "more":
            (a, nxt), q = _take(sec.paragraphs, nxt, _budget(rng)), rng.choice(MORE)
            if _is_code(a.split("\n\n")[0]) or a[0].isspace():
                a = "Continuing:\n\n" + a
        elif kind == "example":
            q, a = rng.choice(EXAMPLE), "From the documentation:\n\n" + rng.choice(code)
        else:
            idx = (idx + rng.choice([-1, 1])) % len(secs)
            sec = secs[idx]
            a, nxt = _take(sec.paragraphs, 0, _budget(rng))
            q = rng.choice(NEIGHBOUR).format(sec.topic)
        answer = a.strip()
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def build_split(corpus: Path, n: int, seed: str) -> list[dict]:
    with open(corpus, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    secs = [s for d in docs for s in sections(d)]
    rng = random.Random(seed)
    return [conversation(rng, secs, rng.randrange(len(secs))) for _ in range(n)]


def _stats(rows: list[dict]) -> dict:
    from transformers import AutoTokenizer

    from trainer.assets import BUNDLED_TOKENIZER

    tok = AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER))
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    lens = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    turns = [sum(m["role"] == "assistant" for m in r["messages"]) for r in rows]
    return {"n": len(rows), "tokens": sum(lens), "max": max(lens), "over256": sum(x > 256 for x in lens),
            "system": sum(r["messages"][0]["role"] == "system" for r in rows),
            "turns": "/".join(str(turns.count(k)) for k in (1, 2, 3, 4))}


README = """# Bundled chat SFT set

Multi-turn conversations in the `messages` format (`{{"messages": [{{"role": ..., "content": ...}}]}}`, one per
line), for the SFT quickstart and tests. Every assistant answer is real text from CPython's documentation, taken
from the bundled corpus (`../corpus/`: `pydoc_data.topics` and stdlib docstrings of CPython {py}); the
questions, follow-ups and system prompts come from short fixed lists in the generator. Licensed, like the corpus,
under the Python Software Foundation License (`../corpus/LICENSE-PSF.txt`). train.jsonl is made from the
corpus's train.jsonl and val.jsonl from its val.jsonl, so they share no source document.

| split | conversations | with system prompt | 1/2/3/4 assistant turns | tokens (rendered, ChatML) | longest | over 256 tokens |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
{rows}

Generated offline and deterministically by `python -m trainer.assets.build_sft_chat` (`--check` verifies the
committed files); see that module for how sections, answers and follow-ups are chosen.
"""


def write(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = []
    for split, corpus in (("train", BUNDLED_TRAIN), ("val", BUNDLED_VAL)):
        rows = build_split(corpus, COUNTS[split], f"meshtron-sft-chat|{split}")
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        s = _stats(rows)
        table.append(f"| {split}.jsonl | {s['n']} | {s['system']} | {s['turns']} | {s['tokens']} | {s['max']} "
                     f"| {s['over256']} |")
    corpus_readme = (BUNDLED_TRAIN.parent / "README.md").read_text(encoding="utf-8")
    py = re.search(r"CPython (\S+)'s", corpus_readme).group(1)
    (out_dir / "README.md").write_text(README.format(py=py, rows="\n".join(table)), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    return write_or_check(write, OUT_DIR, ["train.jsonl", "val.jsonl", "README.md"], __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
