"""napo_trainer.NAPOCollator on hand-made rows: the exact batch it makes. Token sequences stay the rows' own
lists (scoring.answer_logps pads them, once); item ids become tensors, histories left-padded as the SASRec takes
them."""
import torch

from napo_trainer import NAPOCollator

PAD_ITEM = 99

ROWS = [
    {"prompt_ids": [5, 6, 7], "chosen_ids": [11, 2], "rejected_ids": [[12, 13, 2], [14, 2]],
     "history_ids": [1, 2, 3], "target_id": 40, "negative_ids": [41, 42]},
    {"prompt_ids": [8], "chosen_ids": [15, 16, 17, 2], "rejected_ids": [[18, 2], [19, 2]],
     "history_ids": [4], "target_id": 50, "negative_ids": [51, 52]},
]


def test_collator_makes_every_field_exactly():
    batch = NAPOCollator(PAD_ITEM)(ROWS)
    assert set(batch) == {"prompt_ids", "answer_ids", "history_ids", "target_id", "negative_ids"}
    # token sequences: the unpadded rows, the chosen answer first, then the K rejected ones
    assert batch["prompt_ids"] == [[5, 6, 7], [8]]
    assert batch["answer_ids"] == [[[11, 2], [12, 13, 2], [14, 2]], [[15, 16, 17, 2], [18, 2], [19, 2]]]
    # item padding on the left, newest item last (the SASRec's layout)
    assert torch.equal(batch["history_ids"], torch.tensor([[1, 2, 3], [99, 99, 4]]))
    assert torch.equal(batch["target_id"], torch.tensor([40, 50]))
    assert torch.equal(batch["negative_ids"], torch.tensor([[41, 42], [51, 52]]))
    assert all(batch[k].dtype == torch.long for k in ("history_ids", "target_id", "negative_ids"))


def test_collator_carries_precomputed_reference_logps():
    rows = [dict(r, ref_chosen_logps=-1.5 - i, ref_rejected_logps=[-2.0 - i, -3.0 - i]) for i, r in enumerate(ROWS)]
    batch = NAPOCollator(PAD_ITEM)(rows)
    assert torch.equal(batch["ref_chosen_logps"], torch.tensor([-1.5, -2.5]))
    assert torch.equal(batch["ref_rejected_logps"], torch.tensor([[-2.0, -3.0], [-3.0, -4.0]]))


def test_collator_without_a_sasrec_reads_no_history():
    batch = NAPOCollator()(ROWS)  # plain S-DPO: no SASRec, so no padding id and no history tensor
    assert set(batch) == {"prompt_ids", "answer_ids", "target_id", "negative_ids"}


def test_collator_one_row_and_empty_history():
    row = dict(ROWS[1], history_ids=[])
    batch = NAPOCollator(PAD_ITEM)([row])
    assert torch.equal(batch["history_ids"], torch.tensor([[99]]))  # width at least 1
    assert batch["answer_ids"] == [[[15, 16, 17, 2], [18, 2], [19, 2]]]
