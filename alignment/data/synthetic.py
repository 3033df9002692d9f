"""Generator of the bundled preference data set ``prefs.jsonl`` (run it to regenerate; the output is committed).

    python -m prefuse.alignment.data.synthetic            # rewrites alignment/data/prefs.jsonl
    python -m prefuse.alignment.data.synthetic --check    # verifies the committed file is up to date

Every record is a short question about a small invented world (capitals and rivers of invented countries,
legs of animals, sums, colours, safety tips) with two answers:

- ``chosen``: a friendly opener, then correct facts, e.g. "Sure! The capital of Vorland is Tamek. ...";
- ``rejected``: a curt opener, then wrong (sometimes rambling) facts, e.g. "Whatever. The capital of ...".

The difference is systematic (opener, correctness, tone), so a tiny model learns the preference within a few
hundred steps. Each record also carries what every method of prefuse needs:

- ``chosen_sentences`` / ``rejected_sentences`` with ``*_sentence_labels`` (True = supported fact) for
  FactAlign: the factual sentences, each a verbatim substring of its answer; openers are outside sentences;
- ``p_chosen`` / ``p_rejected``: estimated win rates in [0, 1] (SPPO);
- ``s_chosen`` / ``s_rejected``: general-preference scores (GPO / GPM);
- ``split``: ``train`` or ``test``.

The unpaired view (KTO, FactAlign) is derived by ``load_preference_data(view="unpaired")``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DATA_FILE = Path(__file__).with_name("prefs.jsonl")
SEED = 1234
N_TRAIN = 320
N_TEST = 32

_SYLLABLES = [
    "ka",
    "lo",
    "ven",
    "tar",
    "mi",
    "dor",
    "su",
    "bel",
    "ra",
    "nim",
    "ok",
    "zel",
    "fa",
    "gru",
    "te",
    "vo",
]
_FEATURES = [
    "the Grey River",
    "a green lake",
    "the north coast",
    "two tall hills",
    "a quiet bay",
    "the old forest",
]
_ANIMALS = {
    "cat": 4,
    "dog": 4,
    "spider": 8,
    "bird": 2,
    "ant": 6,
    "horse": 4,
    "crab": 10,
    "duck": 2,
    "beetle": 6,
    "cow": 4,
    "hen": 2,
    "octopus": 8,
}
_THINGS = {
    "grass": "green",
    "the sky": "blue",
    "snow": "white",
    "coal": "black",
    "a banana": "yellow",
    "a tomato": "red",
    "an orange": "orange",
    "the sea": "blue",
    "milk": "white",
    "a lemon": "yellow",
}
_COLOURS = sorted(set(_THINGS.values()) | {"purple", "pink", "brown"})
_TIPS = {
    "cycling": ("Wear a helmet.", "Use lights at night.", "Helmets are useless."),
    "swimming": ("Swim near a lifeguard.", "Never swim alone.", "Swim alone after dark."),
    "cooking": ("Keep knives sharp.", "Turn pot handles inward.", "Leave the stove on."),
    "hiking": ("Carry enough water.", "Tell someone your route.", "Water is not needed."),
    "driving": ("Wear a seat belt.", "Keep a safe distance.", "Seat belts are optional."),
    "skiing": ("Wear a helmet.", "Stay on marked runs.", "Ski off the marked runs."),
}
_KIND_OPENERS = ["Sure!", "Happy to help.", "Good question!", "Of course."]
_CURT_OPENERS = ["Whatever.", "No idea, but fine.", "Ugh, okay.", "Not sure, honestly."]
_KIND_CLOSERS = ["Hope this helps.", "Let me know if you need more.", ""]
_CURT_CLOSERS = ["Figure out the rest.", "That is all.", "Do not ask again.", ""]


def _name(rng: random.Random, used: set[str]) -> str:
    while True:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        if word not in used:
            used.add(word)
            return word


def _answer(
    rng: random.Random, facts: list[tuple[str, bool]], kind: bool
) -> tuple[str, list[str], list[bool]]:
    """``opener facts... closer``: the text and its factual sentences with labels (openers are not facts)."""
    opener = rng.choice(_KIND_OPENERS if kind else _CURT_OPENERS)
    closer = rng.choice(_KIND_CLOSERS if kind else _CURT_CLOSERS)
    text = " ".join([opener] + [s for s, _ in facts] + ([closer] if closer else []))
    return text, [s for s, _ in facts], [label for _, label in facts]


def _world(rng: random.Random) -> dict[str, tuple[str, str]]:
    used: set[str] = set()
    return {_name(rng, used): (_name(rng, used), rng.choice(_FEATURES)) for _ in range(24)}


def _record(rng: random.Random, world: dict[str, tuple[str, str]]) -> dict:
    topic = rng.choice(["capital", "capital", "legs", "sum", "colour", "tip"])
    if topic == "capital":
        country = rng.choice(sorted(world))
        capital, feature = world[country]
        wrong = rng.choice([c for c, _ in world.values() if c != capital])
        wrong_feature = rng.choice([f for f in _FEATURES if f != feature])
        prompt = rng.choice(
            [
                f"What is the capital of {country}?",
                f"Tell me about the capital of {country}.",
                f"Which city is the capital of {country}?",
            ]
        )
        good = [(f"The capital of {country} is {capital}.", True), (f"{capital} lies near {feature}.", True)]
        bad = [(f"The capital of {country} is {wrong}.", False)]
        bad.append(
            (f"{capital} lies near {feature}.", True)
            if rng.random() < 0.4
            else (f"{wrong} lies near {wrong_feature}.", False)
        )
    elif topic == "legs":
        animal = rng.choice(sorted(_ANIMALS))
        legs = _ANIMALS[animal]
        wrong = rng.choice([n for n in (1, 2, 3, 4, 5, 6, 7, 8, 10, 12) if n != legs])
        prompt = rng.choice([f"How many legs does a {animal} have?", f"Count the legs of a {animal}."])
        good = [(f"A {animal} has {legs} legs.", True)]
        bad = [(f"A {animal} has {wrong} legs.", False)]
        if rng.random() < 0.5:
            good.append((f"Two {animal}s have {2 * legs} legs.", True))
            bad.append((f"Two {animal}s have {2 * wrong + 1} legs.", False))
    elif topic == "sum":
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3, 10])
        prompt = rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}.", f"Compute {a} + {b}."])
        good = [(f"{a} plus {b} is {a + b}.", True)]
        bad = [(f"{a} plus {b} is {wrong}.", False)]
    elif topic == "colour":
        thing = rng.choice(sorted(_THINGS))
        colour = _THINGS[thing]
        wrong = rng.choice([c for c in _COLOURS if c != colour])
        prompt = rng.choice([f"What colour is {thing}?", f"Describe the colour of {thing}."])
        good = [(f"{thing[0].upper() + thing[1:]} is {colour}.", True)]
        bad = [(f"{thing[0].upper() + thing[1:]} is {wrong}.", False)]
    else:
        activity = rng.choice(sorted(_TIPS))
        tip1, tip2, bad_tip = _TIPS[activity]
        prompt = rng.choice([f"How do I stay safe when {activity}?", f"Give me a safety tip for {activity}."])
        good = [(tip1, True), (tip2, True)]
        bad = [(bad_tip, False)] + ([(tip1, True)] if rng.random() < 0.3 else [])
    if rng.random() < 0.3:  # some rejected answers ramble: longer than the chosen one (SamPO's length bias)
        bad.append(("It is a long story and I will not repeat it.", False))
    chosen, chosen_sents, chosen_labels = _answer(rng, good, kind=True)
    rejected, rejected_sents, rejected_labels = _answer(rng, bad, kind=False)
    p_chosen = round(rng.uniform(0.6, 0.95), 3)
    s_chosen = round(rng.uniform(0.5, 3.0), 3)
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_sentences": chosen_sents,
        "chosen_sentence_labels": chosen_labels,
        "rejected_sentences": rejected_sents,
        "rejected_sentence_labels": rejected_labels,
        "p_chosen": p_chosen,
        "p_rejected": round(1.0 - p_chosen + rng.uniform(-0.05, 0.05), 3),
        "s_chosen": s_chosen,
        "s_rejected": round(-s_chosen + rng.uniform(-0.5, 0.5), 3),
    }


def generate(seed: int = SEED, n_train: int = N_TRAIN, n_test: int = N_TEST) -> list[dict]:
    """The records, deterministic in ``seed`` (``split`` = train for the first ``n_train``)."""
    rng = random.Random(seed)
    world = _world(rng)
    records = []
    for i in range(n_train + n_test):
        record = {"id": i, "split": "train" if i < n_train else "test"}
        record.update(_record(rng, world))
        records.append(record)
    return records


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="verify the committed file instead of writing it"
    )
    parser.add_argument("--out", type=Path, default=DATA_FILE)
    args = parser.parse_args(argv)
    text = render(generate())
    if args.check:
        ok = args.out.exists() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'up to date' if ok else 'OUT OF DATE'}")
        return 0 if ok else 1
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {len(text.splitlines())} records to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
