"""The shared shape of tokenized data: documents (or conversations) back to back, with boundaries.

Every source format ends up here (pretraining text, Megatron indexed files, chat SFT), and packing reads
only this, so formats and packing never need to know about each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class TokenizedCorpus:
    """Token ids of all documents back to back; document i is tokens[offsets[i]:offsets[i + 1]].

    ``targets`` (SFT) marks the tokens the model is trained to predict (assistant turns); None means every
    token is a target (pretraining). Document i's targets are targets[offsets[i]:offsets[i + 1]].
    """

    name: str
    tokens: np.ndarray  # uint32 [num_tokens], often memory-mapped from the cache
    offsets: np.ndarray  # int64 [num_docs + 1]
    targets: Optional[np.ndarray] = None  # bool [num_tokens]
    # Identity of the tokenized contents (the token cache's key, or the Megatron files' path/size/mtime): what
    # indices derived from the corpus (packed-row plans) are cached under. None: nothing derived is cached.
    key: Optional[str] = None
    # Every non-empty document already ends with the EOS the packer appends (a Megatron corpus made with
    # --append-eod): the packer then predicts that token instead of appending a second one, so the rows equal
    # those of the same documents without it.
    eod: bool = False
    # Preference pairs (trainer/data/preference.py): documents 2i and 2i + 1 are pair i's chosen and rejected
    # (prompt + completion each), which packing keeps in one row.
    pairs: bool = False

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def doc_targets(self, i: int) -> Optional[np.ndarray]:
        return None if self.targets is None else self.targets[self.offsets[i]:self.offsets[i + 1]]
