"""The masked LM's evaluation masks, drawn once and for all: every evaluation predicts the same
tokens, on any number of processes and at any batch size, so its losses differ only by what the
model learned; training's masks stay on the random state that checkpoints restore.

Tests (in tests/, unless named otherwise):
- test_pretrain_mlm.py::test_evaluation_masks_the_same_way_every_time
- test_pretrain_mlm.py::test_best_is_scored_on_the_test_file_with_fixed_masks_and_eval_only_too"""

import torch
from transformers import DataCollatorForLanguageModeling


class FixedMasks(torch.utils.data.Dataset):
    """Validation (or test) samples, masked once and for all: sample i's masks come from a
    generator seeded with --seed + i, so every evaluation predicts the same tokens, on any number
    of processes and at any batch size, and losses from one evaluation to the next differ only by
    what the model learned. It has a masker of its own: giving the training loop's masker a
    generator would take training's masks off the global random state that checkpoints restore."""

    def __init__(self, samples, tokenizer, args):
        self.samples, self.seed = samples, args.seed
        self.masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=args.mlm_probability)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample = self.samples[index]
        self.masker.generator = torch.Generator().manual_seed(self.seed + index)
        # The masker takes a batch: [None] makes the one sample a batch of one, [0] takes it back.
        input_ids, labels = self.masker.torch_mask_tokens(
            sample["input_ids"][None].clone(), special_tokens_mask=sample["special_tokens_mask"][None]
        )
        return {"input_ids": input_ids[0], "attention_mask": sample["attention_mask"], "labels": labels[0]}
