"""Write recipes/data/tiny_tasks.jsonl: a small, learnable instruction task set for the CI recipe.

Each row asks for a deterministic transformation of a few words (repeat, reverse, uppercase, first letters),
so a tiny model's loss falls quickly and the task is checkable. Run: python -m eval.make_tiny_tasks
"""

import json
import random
from pathlib import Path

WORDS = ("cat dog sun moon tree fish bird star rain snow red blue green gold fast slow big small hot cold "
         "apple bread milk rock sand wind fire lake hill road ship book lamp door key bell coin").split()


def row(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(2, 4))
    text = " ".join(words)
    task = rng.choice(["repeat", "reverse", "upper", "initials"])
    if task == "repeat":
        return {"instruction": "Repeat the words.", "input": text, "output": text}
    if task == "reverse":
        return {"instruction": "Reverse the order of the words.", "input": text, "output": " ".join(words[::-1])}
    if task == "upper":
        return {"instruction": "Write the words in capitals.", "input": text, "output": text.upper()}
    return {"instruction": "Give the first letter of each word.", "input": text, "output": "".join(w[0] for w in words)}


def main() -> None:
    rng = random.Random(0)
    out = Path(__file__).resolve().parent.parent / "recipes" / "data" / "tiny_tasks.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for _ in range(512):
            fh.write(json.dumps(row(rng)) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
