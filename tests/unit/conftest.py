import pytest

from trainer.config import DataConfig
from trainer.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    """The bundled byte-level BPE tokenizer."""
    return load_tokenizer(DataConfig(), None)


@pytest.fixture
def cache(tmp_path):
    """A token cache directory of the test's own."""
    return tmp_path / "cache"
