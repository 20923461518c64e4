"""A character tokenizer for the synthetic digit tasks: three specials, then one id per character.

Built by the project, saved next to a checkpoint as a small JSON file; nothing comes from a hub.
"""

from __future__ import annotations

import json
from pathlib import Path

FILENAME = "char_tokenizer.json"
CHARS = "0123456789+=: abcdefghijklmnopqrstuvwxyz"  # digits first; letters name the task in a prompt
SPECIALS = ("<pad>", "<bos>", "<eos>")


class CharTokenizer:
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __init__(self, chars: str = CHARS):
        if len(set(chars)) != len(chars):
            raise ValueError("tokenizer characters must be distinct")
        self.chars = chars
        self._to_id = {c: i + len(SPECIALS) for i, c in enumerate(chars)}
        self.vocab_size = len(SPECIALS) + len(chars)

    def encode(self, text: str) -> list[int]:
        """One id per character; no BOS/EOS added."""
        try:
            return [self._to_id[c] for c in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the tokenizer's vocabulary") from None

    def decode(self, ids) -> str:
        """Characters of the ids, specials (and ids beyond the vocabulary, e.g. embedding padding) dropped."""
        n = len(SPECIALS)
        return "".join(self.chars[i - n] for i in map(int, ids) if n <= i < self.vocab_size)

    def save(self, folder) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / FILENAME).write_text(json.dumps({"chars": self.chars, "specials": list(SPECIALS)}))

    @classmethod
    def load(cls, folder) -> "CharTokenizer":
        path = Path(folder) / FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no {FILENAME} (save the checkpoint with real.model.save_policy)")
        data = json.loads(path.read_text())
        if tuple(data["specials"]) != SPECIALS:
            raise ValueError(f"{path}: specials {data['specials']} differ from {list(SPECIALS)}")
        return cls(data["chars"])
