"""Prompts for text-conditioned generators: composed face prompts, or a prompt file (one per line).

    face_prompts(4, seed=0)
    # ['a candid snapshot of an elderly woman with a faint smile, soft window light, in a busy cafe', ...]

The builder draws distinct combinations of attributes (age, person, expression, lighting, setting, style, and an
optional detail) with its own ``random.Random(seed)``, so the same seed always gives the same prompts, and different
counts share their first prompts.
"""

from __future__ import annotations

import random

from shared.errors import DataError

AGES = ("young", "middle-aged", "elderly", "teenage", "adult", "old")
PERSONS = ("man", "woman", "person", "boy", "girl")
EXPRESSIONS = ("smiling", "with a neutral expression", "laughing", "looking serious", "with a faint smile",
               "looking surprised", "frowning", "looking thoughtful")
LIGHTING = ("soft studio lighting", "harsh midday sunlight", "dim indoor light", "backlit by a window",
            "golden hour light", "overcast daylight", "flash photography", "soft window light")
SETTINGS = ("against a plain grey background", "outdoors in a park", "in an office", "on a city street",
            "at home in a living room", "in a busy cafe", "at the beach", "in front of a brick wall")
STYLES = ("a photograph", "a close-up portrait photo", "a candid snapshot", "a passport photo", "a 35mm film photo",
          "a black and white photo", "a news photo", "a webcam still")
DETAILS = ("", "", "", "wearing glasses", "with a beard", "with short hair", "with long hair", "wearing a hat")

ATTRIBUTES = {"age": AGES, "person": PERSONS, "expression": EXPRESSIONS, "lighting": LIGHTING, "setting": SETTINGS,
              "style": STYLES, "detail": DETAILS}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def compose_face_prompt(age: str, person: str, expression: str, lighting: str, setting: str, style: str,
                        detail: str = "") -> str:
    subject = f"{_article(age)} {age} {person}" + (f" {detail}" if detail else "")
    return f"{style} of {subject} {expression}, {lighting}, {setting}"


def face_prompts(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct face prompts (up to the number of attribute combinations), deterministic in ``seed``."""
    total = 1
    for values in ATTRIBUTES.values():
        total *= len(set(values))
    if count > total:
        raise DataError(f"face prompts: {count} requested, but the attribute lists give only {total} distinct ones")
    rng = random.Random(seed)
    seen: set[str] = set()
    prompts: list[str] = []
    while len(prompts) < count:
        prompt = compose_face_prompt(**{key: rng.choice(values) for key, values in ATTRIBUTES.items()})
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def parse_prompt_file(text: str, where: str) -> list[str]:
    """One prompt per line; an empty (or blank) line is an error naming the file and the line, never skipped."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    if not lines:
        raise DataError(f"prompt file {where}: no prompts (the file is empty)")
    prompts = []
    for number, line in enumerate(lines, 1):
        prompt = line.rstrip("\r").strip()
        if not prompt:
            raise DataError(f"prompt file {where}: line {number} is empty (one prompt per line, no blank lines)")
        prompts.append(prompt)
    return prompts
