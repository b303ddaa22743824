"""The ``micro-t0`` suite: the paper's held-in / held-out design in miniature, generated from a seed.

Held-in categories mirror the 8 T0 categories the paper trains experts on; held-out categories mirror
its 4 zero-shot ones. Formats follow what a prototype found tiny models can and cannot do: held-out
tasks are cloze or full-sentence multiple choice in the corpus's own wording (never yes/no
comparisons, which tiny models answer with one constant label), and held-in tasks need learning but
do not saturate at once. Every example row is either multiple choice
(``query``, ``choices``, ``label``) or generation (``query``, ``answer``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

from mergebench.core.hookspecs import hookimpl
from mergebench.core.registry import Param
from mergebench.study.components import DatasetSpec, Suite
from mergebench.suites.world import (COLOURS, COUNTRIES, FOODS, HOBBIES, JOB_SECTOR, PETS, SECTORS, World,
                                     CITY_COUNTRY, Person)

SUITE = "micro-t0"
VERSION = "3"

# ---- the pretraining corpus -------------------------------------------------------------------------

BIO_SENTENCES: list[Callable[[Person], str]] = [
    lambda p: f"{p.name} lives in {p.city}, a city in {p.country}.",
    lambda p: f"{p.name} works as a {p.job}.",
    lambda p: f"{p.she.capitalize()} has a {p.pet}.",
    lambda p: f"{p.her.capitalize()} favourite colour is {p.colour}.",
    lambda p: f"{p.she.capitalize()} likes to eat {p.food}.",
    lambda p: f"In {p.her} free time {p.she} enjoys {p.hobby}.",
    lambda p: f"{p.she.capitalize()} is {p.age} years old.",
]
ALT_SENTENCES: list[Callable[[Person], str]] = [
    lambda p: f"The {p.job} {p.name} comes from {p.city}.",
    lambda p: f"{p.first} keeps a {p.pet} at home in {p.city}.",
    lambda p: f"Everyone knows that {p.first} loves {p.food}.",
    lambda p: f"{p.first} wears {p.colour} almost every day.",
    lambda p: f"When {p.first} is not working, {p.she} plays {p.hobby}." if HOBBIES[p.hobby] == "games"
    else f"When {p.first} is not working, {p.she} spends time on {p.hobby}.",
]
WSD_SENSES = {  # word -> two (gloss, verbs that select this sense)
    "bank": (("the side of a river", ["fished from", "sat on", "walked along"]),
             ("a place that keeps money", ["paid at", "saved coins at", "opened an account at"])),
    "bat": (("an animal that flies at night", ["saw", "heard", "fed"]),
            ("a stick for hitting a ball", ["swung", "carried", "bought"])),
    "spring": (("the season after winter", ["planted seeds in", "waited for", "enjoyed"]),
               ("a coil of metal", ["fixed", "bent", "oiled"])),
    "letter": (("a message on paper", ["wrote", "posted", "read"]),
               ("a sign in the alphabet", ["spelled", "copied", "drew"])),
    "note": (("a short written message", ["left", "signed", "found"]),
             ("a single musical sound", ["sang", "played", "held"])),
    "ring": (("a band worn on a finger", ["wore", "polished", "lost"]),
             ("the sound of a bell", ["answered", "ignored", "waited for"])),
}
CAUSES = [
    ("was hungry", "ate some {food}"), ("was tired", "went to bed early"), ("was cold", "put on a warm coat"),
    ("was thirsty", "drank a glass of water"), ("was bored", "played {hobby_play}"),
    ("missed a friend", "visited {friend}"),
]


def _hobby_play(p: Person) -> str:
    return p.hobby if HOBBIES[p.hobby] in ("games", "sports") else "some music" if HOBBIES[p.hobby] == "music" else "outside"


def corpus(world: World, rng: random.Random, copies: int = 4) -> list[str]:
    docs = []
    for p in world.known:
        for _ in range(copies):
            sentences = [f(p) for f in BIO_SENTENCES] + [rng.choice(ALT_SENTENCES)(p)]
            rng.shuffle(sentences)
            first = sentences.pop(sentences.index(next(s for s in sentences if s.startswith(p.name))))
            friend = world.friend_of(p)
            docs.append(" ".join([first, *sentences, f"{p.her.capitalize()} friend is {friend.name}."]))
    for country, cities in COUNTRIES.items():
        for city in cities:
            for _ in range(copies):
                docs.append(rng.choice([f"{city} is a city in {country}. People who live in {city} live in {country}.",
                                        f"The city of {city} lies in {country}.",
                                        f"If you live in {city}, you live in {country}."]))
    for sector, jobs in SECTORS.items():
        for job in jobs:
            for _ in range(copies):
                docs.append(rng.choice([f"A {job} works in {sector}. The job of a {job} is a job in {sector}.",
                                        f"Being a {job} is a job in {sector}.",
                                        f"Every {job} has a job in {sector}."]))
    for _ in range(len(world.known) * 2):  # stories: causes and effects, pronouns, word senses
        p = rng.choice(world.known)
        cause, effect = rng.choice(CAUSES)
        effect = effect.format(food=p.food, hobby_play=_hobby_play(p), friend=world.friend_of(p).first)
        word, senses = rng.choice(list(WSD_SENSES.items()))
        gloss, verbs = rng.choice(senses)
        docs.append(f"{p.first} {cause}, so {p.she} {effect}. Later {p.first} {rng.choice(verbs)} the {word}, "
                    f"{gloss}.")
    women = [p for p in world.known if p.gender == "f"]
    men = [p for p in world.known if p.gender == "m"]
    for _ in range(len(world.known)):  # two people, then a pronoun and a fact about the one it refers to
        pair = [rng.choice(women), rng.choice(men)]
        rng.shuffle(pair)
        t = rng.choice(pair)
        fact = rng.choice([f"{t.she} bought some {t.food}", f"{t.she} wore {t.her} {t.colour} coat",
                           f"{t.she} talked about {t.hobby}"])
        docs.append(f"{pair[0].name} met {pair[1].name} at the market, and {fact}.")
    rng.shuffle(docs)
    return docs


# ---- tasks ------------------------------------------------------------------------------------------

def _mc(query: str, correct: str, wrong: list[str], rng: random.Random) -> dict:
    choices = [correct] + wrong
    rng.shuffle(choices)
    return {"query": query, "choices": choices, "label": choices.index(correct)}


def _others(options: list[str], correct: str, k: int, rng: random.Random) -> list[str]:
    return rng.sample([o for o in options if o != correct], k)


def _passage(p: Person, q: Person, rng: random.Random) -> str:
    facts = [f"{p.name} lives in {p.city}.", f"{p.first} works as a {p.job}.", f"{p.first} has a {p.pet}.",
             f"{q.name} lives in {q.city}.", f"{q.first} works as a {q.job}.", f"{q.first} has a {q.pet}."]
    rng.shuffle(facts)
    return " ".join(facts)


ATTRIBUTES = {  # attribute -> (question, options, answer phrase)
    "city": ("Where does {n} live?", list(CITY_COUNTRY), lambda p: p.city),
    "job": ("What is {n}'s job?", list(JOB_SECTOR), lambda p: p.job),
    "pet": ("What pet does {n} have?", PETS, lambda p: p.pet),
}


def mcqa(world, rng, people):
    """DREAM/Cosmos-like: a short passage about one new person, a question, four options of its kind."""
    p = rng.choice(people)
    facts = [f"{p.name} lives in {p.city}.", f"{p.first} works as a {p.job}.", f"{p.first} has a {p.pet}.",
             f"{p.first} likes to eat {p.food}."]
    rng.shuffle(facts)
    attr = rng.choice(["city", "job", "pet", "food"])
    question, options, get = {**ATTRIBUTES, "food": ("What does {n} like to eat?", FOODS, lambda x: x.food)}[attr]
    return _mc(f"Passage: {' '.join(facts)}\nQuestion: {question.format(n=p.first)}\nAnswer:", " " + get(p),
               [" " + w for w in _others(options, get(p), 3, rng)], rng)


def extractive_qa(world, rng, people):
    p, q = rng.sample(people, 2)
    attr = rng.choice(list(ATTRIBUTES))
    question, _, get = ATTRIBUTES[attr]
    return {"query": f"Context: {_passage(p, q, rng)}\nQ: {question.format(n=p.name)}\nA:",
            "answer": " " + get(p)}


def closed_book_qa(world, rng, people):
    p = rng.choice(people)
    kind = rng.choice(["city", "job", "country", "friend_city"])
    if kind == "country":  # two hops: person -> city -> country (HotpotQA-like)
        return {"query": f"Q: In which country does {p.name} live?\nA:", "answer": " " + p.country}
    elif kind == "friend_city":
        f = world.friend_of(p)
        return {"query": f"Q: In which city does the friend of {p.name} live?\nA:", "answer": " " + f.city}
    else:
        question, _, get = ATTRIBUTES[kind]
        return {"query": f"Q: {question.format(n=p.name)}\nA:", "answer": " " + get(p)}


POSITIVE = ["delicious", "fresh", "friendly", "cheap", "quick"]
NEGATIVE = ["bland", "stale", "rude", "expensive", "slow"]
ASPECTS = {"delicious": "food", "bland": "food", "fresh": "bread", "stale": "bread", "friendly": "staff",
           "rude": "staff", "cheap": "price", "expensive": "price", "quick": "service", "slow": "service"}


def sentiment(world, rng, people):
    """Two aspects that agree, each sometimes negated ('not stale' is praise): word polarity and negation."""
    positive = rng.random() < 0.5
    clauses = []
    for aspect in rng.sample(sorted(set(ASPECTS.values())), 2):
        good, bad = (w for w in POSITIVE + NEGATIVE if ASPECTS[w] == aspect)
        good, bad = (good, bad) if good in POSITIVE else (bad, good)
        if rng.random() < 0.35:
            clauses.append(f"the {aspect} was not {bad if positive else good}")
        else:
            clauses.append(f"the {aspect} was {good if positive else bad}")
    p = rng.choice(people)
    text = f"{p.first} wrote about a cafe in {p.city}: {clauses[0]} and {clauses[1]}."
    label = " positive" if positive else " negative"
    return _mc(f"Review: {text}\nThe review is", label,
               [" negative" if positive else " positive"], rng)


def topic(world, rng, people):
    """DBPedia-like: the sector of the job someone does, from the job word or (harder) only the name."""
    p = rng.choice(people)
    if rng.random() < 0.5:
        text = f"{p.name} started a new job as a {p.job} last year."
    else:
        text = f"{p.name} went back to work on Monday."  # needs knowing p's job from the corpus
    return _mc(f"Text: {text}\nThe text is about a job in", " " + JOB_SECTOR[p.job],
               [" " + s for s in _others(list(SECTORS), JOB_SECTOR[p.job], 3, rng)], rng)


def structure_to_text(world, rng, people):
    p = rng.choice(people)
    fields = [("name", p.name), ("city", p.city), ("job", p.job), ("pet", p.pet), ("food", p.food)]
    rng.shuffle(fields)
    record = " | ".join(f"{k}: {v}" for k, v in fields)
    answer = (f" {p.name} lives in {p.city} and works as a {p.job}. {p.she.capitalize()} has a {p.pet} "
              f"and likes {p.food}.")
    return {"query": f"Record: {record}\nDescription:", "answer": answer}


def summarisation(world, rng, people):
    p, q = rng.sample(people, 2)
    food = rng.choice(FOODS)
    story = [f"On Saturday {p.name} met {q.name} in {p.city}.", f"The weather was {rng.choice(['sunny', 'grey', 'windy'])}.",
             f"They walked to the market together.", f"{p.first} bought some {food}.",
             f"{q.first} talked about {q.her} {q.pet}.", "Then they went home."]
    return {"query": "Story: " + " ".join(story) + "\nSummary:",
            "answer": f" {p.first} and {q.first} went to the market in {p.city} and bought {food}."}


def paraphrase(world, rng, people):
    """MRPC-like as a two-way choice of full sentences: the paraphrase, or a near miss with one fact changed."""
    p = rng.choice(people)
    other_city = rng.choice([c for c in CITY_COUNTRY if c != p.city])
    other_job = rng.choice([j for j in JOB_SECTOR if j != p.job])
    source = f"{p.name} lives in {p.city} and works as a {p.job}."
    same = f" {p.name} is a {p.job} who lives in {p.city}."
    wrong = rng.choice([f" {p.name} is a {p.job} who lives in {other_city}.",
                        f" {p.name} is a {other_job} who lives in {p.city}."])
    return _mc(f"Sentence: {source}\nThe same meaning:", same, [wrong], rng)


def completion(world, rng, people):
    """COPA/HellaSwag-like: the effect that follows a cause, in the corpus's own story wording."""
    p = rng.choice(people)
    cause, effect = rng.choice(CAUSES)
    fill = dict(food=p.food, hobby_play=_hobby_play(p), friend=world.friend_of(p).first)
    wrong = [e.format(**fill) for c, e in rng.sample([x for x in CAUSES if x[0] != cause], 3)]
    # the corpus says "X was hungry, so she ..."; the test frames say it differently
    frame = rng.choice([f"Because {p.first} {cause}, {p.she}", f"{p.first} {cause}. As a result, {p.she}",
                        f"It was clear that {p.first} {cause}, and so {p.she}"])
    return _mc(frame, " " + effect.format(**fill) + ".", [" " + w + "." for w in wrong], rng)


def nli(world, rng, people):
    """RTE-like as a choice of the entailed conclusion: chaining a premise with world knowledge.

    The premise's relation (city, job) is not the conclusion's (country, sector); a prototype measured
    ~0.44 for "X lives in C. So X lives in" and ~0.62 for this pronoun form on a tiny base.
    """
    p = rng.choice(people)
    if rng.random() < 0.5:
        conclusion, options = p.country, list(COUNTRIES)
        stem = f"{p.name} lives in {p.city}, so {p.she} lives in"
    else:
        conclusion, options = JOB_SECTOR[p.job], list(SECTORS)
        stem = f"{p.name} works as a {p.job}, so {p.she} has a job in"
    return _mc(stem, " " + conclusion + ".", [" " + o + "." for o in _others(options, conclusion, 3, rng)],
               rng)


def coreference(world, rng, people):
    """WSC/Winogrande-like: a gendered pronoun after two names; the continuation is a fact about its referent.

    Both people are in the corpus and have different pets; the options are both pets and two others,
    so a model must resolve the pronoun (from the names' gender) and recall the referent's pet.
    (A prototype found two-way "which name" questions stay at chance for tiny models.)
    """
    while True:
        p = rng.choice([x for x in people if x.gender == "f"])
        q = rng.choice([x for x in people if x.gender == "m"])
        if p.pet != q.pet:
            break
    pair = [p, q]
    rng.shuffle(pair)
    target = rng.choice(pair)
    other = q if target is p else p
    frame = rng.choice([f"{pair[0].name} met {pair[1].name}. {target.she.capitalize()} has a",
                        f"{pair[0].name} talked to {pair[1].name} for a while. {target.she.capitalize()} has a"])
    wrong = [other.pet] + _others([x for x in PETS if x != other.pet], target.pet, 2, rng)
    return _mc(frame, f" {target.pet}.", [f" {w}." for w in wrong], rng)


def word_sense(world, rng, people):
    """WiC-like as a choice of gloss: the sense of an ambiguous word, told by the verb in its context."""
    p = rng.choice(people)
    word, senses = rng.choice(list(WSD_SENSES.items()))
    i = rng.randrange(2)
    gloss, verbs = senses[i]
    # one frame close to the corpus's stories, one that is not (a prototype measured ~0.93 and ~0.57)
    frame = rng.choice([f"Then {p.first} {rng.choice(verbs)} the {word},",
                        f"{p.first} {rng.choice(verbs)} the {word}, which is"])
    return _mc(frame, " " + gloss + ".", [" " + senses[1 - i][0] + "."], rng)


# ---- the instruction mixture (the Flan analogue: disjoint tasks, transferable formats) -------------

def instructions(world, rng, people):
    """Templated tasks disjoint from held-in and held-out ones (other attributes, other relations)."""
    p = rng.choice(people)
    kind = rng.randrange(8)
    if kind == 0:
        return {"query": f"Instruction: Say how old {p.name} will be in two years.\nResponse:",
                "answer": f" {p.age + 2}"}
    elif kind == 1:
        return _mc(f"Instruction: Pick {p.name}'s favourite colour.\nResponse:", " " + p.colour,
                   [" " + c for c in _others(COLOURS, p.colour, 3, rng)], rng)
    elif kind == 2:
        return {"query": f"Instruction: Name the friend of {p.name}.\nResponse:",
                "answer": " " + world.friend_of(p).name}
    elif kind == 3:
        return _mc(f"Instruction: Complete the sentence. {p.name} likes to eat", " " + p.food + ".",
                   [" " + f + "." for f in _others(FOODS, p.food, 3, rng)], rng)
    elif kind == 4:
        words = rng.sample([p.city, p.job, p.pet, p.colour], 3)
        return {"query": f"Instruction: Repeat these words in reverse order: {' '.join(words)}\nResponse:",
                "answer": " " + " ".join(reversed(words))}
    elif kind == 5:
        return _mc(f"Instruction: Choose the hobby of {p.name}.\nResponse:", " " + p.hobby,
                   [" " + h for h in _others(list(HOBBIES), p.hobby, 3, rng)], rng)
    elif kind == 6:  # a relation chained through world knowledge (hobby -> kind of hobby)
        kind_of = HOBBIES[p.hobby]
        return _mc(f"Instruction: Complete the sentence. {p.name} enjoys {p.hobby}, so {p.she} likes",
                   f" {kind_of}.", [f" {k}." for k in _others(sorted(set(HOBBIES.values())), kind_of, 3, rng)], rng)
    else:  # a pronoun resolved by gender, then a fact about its referent (colours, not pets)
        q = rng.choice([x for x in people if x.gender != p.gender and x.colour != p.colour])
        pair = [p, q]
        rng.shuffle(pair)
        return _mc(f"Instruction: Complete the sentence. {pair[0].name} met {pair[1].name}. "
                   f"{p.her.capitalize()} favourite colour is", f" {p.colour}.",
                   [f" {q.colour}."] + [f" {c}." for c in _others([c for c in COLOURS if c != q.colour], p.colour, 2, rng)],
                   rng)


# ---- the suite --------------------------------------------------------------------------------------

# Each task function returns one example row drawn with ``rng``; ``generate`` repeats it.
HELD_IN = {  # category -> {dataset: (one-row generator, output_type, metric)}
    "multiple_choice_qa": {"micro_mcqa": (mcqa, "multiple_choice", "acc")},
    "extractive_qa": {"micro_extractive_qa": (extractive_qa, "generate_until", "exact_match")},
    "closed_book_qa": {"micro_closed_book_qa": (closed_book_qa, "generate_until", "exact_match")},
    "sentiment": {"micro_sentiment": (sentiment, "multiple_choice", "acc")},
    "topic_classification": {"micro_topic": (topic, "multiple_choice", "acc")},
    "structure_to_text": {"micro_structure_to_text": (structure_to_text, "generate_until", "rouge_l")},
    "summarization": {"micro_summarization": (summarisation, "generate_until", "rouge_l")},
    "paraphrase_identification": {"micro_paraphrase": (paraphrase, "multiple_choice", "acc")},
}
HELD_OUT = {
    "sentence_completion": {"micro_completion": (completion, "multiple_choice", "acc")},
    "nli": {"micro_nli": (nli, "multiple_choice", "acc")},
    "coreference": {"micro_coreference": (coreference, "multiple_choice", "acc")},
    "word_sense_disambiguation": {"micro_word_sense": (word_sense, "multiple_choice", "acc")},
}
# Which people each held-in task draws on: closed-book and topic tasks ask about corpus people (the
# expert trains on some, is tested on others, so it must learn retrieval, not answers); reading tasks
# use people never seen in the corpus.
USES_KNOWN_PEOPLE = {"micro_closed_book_qa", "micro_topic"}
# Held-out test splits are larger than held-in ones: their scores are the denominators of held-out
# normalisation, and each must tell the base from chance. Two-name pronoun resolution is the weakest
# signal a tiny base has (~0.33 of 4 options): at 400 examples that is ~3 standard errors from chance, at
# 800 ~5, so coreference gets four times the test examples and the others twice.
HELD_OUT_TEST_FACTOR = {"micro_coreference": 4}


def generate(directory: Path, seed: int, train: int = 2000, validation: int = 200, test: int = 200) -> dict:
    """Write the suite's JSONL splits, corpus and manifest into ``directory``; returns the manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    world = World(seed)
    known, new = world.known, world.new
    k_train, k_eval = known[: len(known) * 2 // 3], known[len(known) * 2 // 3:]
    n_train, n_eval = new[: len(new) // 2], new[len(new) // 2:]
    manifest: dict = {"suite": SUITE, "version": VERSION, "seed": seed, "held_in": {}, "held_out": {}, "files": {}}

    def many(make: Callable, people: list[Person], n: int, name: str, split: str) -> list[dict]:
        # one random stream per (dataset, split): changing one split's size changes nothing else
        rng = random.Random(f"{SUITE}-{seed}-{name}-{split}")
        return [make(world, rng, people) for _ in range(n)]

    def write(name: str, split: str, rows: list[dict]) -> None:
        path = directory / f"{name}.{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        manifest["files"].setdefault(name, {})[split] = str(path.resolve())

    for group, categories in (("held_in", HELD_IN), ("held_out", HELD_OUT)):
        for category, datasets in categories.items():
            manifest[group][category] = {}
            for name, (make, output_type, metric) in datasets.items():
                manifest[group][category][name] = {"output_type": output_type, "metric": metric}
                uses_known = name in USES_KNOWN_PEOPLE
                if group == "held_in":
                    write(name, "train", many(make, k_train if uses_known else n_train, train, name, "train"))
                    eval_people = k_eval if uses_known else n_eval
                else:  # held-out tasks are zero-shot: no train split; they draw on corpus people
                    eval_people = known
                write(name, "validation", many(make, eval_people, validation, name, "validation"))
                n_test = test if group == "held_in" else HELD_OUT_TEST_FACTOR.get(name, 2) * test
                write(name, "test", many(make, eval_people, n_test, name, "test"))
    write("instructions", "train", many(instructions, known, train * 2, "instructions", "train"))
    (directory / "corpus.txt").write_text("\n".join(corpus(world, random.Random(f"{SUITE}-{seed}-corpus"))) + "\n")
    manifest["files"]["corpus"] = {"train": str((directory / "corpus.txt").resolve())}
    (directory / "suite.json").write_text(json.dumps(manifest, indent=2))
    return manifest


# ---- registration -----------------------------------------------------------------------------------

def build(directory: Path, seed: int, params: dict) -> dict:
    """The suite's data (``generate``) plus a byte-level BPE tokenizer trained on its corpus and prompts."""
    from mergebench.training import train_tokenizer

    manifest = generate(directory, seed, params["train"], params["validation"], params["test"])
    lines = (directory / "corpus.txt").read_text().splitlines()
    for name in HELD_IN_NAMES:  # prompts too, so task words are not split into bytes
        with open(manifest["files"][name]["train"]) as fh:
            lines += [json.loads(line)["query"] for _, line in zip(range(300), fh)]
    train_tokenizer(lines, directory / "tokenizer", vocab_size=params["vocab_size"])
    manifest["tokenizer"] = str((directory / "tokenizer").resolve())
    (directory / "suite.json").write_text(json.dumps(manifest, indent=2))
    return manifest


HELD_IN_NAMES = [name for datasets in HELD_IN.values() for name in datasets]


def _specs(group: dict) -> dict[str, tuple[DatasetSpec, ...]]:
    return {category: tuple(DatasetSpec(name, ot, metric) for name, (_, ot, metric) in datasets.items())
            for category, datasets in group.items()}


@hookimpl
def register_suites(register):
    register(Suite(
        name=SUITE,
        description="Built-in micro suite: 8 held-in and 4 held-out categories over one seeded synthetic world.",
        reference="mirrors Yadav et al., What Matters for Model Merging at Scale?, arXiv:2410.03617",
        params=(Param("train", int, 2000, "training examples per held-in dataset", min=1),
                Param("validation", int, 40, "validation examples per dataset (hyperparameter choice)", min=1),
                Param("test", int, 200, "test examples per held-in dataset (held-out: twice, coreference four times)",
                      min=1),
                Param("vocab_size", int, 1024, "BPE vocabulary size", min=300)),
        held_in=_specs(HELD_IN), held_out=_specs(HELD_OUT), build=build, version=VERSION))
