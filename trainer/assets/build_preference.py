"""Regenerate the bundled preference set ``trainer/assets/preference/`` from the bundled chat SFT set.

    python -m trainer.assets.build_preference            # rewrite preference/{train,val}.jsonl and README.md
    python -m trainer.assets.build_preference --check    # rebuild in a temp dir, fail if anything differs

Each conversation of ``sft_chat/train.jsonl`` (``val.jsonl``) gives one pair: the prompt is every message
before its last assistant turn, the chosen completion is that turn (documentation text that answers the
question), the rejected one is the last answer of another conversation of the same split (an answer to a
different question). So a model can learn the preference from the prompt alone, and the set is licence-clean:
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


def pairs(conversations: list[list[dict]]) -> list[dict]:
    answers = [c[max(i for i, m in enumerate(c) if m["role"] == "assistant")]["content"] for c in conversations]
    out = []
    for i, messages in enumerate(conversations):
        last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
        prompt, chosen = messages[:last], [messages[last]]
        j = (i + _SHIFT) % len(conversations)
        while answers[j] == answers[i]:
            j = (j + 1) % len(conversations)
        rejected = [{"role": "assistant", "content": answers[j]}]
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
committed files). Each SFT conversation gives one pair: the prompt is the conversation up to its last assistant
turn, chosen is that turn, rejected is the last answer of another conversation (an answer to another question).
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
    (out / "README.md").write_text(README.format(**counts), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    return write_or_check(write, OUT_DIR, ["train.jsonl", "val.jsonl", "README.md"], __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
