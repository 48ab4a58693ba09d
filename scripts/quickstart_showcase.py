"""The quickstart's last step: what the base and the tuned model answer to held-out WikiSQL questions, side by side
with the reference, and how often each answers in the learned format.

Usage: python scripts/quickstart_showcase.py BASE_MODEL TUNED_MODEL DATA_DIR [--examples 3] [--count 20]

Decoding is greedy and stops at the end of the answer line (the format's answers are one line); a mild repetition
penalty keeps a 260K-parameter model from looping on one word.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlxtune.inference import generate_text, prompt_format
from mlxtune.runs import open_for_inference

ANSWER_CUE = "A:"
MAX_TOKENS = 48
REPETITION_PENALTY = 1.2


def questions(data_dir: Path) -> list[tuple[str, str]]:
    """(prompt ending with the answer cue, reference answer) for each validation record."""
    out = []
    for line in (data_dir / "valid.jsonl").read_text(encoding="utf-8").splitlines():
        text = json.loads(line)["text"]
        prompt, reference = text.rsplit(ANSWER_CUE, 1)
        out.append((prompt + ANSWER_CUE, reference.strip()))
    return out


def answer(loaded, prompt: str, use_template: bool) -> str:
    text = generate_text(loaded, prompt, max_tokens=MAX_TOKENS, repetition_penalty=REPETITION_PENALTY,
                         use_template=use_template)
    return text.strip().split("\n", 1)[0].strip()


def in_format(answer_text: str) -> bool:
    """The learned format: a SQL query over the question's table."""
    return answer_text.startswith("SELECT ") and " FROM " in answer_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("tuned")
    parser.add_argument("data", type=Path)
    parser.add_argument("--examples", type=int, default=3, help="questions shown side by side")
    parser.add_argument("--count", type=int, default=20, help="questions counted for the format summary")
    args = parser.parse_args()

    models = {"base": open_for_inference(args.base), "tuned": open_for_inference(args.tuned)}
    # Both get the prompt in the tuned model's format (plain text for a text-trained run): the base model on its own
    # would get mlxtune's fallback chat template, a format the comparison is not about.
    use_template = prompt_format(models["tuned"]).kind == "template"
    pairs = questions(args.data)
    counted = pairs[: args.count]
    shown, tables = [], set()  # questions about different tables: the first question of each
    for prompt, reference in pairs:
        table = prompt.split("\n", 1)[0]
        if table not in tables and len(shown) < args.examples:
            tables.add(table)
            shown.append((prompt, reference))

    cache: dict[tuple[str, str], str] = {}

    def answer_of(name: str, prompt: str) -> str:
        if (name, prompt) not in cache:
            cache[name, prompt] = answer(models[name], prompt, use_template)
        return cache[name, prompt]

    for prompt, reference in shown:
        header, question = prompt[: -len(ANSWER_CUE)].rstrip("\n").rsplit("\n", 1)
        print()
        print(header.replace("\n", " · "))
        print(question)
        print(f"  reference  {reference}")
        for name in models:
            print(f"  {name:<9}  {answer_of(name, prompt) or '(nothing)'}")
    answers = {name: [answer_of(name, prompt) for prompt, _ in counted] for name in models}
    print()
    n = len(counted)
    formatted = {name: sum(in_format(a) for a in texts) for name, texts in answers.items()}
    exact = {name: sum(a == ref for a, (_, ref) in zip(texts, counted)) for name, texts in answers.items()}
    print(f"answers in the learned SQL format on {n} held-out questions: base {formatted['base']}/{n}, "
          f"tuned {formatted['tuned']}/{n} (exactly right: base {exact['base']}, tuned {exact['tuned']})")


if __name__ == "__main__":
    main()
