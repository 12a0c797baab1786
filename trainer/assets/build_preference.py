"""Regenerate the bundled preference set ``trainer/assets/preference/`` from the bundled chat SFT set.

    python -m trainer.assets.build_preference            # rewrite preference/{train,val}.jsonl and README.md
    python -m trainer.assets.build_preference --check    # rebuild in a temp dir, fail if anything differs

Each conversation of ``sft_chat/train.jsonl`` (``val.jsonl``) gives one pair from its first exchange: the
prompt is its system prompt (if any) and first question, the chosen completion the first answer (documentation
text that answers the question), the rejected one another conversation's first answer of the same split (an
answer to a different question); both are cut to their first sentences within _MAX_CHARS characters. So a model can learn the preference from the prompt alone, and the set is licence-clean:
the text is the SFT set's, itself CPython's documentation (PSF License, ``../corpus/LICENSE-PSF.txt``).
Every fourth pair is written in the implicit-prompt form (``chosen``/``rejected`` hold the whole conversations,
sharing the prompt messages), the others with an explicit ``prompt``.

Deterministic: no randomness, no clock; inputs read in file order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from trainer.assets import write_or_check

ASSETS = Path(__file__).resolve().parent
SOURCE_DIR = ASSETS / "sft_chat"
OUT_DIR = ASSETS / "preference"
_SHIFT = 7  # the rejected answer is the one of conversation i + 7 (mod n), or the next that differs
_IMPLICIT_EVERY = 4
# Answers cut to their first sentences within this many characters: a pair then fits a 256-token row (the
# quickstart's data.seq_len) with room to spare, so `python -m trainer data=preference trainer.objective=dpo`
# trains on whole pairs in about a minute on a CPU.
_MAX_CHARS = 240


def short_answer(text: str) -> str:
    """The answer's first paragraph, cut after its last full sentence within _MAX_CHARS (else at a word)."""
    first = text.split("\n\n", 1)[0].strip()
    if len(first) <= _MAX_CHARS:
        return first
    head = first[:_MAX_CHARS]
    end = max(head.rfind(". "), head.rfind(".\n"))
    return head[:end + 1].strip() if end > 0 else head.rsplit(" ", 1)[0].strip()


def pairs(conversations: list[list[dict]]) -> list[dict]:
    """One pair per conversation: its first exchange (with the system prompt, if any) and another's answer."""
    firsts = []
    for messages in conversations:
        user = next(k for k, m in enumerate(messages) if m["role"] == "user")
        prompt = messages[:user + 1]
        firsts.append((prompt, short_answer(messages[user + 1]["content"])))
    out = []
    for i, (prompt, answer) in enumerate(firsts):
        j = (i + _SHIFT) % len(firsts)
        while firsts[j][1] == answer:
            j = (j + 1) % len(firsts)
        chosen = [{"role": "assistant", "content": answer}]
        rejected = [{"role": "assistant", "content": firsts[j][1]}]
        if i % _IMPLICIT_EVERY == _IMPLICIT_EVERY - 1:
            out.append({"chosen": prompt + chosen, "rejected": prompt + rejected})
        else:
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def _read(path: Path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


README = """# Bundled preference set

Preference pairs in TRL's formats for `data=preference` (`trainer.objective=dpo`) and its tests, made from the
bundled chat SFT set (`../sft_chat/`) by `python -m trainer.assets.build_preference` (`--check` verifies the
committed files). Each SFT conversation gives one pair from its first exchange: the prompt is its system prompt
(if any) and first question, chosen is the first answer and rejected another conversation's first answer (an
answer to another question), both cut to their first sentences within {max_chars} characters, so that a pair
fits a 256-token row.
Every fourth pair uses the implicit-prompt form (`{{"chosen": [messages], "rejected": [messages]}}` sharing the
prompt messages), the others `{{"prompt": [messages], "chosen": [messages], "rejected": [messages]}}`. The text
is CPython's documentation, licensed under the Python Software Foundation License (`../corpus/LICENSE-PSF.txt`).

| split | pairs | implicit prompt |
| --- | ---: | ---: |
| train.jsonl | {train} | {train_implicit} |
| val.jsonl | {val} | {val_implicit} |
"""


def write(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val"):
        rows = pairs(_read(SOURCE_DIR / f"{split}.jsonl"))
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                            encoding="utf-8")
        counts[split], counts[f"{split}_implicit"] = len(rows), sum("prompt" not in r for r in rows)
    (out / "README.md").write_text(README.format(max_chars=_MAX_CHARS, **counts), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    return write_or_check(write, OUT_DIR, ["train.jsonl", "val.jsonl", "README.md"], __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
