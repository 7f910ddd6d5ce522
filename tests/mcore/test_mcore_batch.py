"""The packed micro-batch builder, checked against hand-written expectations."""

import numpy as np
import pytest
import torch

from megatron_hbp.mcore.batch import build_packed_batch

# Two documents: A = [10 11 12 13] (targets: 12, 13), B = [20 21 22] (targets: 21, 22).
A = (np.array([10, 11, 12, 13]), np.array([0, 0, 1, 1], np.uint8))
B = (np.array([20, 21, 22]), np.array([0, 1, 1], np.uint8))
PAD = 99


def test_labels_positions_masks_by_hand():
    b = build_packed_batch([A, B], [4, 3], pad_id=PAD, sample_indices=[5, 7])
    assert b.tokens.tolist() == [10, 11, 12, 13, 20, 21, 22]
    # shifted inside each document; the last token of a document predicts nothing
    assert b.labels.tolist() == [11, 12, 13, 0, 21, 22, 0]
    assert b.loss_mask.tolist() == [0, 1, 1, 0, 1, 1, 0]
    assert b.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert b.cu_seqlens.tolist() == [0, 4, 7]
    assert b.cu_seqlens_padded.tolist() == [0, 4, 7]
    assert b.cu_seqlens.dtype == torch.int32
    assert b.loss_tokens == 4 and b.local_loss_tokens == 4 and b.denominator == 4
    assert b.sample_indices == [5, 7] and b.num_tokens == 7
    assert b.loss_weight.tolist() == [0, 1, 1, 0, 1, 1, 0]


def test_padding_inside_documents():
    b = build_packed_batch([A, B], [4, 4], pad_id=PAD)
    assert b.tokens.tolist() == [10, 11, 12, 13, 20, 21, 22, PAD]
    assert b.labels.tolist() == [11, 12, 13, 0, 21, 22, 0, 0]
    assert b.loss_mask.tolist() == [0, 1, 1, 0, 1, 1, 0, 0]
    assert b.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert b.cu_seqlens.tolist() == [0, 4, 7]
    assert b.cu_seqlens_padded.tolist() == [0, 4, 8]


def test_loss_normalizations_by_hand():
    # micro-batch mean: weight 1/4 on each of the 4 loss tokens, denominator 1
    mb = build_packed_batch([A, B], [4, 3], loss_normalization="micro_batch_mean")
    assert mb.loss_weight.tolist() == [0, 0.25, 0.25, 0, 0.25, 0.25, 0]
    assert mb.denominator == 1
    # sample mean: A has 2 loss tokens (12 and 13 as targets: positions 1, 2), B has 2
    sm = build_packed_batch([A, (np.array([20, 21, 22, 23]), np.array([0, 1, 1, 1], np.uint8))], [4, 4],
                            loss_normalization="sample_mean")  # fmt: skip
    assert sm.loss_weight.tolist()[:4] == [0, 0.5, 0.5, 0]
    assert sm.loss_weight[4:].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0])
    assert sm.denominator == 2


def test_cp2_shard_by_hand():
    pytest.importorskip("megatron_hbp.cp")
    # cp=2: each document padded to a multiple of 4 and cut into 4 chunks; rank r keeps r and 3-r
    b0 = build_packed_batch([A, B], [4, 4], pad_id=PAD, cp=2, cp_rank=0)
    b1 = build_packed_batch([A, B], [4, 4], pad_id=PAD, cp=2, cp_rank=1)
    assert b0.tokens.tolist() == [10, 13, 20, PAD]
    assert b1.tokens.tolist() == [11, 12, 21, 22]
    assert b0.labels.tolist() == [11, 0, 21, 0]
    assert b1.labels.tolist() == [12, 13, 22, 0]
    assert b0.position_ids.tolist() == [0, 3, 0, 3]
    assert b1.position_ids.tolist() == [1, 2, 1, 2]
    assert b0.loss_mask.tolist() == [0, 0, 1, 0] and b1.loss_mask.tolist() == [1, 1, 1, 0]
    # the global layout is kept; loss tokens split over the ranks and add up
    assert b0.cu_seqlens_padded.tolist() == [0, 4, 8] and b0.cu_seqlens.tolist() == [0, 4, 7]
    assert b0.local_loss_tokens + b1.local_loss_tokens == b0.loss_tokens == 4
    assert b0.denominator + b1.denominator == 4
    mb0 = build_packed_batch([A, B], [4, 4], cp=2, cp_rank=0, loss_normalization="micro_batch_mean")
    mb1 = build_packed_batch([A, B], [4, 4], cp=2, cp_rank=1, loss_normalization="micro_batch_mean")
    assert (mb0.denominator, mb1.denominator) == (1, 0)  # counted once per micro-batch


def test_padding_only_micro_batch():
    b = build_packed_batch([], [], pad_id=PAD, cp=1)
    assert b.tokens.tolist() == [PAD, PAD]
    assert b.loss_mask.sum() == 0 and b.loss_tokens == 0 and b.denominator == 0
    assert b.cu_seqlens_padded.tolist() == [0, 2]
    assert b.lengths == [0] and b.sample_indices == [-1]


def test_padding_only_micro_batch_with_cp():
    pytest.importorskip("megatron_hbp.cp")
    shards = [build_packed_batch([], [], pad_id=PAD, cp=2, cp_rank=r) for r in (0, 1)]
    for b in shards:
        assert b.tokens.tolist() == [PAD, PAD] and b.position_ids.numel() == 2
        assert b.loss_mask.sum() == 0 and b.denominator == 0 and b.local_loss_tokens == 0
        assert b.cu_seqlens_padded.tolist() == [0, 4] and b.cu_seqlens.tolist() == [0, 0]
    assert sorted(shards[0].position_ids.tolist() + shards[1].position_ids.tolist()) == [0, 1, 2, 3]


def test_bad_inputs():
    with pytest.raises(ValueError, match="shorter than the document"):
        build_packed_batch([A], [3])
    with pytest.raises(ValueError, match="padded lengths"):
        build_packed_batch([A, B], [4])
    with pytest.raises(ValueError, match="loss_normalization"):
        build_packed_batch([A], [4], loss_normalization="mean")
