"""Themes of the GSM-Infinite medium/hard problems (Zhou et al., 2025, arXiv 2502.05252).

Each theme is a three-level hierarchy, as in the reference's `simple_names_three.py`:

    top item (a location)  ->  middle item (a kind of adult animal)  ->  a per-item average (newborn children)

with the two category phrases used by the implicit totals ("the total number of adult animals in X",
"the total number of newborn animal children in X") and an instruction message that states what those
totals mean. Vocabularies and messages are written for llmx; only the three theme names and the category
ideas come from the reference.

The distractor ("close noise") vocabularies are separate and never overlap the core ones, so a distractor
statement always introduces a new parameter and never joins a total that a question depends on. Their
top items are built by combining word lists, which gives thousands of distinct names: enough distinct
parameters for 128k-token contexts.

Every name obeys the grammar the solver parses: no period, comma or digit, and none of the words
"in", "per", "and", "of", "equals", "plus", "times", "exists" (tests check this).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

THEMES: Tuple[str, ...] = ("crazy_zootopia", "teachers_in_school", "movie_festival_awards")


@dataclass(frozen=True)
class Theme:
    name: str
    tops: Tuple[str, ...]  # layer 0: locations / cities / festivals
    mids: Tuple[str, ...]  # layer 1: adult animals / school kinds / movie genres
    child: str  # layer 2 as it appears in "the average number of <child> per <mid> in <top>"
    cat1: str  # "the total number of <cat1> in <top>": sum of the mentioned <mid> counts
    cat2: str  # "the total number of <cat2> in <top>": sum over mids of count x average
    message: str  # instruction sent before every problem
    reverse_hint: str  # appended to the message in reverse mode
    noise_tops: Tuple[str, ...]
    noise_mids: Tuple[str, ...]


_ANSWER_RULE = ("Give your final answer on its own as 'Answer: xxx', where xxx is the number you "
                "computed.")
_SELF_CONTAINED = ("The problem stands alone: no quantity from any other problem applies to it, so "
                   "work every number out again from the statements below.")
_REVERSE_HINT = ("Tip: one quantity is not given directly; writing an equation for it and solving "
                 "that equation is the easiest way to find it.")

_ZOO_MESSAGE = (
    "Read the statements and answer the question at the end. How to read them: the total number of "
    "adult animals in a location means the sum of every kind of adult animal that the problem mentions "
    "for that location; newborn children are not part of it. If a kind of animal is never mentioned for "
    "a location, that location has none of it (count it as 0). The average number of newborn children "
    "of one kind of animal may differ from one location to another. The total number of newborn animal "
    "children in a location means the sum, over every kind of adult animal mentioned for that location, "
    "of that animal's number there times its average number of newborn children there: a total, not an "
    "average. " + _SELF_CONTAINED + " " + _ANSWER_RULE
)

_SCHOOL_MESSAGE = (
    "Read the statements and answer the question at the end. How to read them: the total number of "
    "schools in a city means the sum of every kind of school that the problem mentions for that city. "
    "If a kind of school is never mentioned for a city, that city has none of it (count it as 0). The "
    "average number of teachers of one kind of school may differ from one city to another. The total "
    "number of teachers from all schools in a city means the sum, over every kind of school mentioned "
    "for that city, of the number of those schools there times their average number of teachers there: "
    "a total, not an average. " + _SELF_CONTAINED + " " + _ANSWER_RULE
)

_MOVIE_MESSAGE = (
    "Read the statements and answer the question at the end. Every genre named below (comedies, "
    "dramas, thrillers and the rest) is a kind of movie. How to read them: the total number of movies "
    "at a festival means the sum of every kind of movie that the problem mentions for that festival. If "
    "a kind of movie is never mentioned for a festival, that festival shows none of it (count it as 0). "
    "The average number of nominations of one kind of movie may differ from one festival to another. "
    "The total number of movie nominations at a festival means the sum, over every kind of movie "
    "mentioned for that festival, of the number of those movies there times their average number of "
    "nominations there: a total, not an average. " + _SELF_CONTAINED + " " + _ANSWER_RULE
)

# Shared first halves of the distractor top names.
_ADJECTIVES = (
    "Amber", "Ashen", "Azure", "Birch", "Briar", "Bright", "Cinder", "Clover", "Cobalt", "Coral",
    "Crimson", "Crystal", "Dusky", "Ember", "Fern", "Frost", "Gilded", "Golden", "Granite", "Hazel",
    "Heather", "Ivory", "Jade", "Juniper", "Lavender", "Linden", "Lunar", "Marble", "Misty", "Mossy",
    "Oaken", "Obsidian", "Pebble", "Quiet", "Raven", "Rowan", "Russet", "Sable", "Saffron", "Scarlet",
    "Slate", "Sparrow", "Sunny", "Thistle", "Velvet", "Verdant", "Wild", "Windy", "Wren", "Zephyr",
)
_PLACE_NOUNS = (
    "Basin", "Bluff", "Canyon", "Cove", "Crag", "Creek", "Dale", "Delta", "Dunes", "Fen", "Fjord",
    "Glade", "Glen", "Gorge", "Grove", "Gulch", "Harbor", "Heath", "Highlands", "Hills", "Inlet", "Isle",
    "Lagoon", "Marsh", "Mesa", "Moor", "Oasis", "Plains", "Plateau", "Prairie", "Rapids", "Reef",
    "Savanna", "Shoals", "Springs", "Steppe", "Thicket", "Tundra", "Wetlands", "Woodland",
)
_TOWN_SUFFIXES = (
    "ford", "ton", "ville", "field", "bury", "wick", "dale", "haven", "port", "mouth", "stead", "worth",
    "ridge", "gate", "moor", "well", "thorpe", "hurst", "combe", "ley", "minster", "borough", "chester",
    "ham", "land", "cliff", "crest", "fell", "holm", "shaw", "side", "stow", "vale", "wood", "bridge",
    "croft", "burgh", "by", "mead", "wold",
)
_FESTIVAL_NOUNS = (
    "Arch", "Beacon", "Bridge", "Castle", "Comet", "Crown", "Feather", "Forge", "Garden", "Gate",
    "Harbor", "Horizon", "Island", "Key", "Lighthouse", "Mirror", "Moon", "Orchard", "Palace", "Pier",
    "Prism", "Quill", "Ribbon", "River", "Sail", "Shore", "Signal", "Spire", "Star", "Summit", "Temple",
    "Tower", "Valley", "Vista", "Wave", "Window", "Wing", "Meadow", "Canyon", "Compass",
)


def _combine(first, second, sep: str = " ", suffix: str = "") -> Tuple[str, ...]:
    return tuple(f"{a}{sep}{b}{suffix}" for a in first for b in second)


CRAZY_ZOOTOPIA = Theme(
    name="crazy_zootopia",
    tops=("Harlow Wildlife Park", "Redfern Zoo", "Bramble Hollow", "Quarry Lake Reserve", "Willowmere Sanctuary",
          "Kestrel Ridge", "Copperfield Farm", "Lantern Bay Aquarium", "Sunmeadow Ranch", "Ashdown Woods",
          "Marigold Petting Zoo", "Stonebrook Valley"),
    mids=("adult badger", "adult otter", "adult lynx", "adult heron", "adult hedgehog", "adult moose",
          "adult penguin", "adult bison", "adult koala", "adult falcon", "adult beaver", "adult seal"),
    child="newborn children",
    cat1="adult animals",
    cat2="newborn animal children",
    message=_ZOO_MESSAGE,
    reverse_hint=_REVERSE_HINT,
    noise_tops=_combine(_ADJECTIVES, _PLACE_NOUNS),
    noise_mids=tuple("adult " + a for a in (
        "alpaca", "antelope", "armadillo", "baboon", "camel", "caribou", "cheetah", "chinchilla", "cobra",
        "condor", "cougar", "coyote", "crane", "dingo", "dolphin", "elk", "ferret", "flamingo", "gazelle",
        "gecko", "gibbon", "gorilla", "hippo", "hyena", "ibis", "iguana", "jackal", "jaguar", "kangaroo",
        "lemur", "llama", "macaw", "meerkat", "mongoose", "narwhal", "ocelot", "orangutan", "panther",
        "pelican", "porcupine", "puffin", "reindeer", "salamander", "skunk", "sloth", "tapir", "toucan",
        "walrus", "wombat", "yak", "zebra")),
)

TEACHERS_IN_SCHOOL = Theme(
    name="teachers_in_school",
    tops=("Northgate City", "Fallowmere", "Pinecrest Town", "Lakemont City", "Harborview City", "Elmstead",
          "Granite Falls", "Meadowvale", "Coralport City", "Foxbury Town", "Windmere City", "Redcliff Town"),
    mids=("primary school", "community college", "arts academy", "boarding school", "language school",
          "vocational school", "charter school", "music conservatory", "nursing school",
          "engineering institute", "kindergarten", "sports academy"),
    child="teachers",
    cat1="schools",
    cat2="teachers from all schools",
    message=_SCHOOL_MESSAGE,
    reverse_hint=_REVERSE_HINT,
    noise_tops=_combine(_ADJECTIVES, _TOWN_SUFFIXES, sep=""),
    noise_mids=(
        "art school", "law school", "flight school", "cooking school", "dance school", "drama school",
        "driving school", "business school", "design school", "film school", "math academy",
        "science academy", "coding bootcamp", "military academy", "police academy", "ballet academy",
        "chess academy", "technical institute", "agricultural college", "maritime college",
        "teachers college", "theology seminary", "veterinary school", "dental school", "pharmacy school",
        "architecture school", "journalism school", "fashion institute", "culinary institute",
        "aviation academy", "forestry college", "montessori school", "online academy", "night school",
        "summer school", "robotics academy", "circus school", "sailing school", "photography school",
        "carpentry school"),
)

MOVIE_FESTIVAL_AWARDS = Theme(
    name="movie_festival_awards",
    tops=("Amberlight Film Festival", "Northern Lights Movie Festival", "Crescent Bay Film Festival",
          "Silver Reel Festival", "Riverside Screen Festival", "Harbor Lantern Film Festival",
          "Velvet Curtain Festival", "Summit Peak Film Festival", "Golden Dune Movie Festival",
          "Blue Orchard Movie Festival", "Starfall Cinema Festival", "Maple Leaf Screen Festival"),
    mids=("romantic comedy", "historical drama", "space opera", "heist thriller", "animated fable",
          "musical biopic", "war epic", "psychological horror", "courtroom drama", "coming-of-age story",
          "nature documentary", "spy caper"),
    child="nominations",
    cat1="movies",
    cat2="movie nominations",
    message=_MOVIE_MESSAGE,
    reverse_hint=_REVERSE_HINT,
    noise_tops=_combine(_ADJECTIVES, _FESTIVAL_NOUNS, suffix=" Film Festival"),
    noise_mids=(
        "slapstick comedy", "film noir", "western", "zombie movie", "disaster movie", "superhero movie",
        "martial arts movie", "mockumentary", "silent film", "period piece", "road movie", "buddy comedy",
        "monster movie", "time travel movie", "cyberpunk thriller", "space western", "sports drama",
        "legal thriller", "medical drama", "political satire", "teen comedy", "fantasy epic",
        "pirate adventure", "jungle adventure", "ghost story", "vampire movie", "detective mystery",
        "family comedy", "dance musical", "concert film", "survival drama", "spy thriller",
        "kaiju movie", "gangster drama", "sword epic", "puppet movie", "heist comedy", "alien invasion movie",
        "submarine thriller", "wilderness documentary"),
)

THEME_BY_NAME: Dict[str, Theme] = {t.name: t for t in (CRAZY_ZOOTOPIA, TEACHERS_IN_SCHOOL, MOVIE_FESTIVAL_AWARDS)}
assert tuple(THEME_BY_NAME) == THEMES
