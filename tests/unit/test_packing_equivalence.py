"""Packing changes nothing but speed: the same conversations and weights give the same token-mean loss
packed (several per row, document-isolated attention) or padded (one per row)."""

import torch

from trainer.config import DataConfig, DataSource, ModelConfig
from trainer.data.packing import pack_corpus
from trainer.data.sft import BUNDLED_SFT_VAL, load_sft_corpus
from trainer.data.tokenizer import load_tokenizer
from trainer.loss import count_valid, cross_entropy_sum
from trainer.model import GPTModel


def _token_mean_loss(model, rows) -> tuple[float, int]:
    total, valid = 0.0, 0
    with torch.no_grad():
        for i in range(0, rows.num_rows, 8):
            part = {k: torch.from_numpy(getattr(rows, k)[i:i + 8]).long() for k in rows.FIELDS}
            logits = model(part["input_ids"], position_ids=part["position_ids"], document_ids=part["document_ids"])
            total += float(cross_entropy_sum(logits, part["labels"]))
            valid += count_valid(part["labels"])
    return total / valid, valid


def test_packed_and_padded_rows_give_the_same_token_mean_loss(tmp_path):
    data_cfg = DataConfig(format="messages", seq_len=256, overlong="drop")
    tokenizer = load_tokenizer(data_cfg, None)
    corpus = load_sft_corpus(DataSource(path=str(BUNDLED_SFT_VAL), format="messages"), tokenizer, data_cfg, tmp_path)
    packed = pack_corpus(corpus, 256, None, packing=True, overlong="drop")
    padded = pack_corpus(corpus, 256, None, packing=False, overlong="drop")
    assert packed.num_rows < padded.num_rows and packed.efficiency > 0.9 > padded.efficiency
    model = GPTModel(ModelConfig(vocab_size=2048, hidden_size=64, ffn_hidden_size=128, num_layers=2,
                                 num_attention_heads=4, num_query_groups=2, max_position_embeddings=512), seed=3)
    loss_packed, n_packed = _token_mean_loss(model, packed)
    loss_padded, n_padded = _token_mean_loss(model, padded)
    assert n_packed == n_padded > 0
    assert abs(loss_packed - loss_padded) <= 1e-5 * loss_padded
