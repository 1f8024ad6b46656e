"""Data with a planted rule that a random tiny model does not know, for tests that training learns something."""

from __future__ import annotations

import random


def q_rankings(n: int, seed: int = 0) -> list[dict]:
    """`n` prompts with 4 answers of random letters each; the more 'q's an answer has, the better."""
    rng = random.Random(seed)

    def answer(q: int) -> str:
        chars = [rng.choice("abcdefghijklmnop") for _ in range(rng.randint(8, 14))] + ["q"] * q
        rng.shuffle(chars)
        return "".join(chars)

    out = []
    for i in range(n):
        qs = rng.sample(range(4), 4)
        order = sorted(range(4), key=lambda j: -qs[j])
        out.append({"prompt": f"Say something, {i}.", "responses": [answer(q) for q in qs], "ranking": order})
    return out
