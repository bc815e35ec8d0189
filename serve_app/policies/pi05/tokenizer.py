"""PaliGemma's SentencePiece tokenizer from a local file, and pi05's prompt.

The prompt OpenTau trains pi05 with (discrete state):

    "Task: {prompt}, State: {b_0} {b_1} ... {b_n};\\n"   b_i = bin of normalised state i in 0..255

tokenised as <bos> + pieces, right-truncated and right-padded (id 0) to
`prompt_max_length`, exactly as Hugging Face's Gemma tokenizer does it. The
tokenizer file is never fetched from a hub: it must sit in the checkpoint
directory (or at `policy.tokenizer_path`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from serve_app.checkpoint import CheckpointError

TOKENIZER_FILE = "tokenizer.model"


def discretize_state(state: torch.Tensor) -> list[str]:
    """(B, S) normalised state -> per sample "b_0 b_1 ..." with 256 bins over [-1, 1]."""
    bins = ((state.float().cpu().clamp(-1.0, 1.0) + 1.0) * 128.0).long().clamp(0, 255)
    return [" ".join(map(str, row)) for row in bins.tolist()]


def pi05_prompts(tasks: list[str], state_bins: list[str] | None) -> list[str]:
    if state_bins is None:  # continuous state: the state enters as an embedding after the text
        return [f"Task: {task}, " for task in tasks]
    return [f"Task: {task}, State: {bins};\n" for task, bins in zip(tasks, state_bins)]


class PromptTokenizer:
    def __init__(self, model_path: Path, max_length: int):
        try:
            import sentencepiece
        except ImportError:
            raise CheckpointError("pi05 needs the `sentencepiece` package: pip install sentencepiece") from None
        self.path = model_path
        self.max_length = max_length
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        self.bos_id = self.sp.bos_id()
        self.pad_id = max(self.sp.pad_id(), 0)

    @classmethod
    def locate(cls, candidates: list[Path], max_length: int, vocab_size: int) -> PromptTokenizer:
        for path in candidates:
            if path.is_file():
                tok = cls(path, max_length)
                if tok.sp.get_piece_size() > vocab_size:
                    raise CheckpointError(
                        f"{path}: tokenizer has {tok.sp.get_piece_size()} pieces but the model embeds only "
                        f"{vocab_size}; this is not the checkpoint's tokenizer"
                    )
                return tok
        tried = ", ".join(str(p) for p in candidates)
        raise CheckpointError(
            f"pi05: PaliGemma tokenizer not found (looked at: {tried}). Copy PaliGemma's SentencePiece file "
            f"`{TOKENIZER_FILE}` (from google/paligemma-3b-pt-224, 4.3 MB) into the checkpoint directory, or set "
            "policy.tokenizer_path in train_config.json. It is never downloaded at run time."
        )

    def encode(self, text: str) -> list[int]:
        """Pieces without <bos>/<eos> (Hugging Face's add_special_tokens=False)."""
        return self.sp.encode(text)

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids (B, max_length) int64, mask (B, max_length) bool."""
        ids = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(prompts), self.max_length), dtype=bool)
        for i, seq in enumerate(self.sp.encode(prompts)):
            seq = ([self.bos_id] + seq)[: self.max_length]
            ids[i, : len(seq)] = seq
            mask[i, : len(seq)] = True
        return torch.from_numpy(ids), torch.from_numpy(mask)
