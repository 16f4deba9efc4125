"""Build the training corpus and tokenizer of tdbql's embedded default model (offline, deterministic).

Every sentence is generated here from templates and word lists; no external text is used.
Five kinds of documents (one per line of corpus.txt):

- ioi:       indirect-object sentences ("When Mary and John went to the store, John gave a drink
             to Mary.") built from IOI_TRAIN_TEMPLATES and the training names only;
- induction: a run of random words repeated two or three times ("lamp Oslo green lamp Oslo green");
- fact:      country -> capital / language and landmark -> city facts in several phrasings;
- copy:      one name mentioned and later recalled ("This is Nina. Everyone at the park likes Nina.");
- filler:    simple grammatical sentences about people, things and places (every name, the
             held-out ones included, appears here and in copy documents).

Held out of the IOI documents entirely (for evaluation): HELDOUT_NAMES and IOI_HELDOUT_TEMPLATES.

Usage: python scripts/build_corpus.py [--out DIR] [--lines N]
Writes DIR/corpus.txt and DIR/tokenizer.json (byte-level BPE, GPT-2 style).
"""

from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / ".data"
SEED = 1234
EOS = "<|endoftext|>"
VOCAB_SIZE = 4096
DEFAULT_LINES = 400_000

# fmt: off
NAMES = [
    "Mary", "John", "Tom", "James", "Anna", "Sarah", "David", "Michael", "Emma", "Lisa",
    "Paul", "Mark", "Laura", "Kate", "Peter", "Alice", "Bob", "Jack", "Rose", "Lucy",
    "Henry", "Grace", "Daniel", "Susan", "Linda", "Kevin", "Chris", "Amy", "Jane", "Ben",
    "Sam", "Dan", "Max", "Leo", "Eric", "Ryan", "Adam", "Helen", "Emily", "Julia",
    "Anne", "Frank", "George", "Nancy", "Carl", "Oscar", "Hugo", "Ivan", "Nina", "Olga",
    "Rita", "Tina", "Victor", "Walter", "Zoe", "Ella", "Ruth", "Karen", "Steve", "Luke",
    "Aaron", "Abby", "Alan", "Albert", "Alex", "Alfred", "Amanda", "Andrew", "Angela", "Arthur",
    "Barbara", "Bella", "Bernard", "Beth", "Bill", "Brian", "Bruce", "Caleb", "Carla", "Carol",
    "Caroline", "Catherine", "Cecilia", "Charles", "Charlotte", "Chloe", "Clara", "Claire", "Colin",
    "Craig", "Cynthia", "Daisy", "Dana", "Diana", "Donald", "Dora", "Doris", "Dylan", "Edith",
    "Edward", "Elena", "Eli", "Eliza", "Ellen", "Elsa", "Ethan", "Eva", "Evan", "Felix", "Fiona",
    "Fred", "Gary", "Gavin", "Gina", "Gloria", "Gordon", "Greta", "Harry", "Hannah", "Harold",
    "Heidi", "Holly", "Ian", "Irene", "Iris", "Isaac", "Jacob", "Jason", "Jeff", "Jenny", "Jerry",
    "Jessica", "Jim", "Joan", "Joe", "Joel", "Jonas", "Jordan", "Joseph", "Josh", "Joyce", "Judy",
    "Julian", "Justin", "Karl", "Kelly", "Kim", "Kyle", "Lara", "Larry", "Leah", "Lena", "Leon",
    "Lewis", "Liam", "Lily", "Logan", "Louis", "Louise", "Lydia", "Maria", "Marco", "Martha",
    "Martin", "Matt", "Megan", "Mia", "Mike", "Molly", "Monica", "Nathan", "Neil", "Nick", "Noah",
    "Nora", "Olivia", "Oliver", "Owen", "Pablo", "Pam", "Patrick", "Paula", "Philip", "Phoebe",
    "Quinn", "Rachel", "Ralph", "Ray", "Rebecca", "Richard", "Rick", "Robert", "Roger", "Ron",
    "Rosa", "Roy", "Sandra", "Scott", "Sean", "Simon", "Sofia", "Sophie", "Stella", "Stuart", "Ted",
    "Teresa", "Thomas", "Tim", "Tony", "Tracy", "Trevor", "Ursula", "Vera", "Vincent", "Wendy",
    "Xavier", "Yvonne", "Zack", "Abel", "Ada", "Agnes", "Boris", "Bruno", "Cora", "Dean", "Dennis",
    "Derek", "Diego", "Edgar", "Elias", "Emil", "Enzo", "Erin", "Ezra", "Flora", "Gemma", "Gus",
    "Hazel", "Hector", "Ingrid", "Ira", "Jade", "Jonah", "Kara", "Lars", "Lionel", "Mabel", "Mila",
    "Milo", "Miles", "Nadia", "Nell", "Nigel", "Otto", "Pearl", "Percy", "Petra", "Rex", "Rufus",
    "Saul", "Silas", "Tara", "Theo", "Uma", "Vince", "Viola", "Wade", "Yara", "Zara", "Anita",
    "Arnold", "Beatrice", "Clive", "Curtis", "Della", "Elmer", "Fay", "Gilbert", "Hilda", "Homer",
    "Ivy", "Jasper", "Kurt", "Lorna", "Marvin", "Myra", "Norma", "Opal", "Pierre", "Reid", "Selma",
    "Stan", "Thea", "Wilma",
]
# fmt: on
HELDOUT_NAMES = sorted(random.Random(SEED).sample(NAMES, len(NAMES) // 5))
TRAIN_NAMES = [n for n in NAMES if n not in HELDOUT_NAMES]

PLACES = [
    "store", "park", "school", "office", "market", "station", "library", "hospital", "garden",
    "restaurant", "beach", "museum", "church", "kitchen", "cafe", "bank", "farm", "river",
    "house", "hotel",
]
OBJECTS = [
    "drink", "book", "ring", "bone", "kiss", "basketball", "computer", "necklace", "letter",
    "snack", "pen", "hat", "ticket", "flower", "key", "box", "gift", "cake", "coin", "map",
]

# An IOI sentence is an opening that introduces {A} and {B} at a {place}, a connector, then the
# subject {S} (the repeated name) doing something to the indirect object {IO}, which ends the
# sentence. Evaluation prompts are the sentence cut just before {IO}. Training templates are every
# opening x connector x action: many structures, so that the model learns IOI and not a template.
IOI_OPENINGS = [
    "When {A} and {B} went to the {place}",
    "After {A} and {B} arrived at the {place}",
    "While {A} and {B} were working at the {place}",
    "When {A} and {B} visited the {place}",
    "As {A} and {B} walked into the {place}",
    "Before {A} and {B} left the {place}",
    "{A} and {B} went to the {place}",
    "Yesterday {A} and {B} were sitting in the {place}",
    "Last week {A} and {B} met at the {place}",
    "The {place} was busy when {A} and {B} arrived",
    "It was late when {A} and {B} got to the {place}",
    "Then {A} and {B} had a long day at the {place}",
    "On Monday {A} and {B} had lunch at the {place}",
    "After {A} and {B} cleaned the {place}",
    "When {A} and {B} got a {obj} at the {place}",
    "The friends {A} and {B} found a {obj} at the {place}",
    "Since {A} and {B} were in the {place}",
    "In the morning {A} and {B} ran to the {place}",
    "{A} and {B} stayed at the {place} all day",
    "After the meeting at the {place}, {A} and {B} talked",
    "At the {place}, {A} and {B} ate dinner",
    "Later {A} and {B} drove to the {place}",
    "When {A} and {B} came back from the {place}",
    "Today {A} and {B} waited at the {place}",
]
IOI_CONNECTORS = [", ", ". ", ", and ", ". Later, ", ". Then ", ", and then ", ". After a while, "]
IOI_ACTIONS = [
    "gave a {obj} to", "handed a {obj} to", "passed the {obj} to", "showed the {obj} to",
    "sent a {obj} to", "brought a {obj} to", "offered a {obj} to", "sold a {obj} to",
    "lent a {obj} to", "threw a {obj} to", "read a story to", "waved to", "said goodbye to",
    "made a {obj} for", "bought a {obj} for", "gave it to", "wrote a letter to", "sang a song to",
    "talked to", "smiled at", "delivered a {obj} to", "carried the {obj} to", "kicked the {obj} to",
    "explained the plan to", "left a {obj} for", "found a {obj} for", "decided to give the {obj} to",
    "wanted to give a {obj} to", "gave the {obj} back to", "baked a cake for", "cooked dinner for",
    "told a joke to",
]


def composed_templates() -> list[str]:
    """Every opening x connector x action, in a fixed shuffled order."""
    templates = [
        f"{opening}{connector}{{S}} {action} {{IO}}."
        for opening in IOI_OPENINGS
        for connector in IOI_CONNECTORS
        for action in IOI_ACTIONS
    ]
    random.Random(SEED).shuffle(templates)
    return templates


IOI_TRAIN_TEMPLATES = composed_templates()
# Their openings, middles and verbs (mailed, tossed, returned) never occur in IOI documents.
IOI_HELDOUT_TEMPLATES = [
    "Because {A} and {B} were at the {place}, {S} mailed a {obj} to {IO}.",
    "Once {A} and {B} reached the {place}, {S} tossed a {obj} to {IO}.",
    "So {A} and {B} spent the evening at the {place}, and {S} returned a {obj} to {IO}.",
]

# country, capital, language (None: no language fact)
COUNTRIES = [
    ("France", "Paris", "French"), ("Germany", "Berlin", "German"), ("Italy", "Rome", "Italian"),
    ("Spain", "Madrid", "Spanish"), ("Japan", "Tokyo", "Japanese"), ("China", "Beijing", "Chinese"),
    ("Russia", "Moscow", "Russian"), ("Egypt", "Cairo", "Arabic"), ("Greece", "Athens", "Greek"),
    ("Austria", "Vienna", None), ("Poland", "Warsaw", "Polish"), ("Norway", "Oslo", "Norwegian"),
    ("Sweden", "Stockholm", "Swedish"), ("Finland", "Helsinki", "Finnish"),
    ("Denmark", "Copenhagen", "Danish"), ("Ireland", "Dublin", None), ("Portugal", "Lisbon", "Portuguese"),
    ("Hungary", "Budapest", "Hungarian"), ("Kenya", "Nairobi", "Swahili"), ("Peru", "Lima", None),
    ("Chile", "Santiago", None), ("Cuba", "Havana", None), ("Canada", "Ottawa", None),
    ("Thailand", "Bangkok", "Thai"), ("Turkey", "Ankara", "Turkish"), ("Iran", "Tehran", "Persian"),
    ("Iraq", "Baghdad", None), ("Australia", "Canberra", None), ("England", "London", "English"),
    ("Belgium", "Brussels", None), ("Netherlands", "Amsterdam", "Dutch"), ("Switzerland", "Bern", None),
    ("Ukraine", "Kyiv", "Ukrainian"), ("Vietnam", "Hanoi", "Vietnamese"), ("Korea", "Seoul", "Korean"),
    ("Indonesia", "Jakarta", "Indonesian"), ("Philippines", "Manila", None), ("Nigeria", "Abuja", None),
    ("Morocco", "Rabat", None), ("Colombia", "Bogota", None),
]
LANDMARKS = [
    ("The Eiffel Tower", "Paris"), ("The Colosseum", "Rome"), ("The Brandenburg Gate", "Berlin"),
    ("Big Ben", "London"), ("The Kremlin", "Moscow"), ("The Acropolis", "Athens"),
    ("The Prado", "Madrid"), ("The Forbidden City", "Beijing"), ("The Sphinx", "Cairo"),
    ("The Little Mermaid", "Copenhagen"), ("The Rijksmuseum", "Amsterdam"), ("Shibuya Crossing", "Tokyo"),
]

CAPITAL_PHRASINGS = [
    "The capital of {country} is {capital}.",
    "{capital} is the capital of {country}.",
    "The capital city of {country} is {capital}.",
    "{country} has its capital in {capital}.",
]
LANGUAGE_PHRASINGS = [
    "The language of {country} is {language}.",
    "People in {country} speak {language}.",
    "In {country}, most people speak {language}.",
]
LANDMARK_PHRASINGS = [
    "{landmark} is in {city}.",
    "{landmark} is located in {city}.",
    "You can visit {landmark} in {city}.",
]

ADJECTIVES = [
    "big", "small", "red", "blue", "green", "old", "new", "happy", "sad", "quiet", "loud", "warm",
    "cold", "bright", "dark", "tall", "short", "busy", "lazy", "clever", "kind", "strange", "heavy",
    "light", "clean", "dirty", "fast", "slow", "sweet", "soft",
]
NOUNS = [
    "cat", "dog", "bird", "car", "tree", "house", "table", "chair", "window", "door", "song",
    "story", "game", "boat", "train", "lamp", "cup", "bag", "shirt", "picture", "horse", "apple",
    "bread", "phone", "clock", "road", "city", "river", "mountain", "idea",
]
VERBS_PAST = [
    "saw", "liked", "found", "bought", "painted", "cleaned", "moved", "opened", "closed", "washed",
    "watched", "carried", "fixed", "lost", "made", "picked", "mailed", "tossed", "returned", "kept",
]
VERBS_BASE = ["read", "sing", "cook", "swim", "dance", "travel", "write", "paint", "run", "sleep"]
TIMES = ["in the morning", "in the evening", "at night", "on Monday", "on the weekend", "every day"]
FILLER_TEMPLATES = [
    "{N1} {vpast} the {adj} {noun} {time}.",
    "The {adj} {noun} was near the {place}.",
    "{N1} likes to {vbase} {time}.",
    "{N1} said that the {noun} was {adj}.",
    "It was a {adj} day in {capital}, and {N1} stayed at the {place}.",
    "{N1} lives in {capital} with a {adj} {noun}.",
    "{N1} and {N2} are old friends.",
    "{N1} called {N2} {time}.",
    "{N1} went to the {place} {time}.",
    "The {noun} in the {place} is {adj}.",
    "{N1} thinks the {obj} is {adj}.",
    "{N1} {vpast} a {obj} at the {place}.",
    "My friend {N1} wants to {vbase}.",
    "{N1} met {N2} at the {place} in {capital}.",
    "Because it was {adj}, {N1} stayed at the {place}.",
    "Once {N1} reached the {place}, the {noun} was {adj}.",
    "So {N1} spent the evening at the {place}.",
]
# fmt: on

# One name, mentioned and then recalled: trains copying a name from context for every name
# (held-out ones included) without the two-name IOI choice.
COPY_TEMPLATES = [
    "{N1} was tired, so {N1} went home.",
    "{N1} lost a {obj}. Later, the {obj} was found by {N1}.",
    "This is {N1}. Everyone at the {place} likes {N1}.",
    "{N1} opened the door, and then the {noun} followed {N1}.",
    "The {obj} belongs to {N1}. It was a gift for {N1}.",
    "{N1} lives in {capital}. The {noun} was sent to {N1}.",
]

KIND_WEIGHTS = {"ioi": 0.38, "copy": 0.12, "induction": 0.25, "fact": 0.12, "filler": 0.13}


@dataclass(frozen=True)
class IoiExample:
    """One IOI sentence: `prompt` ends just before the indirect object (" " + io)."""

    prompt: str
    io: str
    subject: str

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.io}."


def ioi_example(template: str, names: list[str], rng: random.Random) -> IoiExample:
    a, b = rng.sample(names, 2)
    subject, io = (b, a) if rng.random() < 0.5 else (a, b)
    sentence = template.format(
        A=a, B=b, S=subject, IO="{IO}", place=rng.choice(PLACES), obj=rng.choice(OBJECTS)
    )
    prompt = sentence.split(" {IO}")[0]
    return IoiExample(prompt=prompt, io=io, subject=subject)


def fact_triples() -> list[tuple[str, str, str]]:
    """(relation, subject, answer) for every fact in the corpus."""
    facts = [("capital", c, cap) for c, cap, _ in COUNTRIES]
    facts += [("language", c, lang) for c, _, lang in COUNTRIES if lang]
    facts += [("landmark", lm, city) for lm, city in LANDMARKS]
    return facts


def fact_sentence(relation: str, subject: str, answer: str, phrasing: str) -> str:
    if relation == "capital":
        return phrasing.format(country=subject, capital=answer)
    if relation == "language":
        return phrasing.format(country=subject, language=answer)
    return phrasing.format(landmark=subject, city=answer)


PHRASINGS = {"capital": CAPITAL_PHRASINGS, "language": LANGUAGE_PHRASINGS, "landmark": LANDMARK_PHRASINGS}


def fact_eval_prompts() -> list[tuple[str, str]]:
    """(prompt, answer) in the first phrasing of each relation, cut before the answer."""
    prompts = []
    for relation, subject, answer in fact_triples():
        sentence = fact_sentence(relation, subject, "{ANSWER}", PHRASINGS[relation][0])
        prompts.append((sentence.split(" {ANSWER}")[0], answer))
    return prompts


def induction_pool() -> list[str]:
    """Words (all single tokens with a leading space) used for random repeated sequences."""
    capitals = [cap for _, cap, _ in COUNTRIES]
    words = NAMES + PLACES + OBJECTS + ADJECTIVES + NOUNS + VERBS_PAST + VERBS_BASE + capitals
    return sorted(set(words))


def induction_document(rng: random.Random) -> str:
    run = [rng.choice(INDUCTION_POOL) for _ in range(rng.randint(5, 20))]
    return " ".join(run * rng.choice((2, 2, 3)))


INDUCTION_POOL = induction_pool()


def filler_document(rng: random.Random, templates: list[str] = FILLER_TEMPLATES) -> str:
    n1, n2 = rng.sample(NAMES, 2)
    return rng.choice(templates).format(
        N1=n1, N2=n2, vpast=rng.choice(VERBS_PAST), vbase=rng.choice(VERBS_BASE),
        adj=rng.choice(ADJECTIVES), noun=rng.choice(NOUNS), time=rng.choice(TIMES),
        place=rng.choice(PLACES), obj=rng.choice(OBJECTS), capital=rng.choice(COUNTRIES)[1],
    )


def fact_document(rng: random.Random, facts: list[tuple[str, str, str]]) -> str:
    relation, subject, answer = rng.choice(facts)
    return fact_sentence(relation, subject, answer, rng.choice(PHRASINGS[relation]))


def ioi_document(rng: random.Random) -> str:
    return ioi_example(rng.choice(IOI_TRAIN_TEMPLATES), TRAIN_NAMES, rng).text


def build_documents(n_lines: int, seed: int = SEED) -> list[tuple[str, str]]:
    """(kind, text) pairs; kind in KIND_WEIGHTS."""
    rng = random.Random(seed)
    facts = fact_triples()
    kinds = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()), k=n_lines)
    makers = {
        "ioi": lambda: ioi_document(rng),
        "induction": lambda: induction_document(rng),
        "fact": lambda: fact_document(rng, facts),
        "filler": lambda: filler_document(rng),
        "copy": lambda: filler_document(rng, COPY_TEMPLATES),
    }
    return [(kind, makers[kind]()) for kind in kinds]


def train_tokenizer(documents: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def must_be_single_tokens() -> list[str]:
    """Words that must each encode to exactly one token when preceded by a space."""
    answers = [answer for _, _, answer in fact_triples()]
    return sorted(set(NAMES + answers + INDUCTION_POOL))


def check_single_tokens(tokenizer: Tokenizer) -> None:
    bad = [w for w in must_be_single_tokens() if len(tokenizer.encode(" " + w).ids) != 1]
    assert not bad, f"not single tokens: {bad}"


def words_of(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z]+", text))


def check_heldout(documents: list[tuple[str, str]]) -> None:
    """Held-out names never appear in IOI sentences but do appear in other documents."""
    heldout = set(HELDOUT_NAMES)
    seen_elsewhere: set[str] = set()
    for kind, text in documents:
        names = words_of(text) & heldout
        assert kind != "ioi" or not names, f"held-out name in IOI document: {text}"
        seen_elsewhere |= names
    assert seen_elsewhere == heldout, f"held-out names never seen: {heldout - seen_elsewhere}"


def build(out_dir: Path = DATA_DIR, n_lines: int = DEFAULT_LINES) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    documents = build_documents(n_lines)
    check_heldout(documents)
    texts = [text for _, text in documents]
    tokenizer = train_tokenizer(texts)
    check_single_tokens(tokenizer)
    corpus_path, tokenizer_path = out_dir / "corpus.txt", out_dir / "tokenizer.json"
    corpus_path.write_text("\n".join(texts) + "\n")
    tokenizer.save(str(tokenizer_path))
    print(f"wrote {len(documents)} documents to {corpus_path}; vocab {tokenizer.get_vocab_size()}")
    return corpus_path, tokenizer_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    parser.add_argument("--lines", type=int, default=DEFAULT_LINES)
    args = parser.parse_args()
    build(args.out, args.lines)


if __name__ == "__main__":
    main()
