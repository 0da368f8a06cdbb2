"""A reversible word-level tokenizer for workload tests (no model needed)."""

from __future__ import annotations


class WordTokenizer:
    """One token per whitespace-separated word, reversibly: 'w<i>' is id i (i < vocab, what
    random_text draws), any other word gets an id of its own above the vocabulary."""

    def __init__(self, vocab: int = 5000):
        self.vocab = vocab
        self.ids: dict[str, int] = {}
        self.words: dict[int, str] = {}

    def __len__(self):
        return self.vocab

    def _id(self, word: str) -> int:
        if word[0] == "w" and word[1:].isdigit() and int(word[1:]) < self.vocab:
            return int(word[1:])
        if word not in self.ids:
            self.ids[word] = self.vocab + len(self.ids)
            self.words[self.ids[word]] = word
        return self.ids[word]

    def encode(self, text, add_special_tokens=True):
        return [self._id(word) for word in text.split()]

    def decode(self, ids):
        return " ".join(self.words.get(i, f"w{i}") for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        text = " ".join(f"<{m['role']}> {m['content']}" for m in messages)
        return text + (" <assistant>" if add_generation_prompt else "")
