"""napo_trainer.NAPOCollator on hand-made rows: the exact tensors it pads, and unpack() undoing it."""
import torch

from napo_trainer import NAPOCollator, unpack

PAD, PAD_ITEM = 0, 99

ROWS = [
    {"prompt_ids": [5, 6, 7], "chosen_ids": [11, 2], "rejected_ids": [[12, 13, 2], [14, 2]],
     "history_ids": [1, 2, 3], "target_id": 40, "negative_ids": [41, 42]},
    {"prompt_ids": [8], "chosen_ids": [15, 16, 17, 2], "rejected_ids": [[18, 2], [19, 2]],
     "history_ids": [4], "target_id": 50, "negative_ids": [51, 52]},
]


def test_collator_pads_every_field_exactly():
    batch = NAPOCollator(PAD, PAD_ITEM)(ROWS)
    assert set(batch) == {"prompt_ids", "prompt_len", "answer_ids", "answer_len", "history_ids", "target_id",
                          "negative_ids"}
    assert torch.equal(batch["prompt_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(batch["prompt_len"], torch.tensor([3, 1]))
    # (B, 1 + K, widest answer of the batch): the chosen answer first, then the K rejected ones
    assert torch.equal(batch["answer_ids"], torch.tensor([
        [[11, 2, 0, 0], [12, 13, 2, 0], [14, 2, 0, 0]],
        [[15, 16, 17, 2], [18, 2, 0, 0], [19, 2, 0, 0]]]))
    assert torch.equal(batch["answer_len"], torch.tensor([[2, 3, 2], [4, 2, 2]]))
    assert torch.equal(batch["history_ids"], torch.tensor([[1, 2, 3], [4, 99, 99]]))  # item padding, not token
    assert torch.equal(batch["target_id"], torch.tensor([40, 50]))
    assert torch.equal(batch["negative_ids"], torch.tensor([[41, 42], [51, 52]]))
    assert all(t.dtype == torch.long for t in batch.values())


def test_collator_carries_precomputed_reference_logps():
    rows = [dict(r, ref_chosen_logps=-1.5 - i, ref_rejected_logps=[-2.0 - i, -3.0 - i]) for i, r in enumerate(ROWS)]
    batch = NAPOCollator(PAD, PAD_ITEM)(rows)
    assert torch.equal(batch["ref_chosen_logps"], torch.tensor([-1.5, -2.5]))
    assert torch.equal(batch["ref_rejected_logps"], torch.tensor([[-2.0, -3.0], [-3.0, -4.0]]))


def test_unpack_returns_the_unpadded_rows():
    prompts, answers = unpack(NAPOCollator(PAD, PAD_ITEM)(ROWS))
    assert prompts == [r["prompt_ids"] for r in ROWS]
    assert answers == [[r["chosen_ids"]] + r["rejected_ids"] for r in ROWS]


def test_collator_one_row_and_empty_history():
    row = dict(ROWS[1], history_ids=[])
    batch = NAPOCollator(PAD, PAD_ITEM)([row])
    assert torch.equal(batch["history_ids"], torch.tensor([[99]]))  # width at least 1
    assert batch["answer_ids"].shape == (1, 3, 4)
