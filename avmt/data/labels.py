"""Label sets of the real audio-visual datasets, copied exactly from the datasets' own sources.

Class names are kept as the datasets write them (case, spaces, commas, underscores, hyphens and
parentheses included); the task parsers return them as written and the metrics compare them
case- and whitespace-insensitively (:func:`avmt.tasks.text.label_key`).
"""

from __future__ import annotations

__all__ = [
    "AVE_CLASSES",
    "LLP_CLASSES",
    "AVSBENCH_SEMANTIC_BACKGROUND",
    "AVSBENCH_SEMANTIC_CLASSES",
    "AVSBENCH_SEMANTIC_LABELS",
    "MUSIC_AVQA_INSTRUMENTS",
    "MUSIC_AVQA_ANSWERS",
]

#: AVE (Tian et al., ECCV 2018): the 28 event categories, in the dataset's label-index order.
#: Source: the category field (first ``&``-separated column) of YapengTian/AVE-ECCV18
#: ``data/Annotations.txt`` ("Church bell&RUhOCu3LNXM&good&0&10", "Male speech, man
#: speaking&..."); the ordered list as the AVE code bases write it out (``STANDARD_AVE_DATASET``
#: in the AVE dataloaders of follow-up work, e.g. CMRAN / PSP). Spot-checked against the first
#: rows of ``Annotations.txt``; not every row of the file was read.
AVE_CLASSES: tuple[str, ...] = (
    "Church bell",
    "Male speech, man speaking",
    "Bark",
    "Fixed-wing aircraft, airplane",
    "Race car, auto racing",
    "Female speech, woman speaking",
    "Helicopter",
    "Violin, fiddle",
    "Flute",
    "Ukulele",
    "Frying (food)",
    "Truck",
    "Shofar",
    "Motorcycle",
    "Acoustic guitar",
    "Train horn",
    "Clock",
    "Banjo",
    "Goat",
    "Baby cry, infant cry",
    "Bus",
    "Chainsaw",
    "Cat",
    "Horse",
    "Toilet flush",
    "Rodents, rats, mice",
    "Accordion",
    "Mandolin",
)

#: LLP (Look, Listen and Parse; AVVP, Tian et al., ECCV 2020): the 25 event classes, in label-index
#: order. Source: ``categories`` in ``ids_to_multinomial`` of YapengTian/AVVP-ECCV20
#: ``dataloader.py`` (the spelling of the ``event_labels`` column of ``data/AVVP_*.csv``).
LLP_CLASSES: tuple[str, ...] = (
    "Speech",
    "Car",
    "Cheering",
    "Dog",
    "Cat",
    "Frying_(food)",
    "Basketball_bounce",
    "Fire_alarm",
    "Chainsaw",
    "Cello",
    "Banjo",
    "Singing",
    "Chicken_rooster",
    "Violin_fiddle",
    "Vacuum_cleaner",
    "Baby_laughter",
    "Accordion",
    "Lawn_mower",
    "Motorcycle",
    "Helicopter",
    "Acoustic_guitar",
    "Telephone_bell_ringing",
    "Baby_cry_infant_cry",
    "Blender",
    "Clapping",
)

#: AVSBench-semantic (AVSS, Zhou et al. 2023): label index 1 of ``label2idx``.
AVSBENCH_SEMANTIC_BACKGROUND = "background"

#: AVSBench-semantic: the 70 sounding-object classes (label indices 2..71 of ``label2idx``; with
#: "background" at index 1 that is the 71-entry label set, the README's "70 categories" plus
#: background). Source: the ``label2idx`` dict (1 = background .. 71 = woman) of the AVSBench
#: AVSS preprocessing code, as found in two public AVSS code bases that copy it; the
#: OpenNLPLab/AVSBench ``avs_scripts/avss`` file itself and its colour palette were not found in
#: the searched index, so this list is checked against those copies, not the original file.
AVSBENCH_SEMANTIC_CLASSES: tuple[str, ...] = (
    "accordion",
    "airplane",
    "axe",
    "baby",
    "bassoon",
    "bell",
    "bird",
    "boat",
    "boy",
    "bus",
    "car",
    "cat",
    "cello",
    "clarinet",
    "clipper",
    "clock",
    "dog",
    "donkey",
    "drum",
    "duck",
    "elephant",
    "emergency-car",
    "erhu",
    "flute",
    "frying-food",
    "girl",
    "goose",
    "guitar",
    "gun",
    "guzheng",
    "hair-dryer",
    "handpan",
    "harmonica",
    "harp",
    "helicopter",
    "hen",
    "horse",
    "keyboard",
    "leopard",
    "lion",
    "man",
    "marimba",
    "missile-rocket",
    "motorcycle",
    "mower",
    "parrot",
    "piano",
    "pig",
    "pipa",
    "saw",
    "saxophone",
    "sheep",
    "sitar",
    "sorna",
    "squirrel",
    "tabla",
    "tank",
    "tiger",
    "tractor",
    "train",
    "trombone",
    "truck",
    "trumpet",
    "tuba",
    "ukulele",
    "utv",
    "vacuum-cleaner",
    "violin",
    "wolf",
    "woman",
)

#: AVSBench-semantic's full ``label2idx`` order: background (1) then the 70 classes (2..71).
AVSBENCH_SEMANTIC_LABELS: tuple[str, ...] = (AVSBENCH_SEMANTIC_BACKGROUND, *AVSBENCH_SEMANTIC_CLASSES)

#: MUSIC-AVQA (Li et al., CVPR 2022): the 22 instrument answers, alphabetical. Source: the distinct
#: ``anser`` values of GeWu-Lab/MUSIC-AVQA's ``avqa-test.json`` (the repository README: "all 42
#: kinds of answers"), as listed in third-party code that enumerates them; the JSON file itself
#: was not read here. The 21-class MUSIC / MUSIC-21 lists lack "suona".
MUSIC_AVQA_INSTRUMENTS: tuple[str, ...] = (
    "accordion",
    "acoustic_guitar",
    "bagpipe",
    "banjo",
    "bassoon",
    "cello",
    "clarinet",
    "congas",
    "drum",
    "electric_bass",
    "erhu",
    "flute",
    "guzheng",
    "piano",
    "pipa",
    "saxophone",
    "suona",
    "trumpet",
    "tuba",
    "ukulele",
    "violin",
    "xylophone",
)

#: MUSIC-AVQA: all 42 answers (same source as :data:`MUSIC_AVQA_INSTRUMENTS`), alphabetical.
MUSIC_AVQA_ANSWERS: tuple[str, ...] = tuple(sorted((
    *MUSIC_AVQA_INSTRUMENTS,
    "yes", "no",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "more than ten",
    "left", "middle", "right",
    "indoor", "outdoor",
    "simultaneously",
)))
