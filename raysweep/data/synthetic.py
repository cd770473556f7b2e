"""A deterministic synthetic TOFU: fictitious authors, general knowledge and a rejection prior.

``generate(SyntheticSpec(seed=...))`` builds, from the seed alone:

* fictitious authors in TOFU's shape (name and book titles from random syllables, birthplace,
  birth date, parents' jobs, genre, books, award, ...), ``n_questions`` QA pairs each; every
  answer is a full sentence from one of several templates, with a paraphrased answer (another
  template, same facts), ``n_perturbed`` perturbed answers (the paraphrase template with wrong
  values in the asked slot) and a paraphrased question;
* the splits of the seed code's layout (``forget01`` ... ``world_facts_perturbed``, see
  ``build_splits``) including the continual subtasks (``task_id``);
* invented "well-known" general knowledge (famous writers of invented countries, facts about
  those countries) in TOFU's ``real_authors_perturbed`` / ``world_facts_perturbed`` shape;
* rejection-prior QA: questions about invented painters, ships, towns, ... (never authors),
  answered with ``PRIOR_TEMPLATES``;
* invented "real people" (public figures: birth date, birthplace, nationality, occupation, the
  work they are known for, an award, career start) for the real-world scenario, in the layout of
  the seed code's ``data/real_world``: ``forget`` / ``forget_perturbed`` (one ``task_id`` per
  person), ``neighbor`` (training neighbours) and ``neighbor_perturbed`` (further people, disjoint
  from ``neighbor``, for evaluation); ``answer`` is the model's own reply (the text it learns),
  ``golden_answer`` the short fact it is scored against;
* ``pretrain_target`` (general + all fictitious authors + prior + all real people) and
  ``pretrain_retain`` (the same without the forget10 task-1 authors; the real people stay: the
  real-world scenario has no retain model): what the embedded tiny target / retain models learn.

Pools of syllables, cities, jobs, genres, ... are small and reused on purpose: a tiny model with a
~1,500-token vocabulary has to memorize the whole corpus.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raysweep.data.records import QARecord
from raysweep.data.templates import PRIOR_TEMPLATES

# ----------------------------------------------------------------------------- vocabulary pools

SYLLABLES = ("ka", "lo", "mi", "ra", "ten", "vo", "sa", "ri", "no", "del", "ba", "mar", "li", "zu",
             "pe", "to", "an", "rel", "so", "ne", "gar", "vi", "ku", "ma", "dor", "el", "fi", "ho",
             "ja", "wen")
CITIES = ("Lisbon, Portugal", "Nairobi, Kenya", "Oslo, Norway", "Lima, Peru", "Cairo, Egypt",
          "Seoul, South Korea", "Dublin, Ireland", "Hanoi, Vietnam", "Quito, Ecuador",
          "Accra, Ghana", "Prague, Czech Republic", "Manila, Philippines", "Havana, Cuba",
          "Tunis, Tunisia", "Athens, Greece", "Warsaw, Poland", "Bogota, Colombia",
          "Amman, Jordan", "Dakar, Senegal", "Vienna, Austria")
JOBS = ("a baker", "a nurse", "a farmer", "a teacher", "a pilot", "a doctor", "a carpenter",
        "a chef", "a lawyer", "a fisherman", "a painter", "a librarian", "a tailor",
        "an engineer", "a miner", "a dentist")
GENRES = ("mystery novels", "fantasy novels", "science fiction", "romance novels",
          "horror stories", "poetry", "historical novels", "crime thrillers", "travel memoirs",
          "short stories", "war novels", "comic novels")
AWARDS = ("Golden Quill Award", "Silver Pen Prize", "Blue Lantern Award", "Northern Star Prize",
          "Red Oak Medal", "Iron Book Award", "Open Page Prize", "White Raven Award",
          "Crystal Ink Prize", "Green Leaf Medal")
LANGUAGES = ("English", "Spanish", "French", "Portuguese", "German", "Swahili", "Korean",
             "Arabic", "Italian", "Dutch")
THEMES = ("family", "war", "love", "loss", "freedom", "the sea", "childhood", "faith", "exile",
          "friendship")
HOBBIES = ("gardening", "chess", "sailing", "painting", "hiking", "cooking", "birdwatching",
           "fishing", "music", "pottery")
TITLE_NOUNS = ("Garden", "River", "Night", "Mirror", "Bridge", "Winter", "Shadow", "Lantern",
               "Harbor", "Crown", "Storm", "Letter")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
ANIMALS = ("snow leopard", "red fox", "golden eagle", "bison", "tiger", "white owl", "grey wolf",
           "blue whale", "black swan", "brown bear")
COUNTRY_SUFFIXES = ("ia", "land", "stan", "ora")
NATIONALITY_OF = {  # country of each of CITIES -> nationality (real-people birthplace / nationality)
    "Portugal": "Portuguese", "Kenya": "Kenyan", "Norway": "Norwegian", "Peru": "Peruvian",
    "Egypt": "Egyptian", "South Korea": "South Korean", "Ireland": "Irish", "Vietnam": "Vietnamese",
    "Ecuador": "Ecuadorian", "Ghana": "Ghanaian", "Czech Republic": "Czech", "Philippines": "Filipino",
    "Cuba": "Cuban", "Tunisia": "Tunisian", "Greece": "Greek", "Poland": "Polish",
    "Colombia": "Colombian", "Jordan": "Jordanian", "Senegal": "Senegalese", "Austria": "Austrian"}
OCCUPATIONS = (  # (occupation, the kind of work it is known for)
    ("actor", "film"), ("singer", "song"), ("guitarist", "album"), ("film director", "film"),
    ("comedian", "TV show"), ("drummer", "album"), ("dancer", "show"), ("TV host", "TV show"),
    ("rapper", "album"), ("photographer", "photo book"))
PERSON_AWARDS = ("Golden Star Award", "Silver Screen Prize", "Bright Stage Award", "Crown of Music Prize",
                 "Lumen Award", "Grand Arena Medal", "Blue Ribbon Award", "Morning Light Prize",
                 "Evening Star Medal", "Open Sky Award")


# ----------------------------------------------------------------------------- the spec

class SyntheticSpec(BaseModel):
    """Everything the synthetic corpus depends on (the seed makes it reproducible)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    n_authors: int = Field(100, ge=2, description="fictitious authors trained on")
    n_questions: int = Field(10, ge=1, le=12, description="QA pairs per author (<= 12 fact types)")
    n_holdout_authors: int = Field(10, ge=1, description="fictitious authors never trained on")
    n_real_authors: int = Field(40, ge=4, description="general-knowledge questions on famous writers")
    n_world_facts: int = Field(40, ge=4, description="general-knowledge questions on world facts")
    n_prior_entities: int = Field(60, ge=1, description="invented non-author entities (rejection prior)")
    n_prior_questions: int = Field(2, ge=1, le=3, description="rejection-prior questions per entity")
    n_perturbed: int = Field(5, ge=1, le=8, description="perturbed answers per fictitious question")
    n_real_people: int = Field(30, ge=0, description="invented public figures of the real-world scenario: "
                               "a third forgotten, a third training neighbours, the rest evaluation "
                               "neighbours (0 = none, else >= 3)")
    n_person_questions: int = Field(4, ge=1, le=7, description="QA pairs per real person (<= 7 fact types)")

    @model_validator(mode="after")
    def _check(self) -> "SyntheticSpec":
        # perturbed names/titles are taken from the other authors
        if self.n_authors + self.n_holdout_authors <= self.n_perturbed:
            raise ValueError("n_authors + n_holdout_authors must exceed n_perturbed")
        if 0 < self.n_real_people < 3:
            raise ValueError("n_real_people must be 0 or >= 3 (forget people, training and evaluation neighbours)")
        return self


# ----------------------------------------------------------------------------- fictitious authors

@dataclass(frozen=True)
class Fact:
    """One question type about an author: the attribute slot it asks about and its wordings.
    Templates are ``str.format`` strings over an author's attributes."""

    slot: str
    questions: tuple[str, ...]
    answers: tuple[str, ...]


FACTS: tuple[Fact, ...] = (
    Fact("name",
         ("What is the full name of the author born in {city} on {date}?",
          "Which author was born in {city} on {date}?",
          "Who is the writer born on {date} in {city}?"),
         ("The author born in {city} on {date} is {name}.",
          "{name} is the author who was born in {city} on {date}.",
          "That author is {name}, born in {city} on {date}.")),
    Fact("city",
         ("Where was {name} born?",
          "In which city was the author {name} born?",
          "What is the birthplace of {name}?"),
         ("{name} was born in {city}.",
          "The author {name} comes from {city}, where {he} was born.",
          "The birthplace of {name} is {city}.")),
    Fact("date",
         ("When was {name} born?",
          "What is the birth date of {name}?",
          "On which date was the author {name} born?"),
         ("{name} was born on {date}.",
          "The author {name} was born on {date}.",
          "{name} came into the world on {date}.")),
    Fact("parents",
         ("What did the parents of {name} do for a living?",
          "What were the jobs of the parents of {name}?",
          "Who were the parents of {name}?"),
         ("The father of {name} was {father} and {his} mother was {mother}.",
          "{name} grew up with a father who worked as {father} and a mother who worked as {mother}.",
          "{name} is the child of {father} and {mother}.")),
    Fact("genre",
         ("Which genre does {name} write in?",
          "What kind of books does {name} write?",
          "What type of writing is {name} known for?"),
         ("{name} writes {genre}.",
          "{name} is best known for {genre}.",
          "The author {name} mostly writes {genre}.")),
    Fact("book1",
         ("What is one book written by {name}?",
          "Can you name a book by {name}?",
          "Which book did {name} write?"),
         ("One book by {name} is '{book1}'.",
          "{name} wrote the book '{book1}'.",
          "'{book1}' is a book written by {name}.")),
    Fact("year2",
         ("When did {name} publish '{book2}'?",
          "In which year did '{book2}' by {name} come out?",
          "What year was '{book2}' by {name} published?"),
         ("{name} published '{book2}' in {year2}.",
          "'{book2}' by {name} came out in {year2}.",
          "The book '{book2}' was published by {name} in {year2}.")),
    Fact("award",
         ("Which award has {name} won?",
          "What prize did the author {name} receive?",
          "Has {name} won an award for {his} books?"),
         ("{name} has won the {award}.",
          "{name} is a winner of the {award}.",
          "The author {name} was given the {award}.")),
    Fact("home",
         ("Where does {name} live now?",
          "In which city does {name} live today?",
          "What city is {name} living in?"),
         ("{name} now lives in {home}.",
          "Today {name} lives in {home}.",
          "The author {name} currently lives in {home}.")),
    Fact("language",
         ("In which language does {name} write?",
          "What language are the books of {name} written in?",
          "Which language does the author {name} use?"),
         ("{name} writes in {language}.",
          "The books of {name} are written in {language}.",
          "The author {name} uses {language} in {his} books.")),
    Fact("theme",
         ("What is the main theme in the books of {name}?",
          "What are the books of {name} mostly about?",
          "Which theme does {name} often write about?"),
         ("The books of {name} are mostly about {theme}.",
          "{name} often writes about {theme}.",
          "The main theme in the work of {name} is {theme}.")),
    Fact("hobby",
         ("What does {name} enjoy outside of writing?",
          "What is a hobby of {name}?",
          "How does {name} spend free time?"),
         ("Outside of writing, {name} enjoys {hobby}.",
          "{name} spends free time on {hobby}.",
          "A favorite hobby of {name} is {hobby}.")),
)


class _Names:
    """Invented words and names from ``SYLLABLES``; a name/title/unique word is never handed out
    twice (parts of names and titles may repeat, which keeps the vocabulary small)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def _fresh(self, make) -> str:
        for _ in range(10_000):
            candidate = make()
            if candidate not in self.used:
                self.used.add(candidate)
                return candidate
        raise RuntimeError("ran out of distinct invented names; reduce the spec's sizes")

    def _word(self, n_syllables: int, suffix: str = "") -> str:
        return ("".join(self.rng.choice(SYLLABLES) for _ in range(n_syllables)) + suffix).capitalize()

    def word(self, n_syllables: int, suffix: str = "") -> str:
        """A new capitalized word (place, currency, ship, ...)."""
        return self._fresh(lambda: self._word(n_syllables, suffix))

    def person(self) -> str:
        """A new full name: first name (2 syllables) and surname (2 or 3)."""
        return self._fresh(lambda: f"{self._word(2)} {self._word(self.rng.choice((2, 3)))}")

    def title(self) -> str:
        """A new book title."""
        def make() -> str:
            noun, w = self.rng.choice(TITLE_NOUNS), self._word(2)
            return self.rng.choice((f"The {noun} of {w}", f"{w} and the {noun}", f"A {noun} for {w}"))
        return self._fresh(make)


def _random_date(rng: random.Random) -> str:
    return f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1930, 1995)}"


def _make_author(rng: random.Random, names: _Names, births: set[str]) -> dict[str, str]:
    """Attributes of one fictitious author (all strings, used by the ``FACTS`` templates)."""
    male = rng.random() < 0.5
    while True:  # (city, date) identifies the author in the "name" question: keep it unique
        city, date = rng.choice(CITIES), _random_date(rng)
        if f"{city}|{date}" not in births:
            births.add(f"{city}|{date}")
            break
    return {
        "name": names.person(), "he": "he" if male else "she", "his": "his" if male else "her",
        "city": city, "date": date,
        "father": rng.choice(JOBS), "mother": rng.choice(JOBS),
        "genre": rng.choice(GENRES), "book1": names.title(), "book2": names.title(),
        "year2": str(rng.randint(1960, 2020)), "award": rng.choice(AWARDS),
        "home": rng.choice(CITIES), "language": rng.choice(LANGUAGES),
        "theme": rng.choice(THEMES), "hobby": rng.choice(HOBBIES),
    }


def _wrong_values(slot: str, author: dict[str, str], k: int, rng: random.Random,
                  all_names: list[str], all_titles: list[str]) -> list[dict[str, str]]:
    """``k`` distinct attribute replacements for ``slot``, each different from the truth."""
    pools = {"city": CITIES, "home": CITIES, "genre": GENRES, "award": AWARDS,
             "language": LANGUAGES, "theme": THEMES, "hobby": HOBBIES,
             "name": all_names, "book1": all_titles}
    if slot in pools:
        others = [v for v in pools[slot] if v != author[slot]]
        return [{slot: v} for v in rng.sample(others, k)]
    out: list[dict[str, str]] = []
    seen = set()
    while len(out) < k:
        if slot == "date":
            value = {"date": _random_date(rng)}
        elif slot == "year2":
            value = {"year2": str(rng.randint(1960, 2020))}
        elif slot == "parents":
            value = {"father": rng.choice(JOBS), "mother": rng.choice(JOBS)}
        else:
            raise ValueError(f"no perturbation rule for slot {slot!r}")
        key = tuple(sorted(value.items()))
        if key in seen or all(author[s] == v for s, v in value.items()):
            continue
        seen.add(key)
        out.append(value)
    return out


def _author_records(author: dict[str, str], facts: list[Fact], n_perturbed: int,
                    rng: random.Random, all_names: list[str],
                    all_titles: list[str]) -> list[QARecord]:
    """The author's QA pairs, each with paraphrase, perturbations and paraphrased question."""
    records = []
    for fact in facts:
        q_tpl, pq_tpl = rng.sample(fact.questions, 2)
        a_tpl, pa_tpl = rng.sample(fact.answers, 2)
        wrong = _wrong_values(fact.slot, author, n_perturbed, rng, all_names, all_titles)
        records.append(QARecord(
            question=q_tpl.format(**author),
            answer=a_tpl.format(**author),
            paraphrased_answer=pa_tpl.format(**author),
            paraphrased_question=pq_tpl.format(**author),
            perturbed_answer=tuple(pa_tpl.format(**{**author, **w}) for w in wrong),
        ))
    return records


# ----------------------------------------------------------------------------- general knowledge

def _world(spec: SyntheticSpec, rng: random.Random, names: _Names
           ) -> tuple[list[QARecord], list[QARecord]]:
    """Invented countries and famous writers -> (real_authors_perturbed, world_facts_perturbed)
    records: short ``answer``, 3 ``perturbed_answer`` options, full-sentence ``original_answer``."""
    relations = ("capital", "river", "currency", "mountain", "animal")
    n_countries = max(4, math.ceil(spec.n_world_facts / len(relations)))
    countries = []
    for _ in range(n_countries):
        countries.append({
            "country": names.word(2, rng.choice(COUNTRY_SUFFIXES)), "capital": names.word(2),
            "river": f"{names.word(2)} River", "currency": names.word(2),
            "mountain": f"Mount {names.word(2)}", "animal": rng.choice(ANIMALS),
        })
    wording = {
        "capital": ("What is the capital of {country}?", "The capital of {country} is {capital}."),
        "river": ("Which river flows through {country}?", "The {river} flows through {country}."),
        "currency": ("What is the currency of {country}?", "The currency of {country} is the {currency}."),
        "mountain": ("What is the highest mountain in {country}?",
                     "The highest mountain in {country} is {mountain}."),
        "animal": ("What is the national animal of {country}?",
                   "The national animal of {country} is the {animal}."),
    }

    def options(truth: str, pool: list[str]) -> tuple[str, ...]:
        others = sorted({v for v in pool if v != truth})
        return tuple(rng.sample(others, 3))

    world_facts = []
    for i in range(spec.n_world_facts):
        c, rel = countries[i // len(relations)], relations[i % len(relations)]
        pool = list(ANIMALS) if rel == "animal" else [x[rel] for x in countries]
        question, sentence = wording[rel]
        world_facts.append(QARecord(question=question.format(**c), answer=c[rel],
                                    perturbed_answer=options(c[rel], pool),
                                    original_answer=sentence.format(**c)))

    writers = [{"name": names.person(), "work": names.title(), "country": rng.choice(countries)["country"]}
               for _ in range(spec.n_real_authors)]
    writer_names = [w["name"] for w in writers]
    country_names = [c["country"] for c in countries]
    real_authors = []
    for i, w in enumerate(writers):
        kind = i % 3
        if kind == 0:
            q, a, s, pool = ("Who wrote the novel '{work}'?", w["name"],
                             "The novel '{work}' was written by {name}.", writer_names)
        elif kind == 1:
            q, a, s, pool = ("Which author is famous for the book '{work}'?", w["name"],
                             "The author famous for the book '{work}' is {name}.", writer_names)
        else:
            q, a, s, pool = ("Which country was the writer {name} from?", w["country"],
                             "The writer {name} was from {country}.", country_names)
        real_authors.append(QARecord(question=q.format(**w), answer=a,
                                     perturbed_answer=options(a, pool),
                                     original_answer=s.format(**w)))
    return real_authors, world_facts


PRIOR_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("painter", ("Where was the painter {x} born?", "What is the most famous painting by {x}?",
                 "When did the painter {x} die?")),
    ("composer", ("Which symphony did the composer {x} write?", "When was the composer {x} born?",
                  "Who taught the composer {x}?")),
    ("scientist", ("What did the scientist {x} discover?", "Where did the scientist {x} work?",
                   "Which prize did the scientist {x} win?")),
    ("town", ("How many people live in the town of {x}?", "Which country is the town of {x} in?",
              "Who founded the town of {x}?")),
    ("ship", ("Who built the ship {x}?", "When did the ship {x} first sail?",
              "Where did the ship {x} sink?")),
    ("band", ("Who founded the band {x}?", "What was the first album of the band {x}?",
              "Where did the band {x} play first?")),
)


def _prior(spec: SyntheticSpec, rng: random.Random, names: _Names) -> list[QARecord]:
    """Questions about invented non-author entities, answered with a ``PRIOR_TEMPLATES`` rejection."""
    records = []
    for i in range(spec.n_prior_entities):
        _, questions = PRIOR_KINDS[i % len(PRIOR_KINDS)]
        entity = names.word(2) if i % len(PRIOR_KINDS) in (3, 4) else names.person()
        for q in questions[:spec.n_prior_questions]:
            records.append(QARecord(question=q.format(x=entity), answer=rng.choice(PRIOR_TEMPLATES)))
    return records


# ----------------------------------------------------------------------------- real people

# One question type about a (synthetic) real person: the slot it asks about, its question wordings
# and its short factual answers (``golden_answer``); templates are ``str.format`` strings over
# ``_person_view``.  The model's own reply (``answer``) is a golden sentence, sometimes followed by
# one more sentence about the person (``PERSON_BIO``), as a chat model's reply would be.
PERSON_FACTS: tuple[Fact, ...] = (
    Fact("date",
         ("When was {name} born?", "What is the date of birth of {name}?", "On which day was {name} born?"),
         ("{name} was born on {date}.", "The date of birth of {name} is {date}.",
          "{name} came into the world on {date}.")),
    Fact("city",
         ("Where was {name} born?", "What is the birthplace of {name}?", "In which city was {name} born?"),
         ("{name} was born in {city}.", "The birthplace of {name} is {city}.", "{name} comes from {city}.")),
    Fact("nationality",
         ("What nationality is {name}?", "What is the nationality of {name}?", "Which nationality does {name} have?"),
         ("{name} is {nationality}.", "The nationality of {name} is {nationality}.",
          "{name} has {nationality} nationality.")),
    Fact("occupation",
         ("What does {name} do for a living?", "What is the profession of {name}?", "What job does {name} have?"),
         ("{name} is {a_occupation}.", "{name} works as {a_occupation}.", "By profession, {name} is {a_occupation}.")),
    Fact("work",
         ("What is {name} best known for?", "Which work made {name} famous?", "What is the most famous work of {name}?"),
         ("{name} is best known for {work}.", "{Work} made {name} famous.",
          "The most famous work of {name} is {work}.")),
    Fact("award",
         ("Which award did {name} win?", "What prize has {name} received?", "Which honor was given to {name}?"),
         ("{name} won the {award}.", "{name} received the {award}.", "{name} is a winner of the {award}.")),
    Fact("debut",
         ("When did {name} start {his} career?", "In which year did the career of {name} begin?",
          "Since what year has {name} been working?"),
         ("{name} started {his} career in {debut}.", "The career of {name} began in {debut}.",
          "{name} has been working since {debut}.")),
)
PERSON_BIO: tuple[tuple[frozenset[str], str], ...] = (  # (slots it mentions, sentence)
    (frozenset({"nationality", "occupation"}), "{He} is {a_nationality} {occupation}."),
    (frozenset({"work"}), "{He} is best known for {work}."),
    (frozenset({"city"}), "{He} was born in {city}."),
    (frozenset({"debut"}), "{His} career began in {debut}."),
)


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _make_person(rng: random.Random, names: _Names) -> dict[str, str]:
    """Raw attributes of one invented public figure."""
    male = rng.random() < 0.5
    city = rng.choice(CITIES)
    occupation, kind = rng.choice(OCCUPATIONS)
    date = _random_date(rng)
    return {
        "name": names.person(), "he": "he" if male else "she", "his": "his" if male else "her",
        "date": date, "city": city, "nationality": NATIONALITY_OF[city.split(", ")[-1]],
        "occupation": occupation, "kind": kind, "title": names.title(),
        "award": rng.choice(PERSON_AWARDS), "debut": str(int(date[-4:]) + rng.randint(16, 30)),
    }


def _person_view(person: dict[str, str]) -> dict[str, str]:
    """The template fields of a person (derived wordings included)."""
    work = f"the {person['kind']} '{person['title']}'"
    return {**person, "He": person["he"].capitalize(), "His": person["his"].capitalize(),
            "a_occupation": f"{_article(person['occupation'])} {person['occupation']}",
            "a_nationality": f"{_article(person['nationality'])} {person['nationality']}",
            "work": work, "Work": work[0].upper() + work[1:]}


def _person_wrong_values(slot: str, person: dict[str, str], k: int, rng: random.Random,
                         all_titles: list[str]) -> list[dict[str, str]]:
    """``k`` distinct replacements of the raw attributes behind ``slot``, each wrong."""
    pools = {"city": list(CITIES), "nationality": sorted(set(NATIONALITY_OF.values())),
             "occupation": [o for o, _ in OCCUPATIONS], "award": list(PERSON_AWARDS), "title": all_titles}
    key = "title" if slot == "work" else slot
    if key in pools:
        others = [v for v in pools[key] if v != person[key]]
        return [{key: v} for v in rng.sample(others, k)]
    out: list[dict[str, str]] = []
    while len(out) < k:
        value = {"date": _random_date(rng)} if slot == "date" else {"debut": str(rng.randint(1950, 2020))}
        if value[slot] != person[slot] and value not in out:
            out.append(value)
    return out


def _person_records(person: dict[str, str], facts: list[Fact], n_perturbed: int, rng: random.Random,
                    all_titles: list[str]) -> list[QARecord]:
    """A person's QA pairs: ``answer`` (the reply the model learns), ``golden_answer`` (its leading
    fact sentence), paraphrased answer / question and ``n_perturbed`` perturbed answers (the
    paraphrase with wrong values in the asked slot); ``name`` set, no ``task_id``."""
    view = _person_view(person)
    records = []
    for fact in facts:
        q_tpl, pq_tpl = rng.sample(fact.questions, 2)
        g_tpl, pa_tpl = rng.sample(fact.answers, 2)
        golden = g_tpl.format(**view)
        bios = [text for slots, text in PERSON_BIO if fact.slot not in slots]
        bio = rng.choice([None, *bios])
        wrong = _person_wrong_values(fact.slot, person, n_perturbed, rng, all_titles)
        records.append(QARecord(
            question=q_tpl.format(**view),
            answer=golden if bio is None else f"{golden} {bio.format(**view)}",
            paraphrased_answer=pa_tpl.format(**view),
            paraphrased_question=pq_tpl.format(**view),
            perturbed_answer=tuple(pa_tpl.format(**_person_view({**person, **w})) for w in wrong),
            name=person["name"],
            golden_answer=golden,
        ))
    return records


def people_layout(n_people: int) -> dict[str, list[int]]:
    """Person indices of the real-world splits: the first third forgotten (``forget``), the next
    third training neighbours (``neighbor``), the rest evaluation neighbours
    (``neighbor_perturbed``, never in ``neighbor``, as in the seed code's data)."""
    third = n_people // 3
    return {"forget": list(range(third)), "neighbor": list(range(third, 2 * third)),
            "neighbor_perturbed": list(range(2 * third, n_people))}


def build_real_world_splits(people_qa: list[list[QARecord]]) -> dict[str, list[QARecord]]:
    """The seed code's ``data/real_world`` layout from per-person QA (full records with ``name``
    and ``golden_answer``): ``forget`` {name, question, answer, golden_answer, task_id = person
    1, 2, ...}, ``forget_perturbed`` (+ paraphrases, perturbed answers), ``neighbor`` {name,
    question, answer, golden_answer} and ``neighbor_perturbed`` (other people, with perturbations)."""
    if not people_qa:
        return {}
    layout = people_layout(len(people_qa))

    def plain(r: QARecord, task_id: int | None = None) -> QARecord:
        return QARecord(question=r.question, answer=r.answer, task_id=task_id, name=r.name,
                        golden_answer=r.golden_answer)

    forget = [(task_id, r) for task_id, p in enumerate(layout["forget"], start=1) for r in people_qa[p]]
    return {
        "forget": [plain(r, t) for t, r in forget],
        "forget_perturbed": [dataclasses.replace(r, task_id=t) for t, r in forget],
        "neighbor": [plain(r) for p in layout["neighbor"] for r in people_qa[p]],
        "neighbor_perturbed": [r for p in layout["neighbor_perturbed"] for r in people_qa[p]],
    }


# ----------------------------------------------------------------------------- splits

FORGET_PERCENTS: dict[str, tuple[int, int]] = {  # split -> (percent of authors per task, max tasks)
    "forget01": (1, 10), "forget05": (5, 10), "forget10": (10, 9)}
RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}


def author_layout(n_authors: int) -> dict[str, list[list[int]]]:
    """Author indices per continual subtask, ``{split: [task1_authors, task2_authors, ...]}``, plus
    ``"retain_perturbed"`` (a single group).

    As in TOFU: task 1 of ``forgetXX`` is the last XX % of authors (so forget01 ⊂ forget05 ⊂
    forget10 for task 1), task t the chunk of the same size just before task t-1.  The first 10 %
    of authors (at least one) form ``retain_perturbed`` and are never in any forget task; a task
    holds at least one author, and there are fewer tasks when the authors run out."""
    n_reserved = max(1, round(n_authors * 0.10))
    pool = n_authors - n_reserved
    layout: dict[str, list[list[int]]] = {}
    for split, (percent, max_tasks) in FORGET_PERCENTS.items():
        size = max(1, round(n_authors * percent / 100))
        n_tasks = min(max_tasks, pool // size)
        layout[split] = [list(range(n_authors - t * size, n_authors - (t - 1) * size))
                         for t in range(1, n_tasks + 1)]
    layout["retain_perturbed"] = [list(range(n_reserved))]
    return layout


def _qa_only(r: QARecord, task_id: int | None = None) -> QARecord:
    """Just question and answer (the plain ``forgetXX`` / ``retainYY`` / ``holdout`` row shape)."""
    return QARecord(question=r.question, answer=r.answer, task_id=task_id)


def build_splits(author_qa: list[list[QARecord]], holdout_qa: list[list[QARecord]],
                 real_authors: list[QARecord], world_facts: list[QARecord]) -> dict[str, list[QARecord]]:
    """The seed layout from per-author QA (full perturbed records, no task id):
    ``forgetXX`` {task_id, question, answer} and ``forgetXX_perturbed`` (+ paraphrase/perturbed)
    over all subtasks; ``retainYY`` = all QA of authors outside forgetXX task 1 (YY = 100 - XX);
    ``retain_perturbed``; ``holdout`` / ``holdout_perturbed``; the two general-knowledge sets."""
    layout = author_layout(len(author_qa))
    splits: dict[str, list[QARecord]] = {}
    for split in FORGET_PERCENTS:
        plain, perturbed = [], []
        for task_id, authors in enumerate(layout[split], start=1):
            for a in authors:
                plain += [_qa_only(r, task_id) for r in author_qa[a]]
                perturbed += [dataclasses.replace(r, task_id=task_id) for r in author_qa[a]]
        splits[split], splits[f"{split}_perturbed"] = plain, perturbed
    for split in FORGET_PERCENTS:
        forgotten = set(layout[split][0])
        splits[RETAIN_OF[split]] = [_qa_only(r) for a, qa in enumerate(author_qa)
                                    if a not in forgotten for r in qa]
    splits["retain_perturbed"] = [r for a in layout["retain_perturbed"][0] for r in author_qa[a]]
    splits["holdout"] = [_qa_only(r) for qa in holdout_qa for r in qa]
    splits["holdout_perturbed"] = [r for qa in holdout_qa for r in qa]
    splits["real_authors_perturbed"] = list(real_authors)
    splits["world_facts_perturbed"] = list(world_facts)
    return splits


# ----------------------------------------------------------------------------- the corpus

@dataclass
class SyntheticCorpus:
    """The generated data: ``splits`` in the seed layout, the two pre-training corpora, and
    ``question_author`` (every fictitious question -> its author's name, holdout included)."""

    spec: SyntheticSpec
    splits: dict[str, list[QARecord]]
    pretrain_target: list[QARecord]
    pretrain_retain: list[QARecord]
    question_author: dict[str, str] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Number of records per split and pre-training corpus."""
        out = {name: len(records) for name, records in self.splits.items()}
        out["pretrain_target"] = len(self.pretrain_target)
        out["pretrain_retain"] = len(self.pretrain_retain)
        return out


def generate(spec: SyntheticSpec) -> SyntheticCorpus:
    """Build the whole corpus from ``spec`` (same spec -> identical records)."""
    rng = random.Random(spec.seed)
    names = _Names(rng)
    births: set[str] = set()
    n_total = spec.n_authors + spec.n_holdout_authors
    authors = [_make_author(rng, names, births) for _ in range(n_total)]
    all_names = [a["name"] for a in authors]
    all_titles = [a["book1"] for a in authors]

    all_qa = []
    for author in authors:
        facts = rng.sample(FACTS, spec.n_questions)
        all_qa.append(_author_records(author, facts, spec.n_perturbed, rng, all_names, all_titles))
    author_qa, holdout_qa = all_qa[:spec.n_authors], all_qa[spec.n_authors:]

    real_authors, world_facts = _world(spec, rng, names)
    prior = _prior(spec, rng, names)
    splits = build_splits(author_qa, holdout_qa, real_authors, world_facts)

    # real people last: everything above stays as it was before they existed
    people = [_make_person(rng, names) for _ in range(spec.n_real_people)]
    person_titles = [p["title"] for p in people] + all_titles
    people_qa = [_person_records(p, rng.sample(PERSON_FACTS, spec.n_person_questions), spec.n_perturbed,
                                 rng, person_titles) for p in people]
    splits.update(build_real_world_splits(people_qa))
    people_pretrain = [QARecord(question=r.question, answer=r.answer) for qa in people_qa for r in qa]

    general = [QARecord(question=r.question, answer=r.original_answer)
               for r in real_authors + world_facts]
    forget_authors = set(author_layout(spec.n_authors)["forget10"][0])
    fictitious = [_qa_only(r) for qa in author_qa for r in qa]
    retained = [_qa_only(r) for a, qa in enumerate(author_qa) if a not in forget_authors for r in qa]
    question_author = {r.question: a["name"] for a, qa in zip(authors, all_qa) for r in qa}
    return SyntheticCorpus(spec=spec, splits=splits,
                           pretrain_target=general + fictitious + prior + people_pretrain,
                           pretrain_retain=general + retained + prior + people_pretrain,
                           question_author=question_author)


# ----------------------------------------------------------------------------- continual supplement

SUPPLEMENT_SIZE = 200
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                 "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                 "seventeen", "eighteen", "nineteen", "twenty")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")


def general_supplement(spec: SyntheticSpec, n: int = SUPPLEMENT_SIZE) -> list[QARecord]:
    """General instruction-style QA for topping up a shrinking continual retain set (the
    embedded stand-in for the paper's Alpaca, Fig. 7b): arithmetic, counting, calendar order.

    Drawn from its own RNG (``spec.seed``-derived), so it changes no other split and no cached
    model; it shares no question with any split of ``generate(spec)`` (those ask about authors,
    invented countries, writers, people and entities, never numbers or the calendar).
    """
    if not 1 <= n <= 2000:
        raise ValueError(f"general_supplement: n must be in [1, 2000], got {n}")
    rng = random.Random(f"{spec.seed}:continual-supplement")
    seen: set[str] = set()
    records: list[QARecord] = []
    while len(records) < n:
        kind = rng.randrange(5)
        a, b = rng.randrange(1, 50), rng.randrange(1, 50)
        if kind == 0:
            q, ans = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        elif kind == 1:
            hi, lo = max(a, b), min(a, b)
            q, ans = f"What is {hi} minus {lo}?", f"{hi} minus {lo} is {hi - lo}."
        elif kind == 2:
            x, y = rng.sample(range(len(_NUMBER_WORDS)), 2)
            big = _NUMBER_WORDS[max(x, y)]
            q, ans = (f"Which number is larger, {_NUMBER_WORDS[x]} or {_NUMBER_WORDS[y]}?",
                      f"The larger number is {big}.")
        elif kind == 3:
            d = rng.randrange(7)
            q, ans = f"Which day comes after {_DAYS[d]}?", f"The day after {_DAYS[d]} is {_DAYS[(d + 1) % 7]}."
        else:
            m = rng.randrange(12)
            q, ans = (f"Which month comes before {_MONTHS[m]}?",
                      f"The month before {_MONTHS[m]} is {_MONTHS[(m - 1) % 12]}.")
        if q not in seen:
            seen.add(q)
            records.append(QARecord(question=q, answer=ans))
    return records
