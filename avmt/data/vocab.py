"""The AVSynth vocabulary: every word a synthetic scene can be described with.

Tasks build their prompts and answers from these tuples, and the offline tokenizer of the
tiny default LLM is built from the words the tasks declare, so a word added here must also be
reachable through a task's ``words()``.
"""

CLASSES: tuple[str, ...] = (
    "violin",
    "flute",
    "guitar",
    "drum",
    "piano",
    "trumpet",
    "cello",
    "bell",
    "dog",
    "cat",
    "car",
    "bird",
    "clock",
    "siren",
    "cow",
    "horn",
)
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring", "bar", "star")
POSITIONS: tuple[str, ...] = ("left", "center", "right")
ROWS: tuple[str, ...] = ("top", "bottom")
MOTIONS: tuple[str, ...] = ("static", "moving left", "moving right", "moving up", "moving down", "pulsing")
MOODS: tuple[str, ...] = ("happy", "sad", "calm", "tense")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

#: How an object's screen column reads in a sentence ("the red violin on the left").
POSITION_PHRASES: dict[str, str] = {"left": "on the left", "center": "in the center", "right": "on the right"}
