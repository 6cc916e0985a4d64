"""Small built-in vocabulary for the generated tasks: everyday words, words grouped by category, and names."""

from __future__ import annotations

CATEGORIES: dict[str, list[str]] = {
    "an animal": [
        "horse", "rabbit", "tiger", "dolphin", "eagle", "turtle", "giraffe", "monkey", "penguin", "zebra",
        "squirrel", "elephant", "kangaroo", "octopus", "camel", "beaver",
    ],
    "a fruit": [
        "apple", "banana", "cherry", "mango", "peach", "grape", "lemon", "orange", "pear", "plum",
        "apricot", "melon", "papaya", "coconut", "strawberry", "pineapple",
    ],
    "a color": [
        "red", "blue", "green", "yellow", "purple", "brown", "black", "white", "pink", "gray",
        "violet", "silver", "golden", "crimson", "turquoise", "indigo",
    ],
    "a musical instrument": [
        "piano", "violin", "guitar", "trumpet", "flute", "drum", "cello", "harp", "clarinet", "banjo",
        "trombone", "accordion", "saxophone", "harmonica", "ukulele", "tuba",
    ],
    "a piece of furniture": [
        "chair", "table", "sofa", "bed", "desk", "shelf", "cabinet", "stool", "bench", "dresser",
        "wardrobe", "armchair", "cupboard", "bookcase", "couch", "cradle",
    ],
    "a vehicle": [
        "car", "bicycle", "truck", "train", "airplane", "boat", "bus", "scooter", "tractor", "helicopter",
        "submarine", "motorcycle", "canoe", "wagon", "rocket", "taxi",
    ],
}  # fmt: skip

COMMON_WORDS: list[str] = [
    "about", "across", "answer", "autumn", "balance", "basket", "beautiful", "believe", "between", "blanket",
    "bottle", "bridge", "bright", "butter", "button", "candle", "careful", "castle", "center", "chapter",
    "chicken", "children", "circle", "classroom", "cloud", "coffee", "common", "complete", "corner", "country",
    "cousin", "danger", "daughter", "decide", "different", "dinner", "doctor", "dollar", "dream", "early",
    "earth", "engine", "enough", "evening", "example", "family", "famous", "farmer", "feather", "finger",
    "flower", "forest", "friend", "garden", "gentle", "giant", "glass", "government", "happen", "harvest",
    "health", "history", "hospital", "hungry", "island", "journey", "kitchen", "knowledge", "ladder", "language",
    "letter", "library", "listen", "machine", "market", "middle", "minute", "mirror", "mississippi", "morning",
    "mountain", "music", "narrow", "nature", "necessary", "neighbor", "number", "ocean", "office", "paper",
    "parallel", "pencil", "people", "picture", "planet", "pocket", "possible", "potato", "question", "rabbit",
    "rainbow", "remember", "river", "school", "science", "season", "second", "shadow", "silence", "simple",
    "sister", "society", "spirit", "spring", "square", "station", "story", "strength", "student", "summer",
    "sunshine", "surprise", "teacher", "thousand", "through", "thunder", "together", "tomorrow", "travel", "trouble",
    "umbrella", "village", "voyage", "walnut", "weather", "window", "winter", "wonder", "yellow", "yesterday",
]  # fmt: skip

# every word the spelling task may ask about, deduplicated, in a fixed order
WORDS: list[str] = sorted({*COMMON_WORDS, *(w for words in CATEGORIES.values() for w in words)})

NAMES: list[str] = [
    "Ava", "Liam", "Maya", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Sofia", "Kenji",
    "Amara", "Diego", "Hana", "Felix", "Priya", "Jonas", "Leila", "Mateo", "Nora", "Tariq",
]  # fmt: skip
