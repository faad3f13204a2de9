"""Hand-written word lists and fact tables behind the template families.

Kept small and checked by hand: every fact here is uncontroversial (no disputed capitals, no
countries whose main language or continent is ambiguous; those cells are ``None`` and the matching
prompts are simply not generated). Add rows freely; the template space grows with them.
"""

from __future__ import annotations

# --------------------------------------------------------------------------------------------
# factual recall
# --------------------------------------------------------------------------------------------

# country: (capital, main language or None, continent or None)
COUNTRIES: dict[str, tuple[str, str | None, str | None]] = {
    "France": ("Paris", "French", "Europe"),
    "Germany": ("Berlin", "German", "Europe"),
    "Italy": ("Rome", "Italian", "Europe"),
    "Spain": ("Madrid", "Spanish", "Europe"),
    "Portugal": ("Lisbon", "Portuguese", "Europe"),
    "Greece": ("Athens", "Greek", "Europe"),
    "Poland": ("Warsaw", "Polish", "Europe"),
    "Sweden": ("Stockholm", "Swedish", "Europe"),
    "Norway": ("Oslo", "Norwegian", "Europe"),
    "Finland": ("Helsinki", "Finnish", "Europe"),
    "Denmark": ("Copenhagen", "Danish", "Europe"),
    "Austria": ("Vienna", "German", "Europe"),
    "Hungary": ("Budapest", "Hungarian", "Europe"),
    "Romania": ("Bucharest", "Romanian", "Europe"),
    "Ukraine": ("Kyiv", "Ukrainian", "Europe"),
    "Iceland": ("Reykjavik", "Icelandic", "Europe"),
    "Ireland": ("Dublin", None, "Europe"),
    "Japan": ("Tokyo", "Japanese", "Asia"),
    "China": ("Beijing", "Chinese", "Asia"),
    "South Korea": ("Seoul", "Korean", "Asia"),
    "Thailand": ("Bangkok", "Thai", "Asia"),
    "Vietnam": ("Hanoi", "Vietnamese", "Asia"),
    "Iran": ("Tehran", "Persian", "Asia"),
    "India": ("New Delhi", None, "Asia"),
    "Egypt": ("Cairo", "Arabic", "Africa"),
    "Kenya": ("Nairobi", None, "Africa"),
    "Ethiopia": ("Addis Ababa", "Amharic", "Africa"),
    "Nigeria": ("Abuja", None, "Africa"),
    "Mexico": ("Mexico City", "Spanish", "North America"),
    "Cuba": ("Havana", "Spanish", "North America"),
    "Canada": ("Ottawa", None, "North America"),
    "Brazil": ("Brasília", "Portuguese", "South America"),
    "Argentina": ("Buenos Aires", "Spanish", "South America"),
    "Peru": ("Lima", "Spanish", "South America"),
    "Chile": ("Santiago", "Spanish", "South America"),
    "Colombia": ("Bogotá", "Spanish", "South America"),
    "Australia": ("Canberra", "English", None),
}

# landmark (used after "The"): city
LANDMARKS: dict[str, str] = {
    "Eiffel Tower": "Paris", "Louvre": "Paris", "Colosseum": "Rome", "Statue of Liberty": "New York",
    "Brandenburg Gate": "Berlin", "Sagrada Familia": "Barcelona", "Acropolis": "Athens",
    "Kremlin": "Moscow", "Forbidden City": "Beijing", "Golden Gate Bridge": "San Francisco",
"Taj Mahal": "Agra", "Space Needle": "Seattle",
    "Burj Khalifa": "Dubai", "Hagia Sophia": "Istanbul", "Leaning Tower": "Pisa",
}

# element: chemical symbol
ELEMENTS: dict[str, str] = {
    "gold": "Au", "silver": "Ag", "iron": "Fe", "copper": "Cu", "lead": "Pb", "sodium": "Na",
    "potassium": "K", "oxygen": "O", "hydrogen": "H", "carbon": "C", "nitrogen": "N", "helium": "He",
    "tin": "Sn", "mercury": "Hg", "zinc": "Zn", "calcium": "Ca", "neon": "Ne", "sulfur": "S",
}

# book title: author
BOOKS: dict[str, str] = {
    "Pride and Prejudice": "Jane Austen", "Hamlet": "William Shakespeare", "War and Peace": "Leo Tolstoy",
    "Nineteen Eighty-Four": "George Orwell", "Don Quixote": "Miguel de Cervantes", "Moby-Dick": "Herman Melville",
    "Crime and Punishment": "Fyodor Dostoevsky", "Frankenstein": "Mary Shelley",
    "Great Expectations": "Charles Dickens", "Les Misérables": "Victor Hugo", "Ulysses": "James Joyce",
    "The Great Gatsby": "F. Scott Fitzgerald", "One Hundred Years of Solitude": "Gabriel García Márquez",
    "The Divine Comedy": "Dante Alighieri", "Jane Eyre": "Charlotte Brontë", "The Odyssey": "Homer",
}

# company: country of its headquarters
COMPANIES: dict[str, str] = {
    "Toyota": "Japan", "Sony": "Japan", "Honda": "Japan", "Volkswagen": "Germany", "Siemens": "Germany",
    "BMW": "Germany", "Adidas": "Germany", "Samsung": "South Korea", "Hyundai": "South Korea",
    "Nokia": "Finland", "Nestlé": "Switzerland", "Ferrari": "Italy", "Fiat": "Italy", "Renault": "France",
    "Peugeot": "France", "Philips": "the Netherlands", "Lego": "Denmark", "Volvo": "Sweden",
    "Spotify": "Sweden",
}

# relation -> [(form, template)]. Completion templates end right before the answer (the answer is
# the next word); question templates end with "?".
FACT_TEMPLATES: dict[str, list[tuple[str, str]]] = {
    "capital": [
        ("completion", "The capital of {s} is"),
        ("completion", "The capital city of {s} is"),
        ("completion", "{s}'s capital city is called"),
        ("completion", "The government of {s} sits in the city of"),
        ("question", "What is the capital of {s}?"),
    ],
    "language": [
        ("completion", "The main language spoken in {s} is"),
        ("completion", "Most people in {s} speak"),
        ("completion", "The language most people in {s} speak is"),
        ("question", "Which language do most people in {s} speak?"),
    ],
    "continent": [
        ("completion", "{s} is a country in"),
        ("completion", "{s} is located on the continent of"),
        ("question", "On which continent is {s}?"),
    ],
    "landmark_city": [
        ("completion", "The {s} is located in the city of"),
        ("completion", "The {s} can be found in"),
        ("completion", "Tourists visit the {s} in"),
        ("question", "In which city is the {s}?"),
    ],
    "chemical_symbol": [
        ("completion", "The chemical symbol for {s} is"),
        ("completion", "In the periodic table, {s} has the symbol"),
        ("question", "What is the chemical symbol for {s}?"),
    ],
    "author": [
        ("completion", "{s} was written by"),
        ("completion", "The author of {s} is"),
        ("question", "Who wrote {s}?"),
    ],
    "company_country": [
        ("completion", "{s} is a company headquartered in"),
        ("completion", "The company {s} is based in"),
        ("question", "In which country is {s} headquartered?"),
    ],
}


def fact_table() -> list[tuple[str, str, str, str]]:
    """Every fact as ``(relation, subject_type, subject, answer)``, in a fixed order."""
    facts: list[tuple[str, str, str, str]] = []
    for country, (capital, language, continent) in COUNTRIES.items():
        facts.append(("capital", "country", country, capital))
        if language is not None:
            facts.append(("language", "country", country, language))
        if continent is not None:
            facts.append(("continent", "country", country, continent))
    facts += [("landmark_city", "landmark", s, a) for s, a in LANDMARKS.items()]
    facts += [("chemical_symbol", "element", s, a) for s, a in ELEMENTS.items()]
    facts += [("author", "book", s, a) for s, a in BOOKS.items()]
    facts += [("company_country", "company", s, a) for s, a in COMPANIES.items()]
    return facts


# --------------------------------------------------------------------------------------------
# sentiment
# --------------------------------------------------------------------------------------------

SENTIMENT_THINGS = ["movie", "book", "restaurant", "hotel", "concert", "meal", "phone", "game", "show",
                    "trip", "service", "album", "lecture", "museum"]
SENTIMENT_WORDS: dict[str, list[str]] = {
    "positive": ["wonderful", "excellent", "delightful", "superb", "great", "fantastic", "lovely",
                 "brilliant", "charming", "enjoyable", "impressive", "amazing"],
    "negative": ["terrible", "awful", "dreadful", "boring", "disappointing", "horrible", "unpleasant",
                 "dull", "poor", "annoying", "mediocre", "painful"],
    # predicates that state a fact without judging it
    "neutral": ["new", "recent", "from last year", "listed online", "mentioned in the newspaper",
                "discussed at dinner", "about what I expected", "neither good nor bad", "fairly typical",
                "the usual kind"],
}
# only gradable (positive/negative) words take an intensifier
SENTIMENT_INTENSIFIERS = ["", "really ", "quite ", "very "]
SENTIMENT_TEMPLATES = [
    "The {thing} was {word}.",
    "I thought the {thing} was {word}.",
    "Honestly, the {thing} is {word}.",
    "My friends said the {thing} was {word}.",
    "Overall, the {thing} was {word}.",
    "In my opinion, this {thing} is {word}.",
]

# --------------------------------------------------------------------------------------------
# number agreement
# --------------------------------------------------------------------------------------------

# (singular, plural)
AGREEMENT_SUBJECTS = [
    ("key", "keys"), ("author", "authors"), ("dog", "dogs"), ("teacher", "teachers"), ("car", "cars"),
    ("picture", "pictures"), ("boy", "boys"), ("girl", "girls"), ("child", "children"), ("man", "men"),
    ("woman", "women"), ("doctor", "doctors"), ("student", "students"), ("bottle", "bottles"),
    ("label", "labels"), ("farmer", "farmers"), ("painting", "paintings"), ("player", "players"),
]
AGREEMENT_DISTRACTORS = [
    ("cabinet", "cabinets"), ("table", "tables"), ("house", "houses"), ("village", "villages"),
    ("window", "windows"), ("garden", "gardens"), ("school", "schools"), ("tree", "trees"),
]
AGREEMENT_PREPOSITIONS = ["near", "behind", "beside", "next to", "across from"]
AGREEMENT_FRAMES = ["The {subject} {prep} the {distractor}", "I think the {subject} {prep} the {distractor}",
                    "Everyone knows that the {subject} {prep} the {distractor}"]
AGREEMENT_VERBS = {"singular": ("is", "are"), "plural": ("are", "is")}  # (correct, wrong)

# --------------------------------------------------------------------------------------------
# syntax
# --------------------------------------------------------------------------------------------

SYNTAX_AGENTS = ["the chef", "the teacher", "the girl", "the farmer", "the doctor", "the artist",
                 "my neighbour", "the student", "the pilot", "the gardener"]
# (base, past, past participle, patients); patients are singular so passives take "was"
SYNTAX_VERBS = [
    ("cook", "cooked", "cooked", ["the meal", "the soup", "the rice"]),
    ("write", "wrote", "written", ["the letter", "the report", "the poem"]),
    ("paint", "painted", "painted", ["the fence", "the portrait", "the door"]),
    ("build", "built", "built", ["the shed", "the bridge", "the wall"]),
    ("clean", "cleaned", "cleaned", ["the kitchen", "the window", "the car"]),
    ("read", "read", "read", ["the book", "the article", "the note"]),
    ("open", "opened", "opened", ["the gate", "the box", "the parcel"]),
    ("fix", "fixed", "fixed", ["the bicycle", "the roof", "the clock"]),
    ("find", "found", "found", ["the key", "the wallet", "the map"]),
    ("sell", "sold", "sold", ["the house", "the painting", "the piano"]),
    ("break", "broke", "broken", ["the vase", "the glass", "the plate"]),
    ("drive", "drove", "driven", ["the truck", "the bus", "the van"]),
    ("wash", "washed", "washed", ["the shirt", "the dog", "the floor"]),
    ("visit", "visited", "visited", ["the museum", "the castle", "the farm"]),
]
