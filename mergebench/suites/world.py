"""A seeded synthetic world that every micro-suite task, the corpus and the instruction mixture share.

People have a gender, a city (in a country), a job, a pet, a favourite colour, food and hobby, an
age and a friend. Cities belong to countries, jobs to sectors. Some people appear in the pretraining
corpus ("known"); others ("new") appear only inside task passages, so that reading-comprehension
tasks cannot be solved from memory.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

COUNTRIES = {
    "Varnia": ["Tolbek", "Mirrow", "Castell"],
    "Oskland": ["Brenna", "Dunmoor", "Felsk"],
    "Quessa": ["Ilvane", "Parro", "Sedrin"],
    "Zembra": ["Kovo", "Lunnet", "Ashby"],
}
CITY_COUNTRY = {city: country for country, cities in COUNTRIES.items() for city in cities}
SECTORS = {
    "health": ["doctor", "nurse", "dentist"],
    "arts": ["painter", "singer", "writer"],
    "transport": ["pilot", "driver", "sailor"],
    "crafts": ["baker", "tailor", "carpenter"],
}
JOB_SECTOR = {job: sector for sector, jobs in SECTORS.items() for job in jobs}
PETS = ["cat", "dog", "owl", "rabbit", "horse", "parrot", "goat", "turtle"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
FOODS = ["bread", "soup", "rice", "cheese", "apples", "fish", "noodles", "beans"]
HOBBIES = {
    "chess": "games", "cards": "games", "tennis": "sports", "swimming": "sports",
    "singing": "music", "the drums": "music", "gardening": "nature", "hiking": "nature",
}
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "tr", "st", "gr"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
FEMININE_ENDINGS = ["a", "ia", "elle", "ine"]
MASCULINE_ENDINGS = ["o", "an", "ek", "us"]


@dataclass(frozen=True)
class Person:
    pid: int
    first: str
    last: str
    gender: str  # "f" or "m"
    city: str
    job: str
    pet: str
    colour: str
    food: str
    hobby: str
    age: int
    friend: int
    known: bool  # appears in the pretraining corpus

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"

    @property
    def country(self) -> str:
        return CITY_COUNTRY[self.city]

    @property
    def she(self) -> str:
        return "she" if self.gender == "f" else "he"

    @property
    def her(self) -> str:
        return "her" if self.gender == "f" else "his"


class World:
    """``n_known`` people in the corpus plus ``n_new`` who only appear in task passages."""

    def __init__(self, seed: int, n_known: int = 240, n_new: int = 160):
        self.seed = seed
        rng = random.Random(f"world-{seed}")
        names: set[str] = set()
        people = []
        total = n_known + n_new
        for pid in range(total):
            gender = rng.choice("fm")
            while True:
                stem = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.choice((1, 2))))
                first = (stem + rng.choice(FEMININE_ENDINGS if gender == "f" else MASCULINE_ENDINGS)).capitalize()
                last = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(2)).capitalize() + rng.choice(
                    ["n", "r", "s", "l", "k", "t"])
                if f"{first} {last}" not in names:
                    names.add(f"{first} {last}")
                    break
            people.append(Person(
                pid=pid, first=first, last=last, gender=gender, city=rng.choice(list(CITY_COUNTRY)),
                job=rng.choice(list(JOB_SECTOR)), pet=rng.choice(PETS), colour=rng.choice(COLOURS),
                food=rng.choice(FOODS), hobby=rng.choice(list(HOBBIES)), age=rng.randint(20, 69),
                friend=-1, known=pid < n_known))
        # friends among people of the same group (known with known, new with new)
        final = []
        for p in people:
            pool = range(0, n_known) if p.known else range(n_known, total)
            friend = rng.choice([q for q in pool if q != p.pid])
            final.append(Person(**{**p.__dict__, "friend": friend}))
        self.people = final
        self.known = [p for p in final if p.known]
        self.new = [p for p in final if not p.known]

    def friend_of(self, p: Person) -> Person:
        return self.people[p.friend]
