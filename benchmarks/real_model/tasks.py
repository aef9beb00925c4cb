"""Task families for the real model (SmolLM2-135M-Instruct): short questions with a one-token-ish answer, generated
by code (no hub data), asked through the model's own chat template (its default system turn included), scored by a
rule. `FAMILIES` are the candidates `abilities` measures; the benchmark trains on the ones where groups are mixed.
"""

import random
import re

from datasets import Dataset

NUMBER = re.compile(r"-?\d+")
WORD = re.compile(r"[A-Za-z]+")


# Countries and capitals: a lookup the model knows for famous countries, less for others.
CAPITALS = (
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Germany", "Berlin"),
    ("Spain", "Madrid"),
    ("Egypt", "Cairo"),
    ("Russia", "Moscow"),
    ("Canada", "Ottawa"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("China", "Beijing"),
    ("India", "Delhi"),
    ("Greece", "Athens"),
    ("Portugal", "Lisbon"),
    ("Austria", "Vienna"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"),
    ("Hungary", "Budapest"),
    ("Ireland", "Dublin"),
    ("Belgium", "Brussels"),
    ("Netherlands", "Amsterdam"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("Indonesia", "Jakarta"),
    ("Philippines", "Manila"),
    ("Argentina", "Aires"),
    ("Chile", "Santiago"),
    ("Colombia", "Bogota"),
    ("Venezuela", "Caracas"),
    ("Cuba", "Havana"),
    ("Mexico", "Mexico"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Syria", "Damascus"),
    ("Turkey", "Ankara"),
    ("Ukraine", "Kyiv"),
    ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"),
    ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"),
    ("Czechia", "Prague"),
    ("Afghanistan", "Kabul"),
    ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"),
    ("Nepal", "Kathmandu"),
    ("Ethiopia", "Ababa"),
    ("Nigeria", "Abuja"),
    ("Ghana", "Accra"),
    ("Morocco", "Rabat"),
    ("Algeria", "Algiers"),
    ("Tunisia", "Tunis"),
    ("Senegal", "Dakar"),
    ("Uganda", "Kampala"),
    ("Australia", "Canberra"),
    ("Mongolia", "Ulaanbaatar"),
    ("Iceland", "Reykjavik"),
    ("Estonia", "Tallinn"),
)


def _capital(rng: random.Random) -> tuple[str, str]:
    country, city = rng.choice(CAPITALS)
    return f"What is the capital of {country}?", city


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return f"What is {a} + {b}?", str(a + b)


def _larger(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(10, 100), 2)
    return f"Which number is larger, {a} or {b}?", str(max(a, b))


# family -> (problem generator, answer kind). "number": the completion's last number is the answer (the model states
# a sum after restating the question); "word": the answer appears in the completion as a word.
FAMILIES = {"capital": (_capital, "word"), "addition": (_addition, "number"), "larger": (_larger, "number")}


def extract(text: str, kind: str) -> str | None:
    """The completion's last number ("number"); its words, lower-cased and space-joined ("word")."""
    if kind == "number":
        numbers = NUMBER.findall(text)
        return numbers[-1] if numbers else None
    return " ".join(WORD.findall(text)).lower()


def is_correct(text: str, answer: str, kind: str) -> bool:
    found = extract(text, kind)
    if kind == "number":
        return found == answer
    return f" {answer.lower()} " in f" {found} "


def reward(completions: list, answer: list, kind: list, **kwargs) -> list[float]:
    """1.0 where the completion states the answer (`is_correct`), else 0.0."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(is_correct(t, a, k)) for t, a, k in zip(texts, answer, kind, strict=True)]


def make_dataset(family: str, num: int, seed: int, exclude: set[str] = frozenset()) -> Dataset:
    """`num` problems of `family` (conversational prompts; `answer` and `kind` columns) sampled with `seed`, none of
    whose questions is in `exclude` (a test set kept from training); distinct problems first, then, when the family
    has fewer than `num` (the capitals), the same ones again in the same order."""
    generate, kind = FAMILIES[family]
    rng, rows, seen, misses = random.Random(f"{family}-{seed}"), [], set(exclude), 0
    while len(rows) < num and misses < 1000:
        question, answer = generate(rng)
        if question in seen:
            misses += 1
            continue
        seen.add(question)
        misses = 0
        rows.append({"prompt": [{"role": "user", "content": question}], "answer": answer, "kind": kind})
    if not rows:
        raise ValueError(f"no {family} problem is left outside `exclude`")
    return Dataset.from_list([rows[i % len(rows)] for i in range(num)])


def questions(dataset: Dataset) -> set[str]:
    return {prompt[-1]["content"] for prompt in dataset["prompt"]}
