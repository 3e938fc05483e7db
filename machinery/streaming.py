"""--streaming: text larger than the disk, tokenized and packed as training reads it, and a resumed
run going on with the very next block (a checkpoint records the place of the blocks used, not of
those fetched ahead).

Tests (in tests/, unless named otherwise):
- test_finetune_gpt2.py::test_a_stream_packs_like_a_token_file_and_resumes_at_any_block
- test_finetune_gpt2.py::test_a_stream_keeps_the_places_a_large_job_needs
- test_finetune_gpt2.py::test_streaming_trains_and_a_killed_run_resumes_at_its_place_in_the_stream
"""

import collections
import itertools

import numpy as np
import torch

from machinery.token_files import lm_sample


class StreamedBlocks(torch.utils.data.IterableDataset):
    """Training samples from a stream of lines (--streaming): the lines tokenized 1,000 at a time
    and packed into one stream of blocks of `block_size` tokens, as from a token file (or each
    line, block_size None), `special_ids` as in TokenSamples. It notes where in the stream each
    block it gives ends, so a checkpoint records the place of the blocks training has used
    (position_after), not of those the DataLoader already fetched ahead, and a run resumed there
    (start_at) goes on with the very next block. The stream is read in order: a shuffle buffer
    could not be restored exactly."""

    def __init__(self, lines, tokenize, block_size=None, special_ids=None):
        self.lines, self.tokenize, self.block_size = lines, tokenize, block_size
        self.special_ids = None if special_ids is None else np.array(sorted(special_ids))
        # Where the last blocks given end (none kept until start_at says how many).
        self.start, self.positions = None, collections.deque(maxlen=0)

    def start_at(self, position, keep):
        """Start the next pass at `position` (None: the stream's beginning), keeping the places of
        the last `keep` blocks given: at least as many as the DataLoader fetches ahead of the
        blocks training has used (Run keeps several global micro-batches: a fixed number would
        fail on a large enough job)."""
        self.start, self.positions = position, collections.deque(maxlen=keep)

    def position_after(self, blocks):
        """Where the stream stands once `blocks` of its blocks (counted from its beginning, across
        resumed runs) are used: the batch of lines that holds the next block's first token, the
        line in it, and the token in that line."""
        for position in self.positions:
            if position["given"] == blocks:
                return position
        return self.start  # none given yet in this run: where it started

    def __iter__(self):
        start, self.start = self.start or {"given": 0, "source": None, "line": 0, "token": 0}, None
        if start["source"] is not None:
            self.lines.load_state_dict(start["source"])
        given, buffer, source, resuming = start["given"], [], start["source"], True
        lines = iter(self.lines)
        while True:
            batch = [row["text"] for row in itertools.islice(lines, 1000)]
            if not batch:
                return
            for number, ids in enumerate(self.tokenize(batch)):
                offset = 0  # where in the line its tokens start: a resumed run may have used the first ones
                if resuming and number < start["line"]:  # lines a resumed run has used already
                    continue
                if resuming and number == start["line"]:
                    offset = start["token"]
                resuming = False
                for piece, rest in self.cut(buffer, ids[offset:]):
                    given += 1
                    # After this block: this batch of lines, the line (or the next one), the token
                    # the rest begins at.
                    line, token = (number, len(ids) - rest) if rest else (number + 1, 0)
                    self.positions.append({"given": given, "source": source, "line": line, "token": token})
                    yield lm_sample(piece, self.special_ids)
            source, resuming = self.lines.state_dict(), False  # where the next batch starts (a copy)

    def cut(self, buffer, ids):
        """The blocks that `ids` completes, each with how many tokens of the stream are left
        after it (they stay in `buffer`, for the next block); a line as it is without block_size."""
        if self.block_size is None:
            return [(ids, 0)]
        buffer.extend(ids)
        blocks, start = [], 0
        while len(buffer) - start >= self.block_size:
            blocks.append((buffer[start : start + self.block_size], len(buffer) - start - self.block_size))
            start += self.block_size
        del buffer[:start]
        return blocks
