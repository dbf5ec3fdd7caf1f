"""SynthRef: a generated referring-expression segmentation dataset. Taught in notebook 01.

No referring-expression dataset (or ImageNet weight) can be downloaded where this course is built and
tested, so its default data is generated, deterministically, from numbers alone. Each sample is a
scene of 3-6 coloured shapes on a textured background, one of them the *target*, and an English
expression that picks out exactly that target:

    attribute  "the small red star"                  (what it looks like)
    location   "the left ring", "the square in the middle"   (where it is among look-alikes)
    relation   "the ring above the small green shape"         (where it is relative to a landmark)
    stuff      "the green striped area"              (a background region; `referit` only)

Why it is built this way (docs/design.md, §3; paper §4.1):
- Each scene draws from only 2-3 shapes and 2-3 colours, so most targets have look-alike
  distractors: a model that ignores the expression cannot know which object is meant.
- Thin parts (ring holes, star spikes, cross arms) and small objects make fine detail matter, so
  a decoder without skip connections loses IoU (see data/README.md for the measured figures).
- Every expression is checked by `matching_objects`, a small interpreter of the expression's
  parsed form: a description must match the target and nothing else. That interpreter is
  *generous* (an object matches unless the description is clearly wrong for it) while the target
  must fit *strictly* (clearly), so no expression depends on a pixel-level judgement call.
- Four variants mirror the paper's four datasets and their splits:
    unc      train / val / testA / testB   all kinds; testA targets are thin shapes (ring, star,
                                           cross), testB targets solid ones, like UNC's people/objects
    unc+     train / val / testA / testB   no location words at all (attributes only), like UNC+
    gref     train / val                   longer expressions, two-step relations, like GRef
    referit  train / val / test            also background "stuff" regions as targets, like ReferIt
  Every variant also has an `ambiguous` split whose expressions fit two or more objects; it is a
  diagnostic for notebooks and is never used for training.
- Sample i depends only on (seed, variant, split, i), through its own numpy Generator: any order,
  any number of DataLoader workers, the same data. A scene and its expression are drawn from one
  random stream and the pixels from another, so `text(i)` is cheap (no rendering) and the scene and
  expression do not depend on `image_size`.
"""
from __future__ import annotations

import copy
import zlib
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset, Subset

from dmn_lib.data.transforms import image_to_tensor, mask_to_tensor
from dmn_lib.data.vocab import tokenize

# =================================================================================================
# 1. The world: shapes, colours, sizes, variants and splits
# =================================================================================================
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring")
# testA / testB split the targets by shape group, as UNC's testA (people) and testB (other objects).
# Group A are the shapes with thin parts, which are harder to segment, like people's limbs.
SHAPE_GROUPS = {"testA": ("ring", "star", "cross"), "testB": ("circle", "square", "triangle", "diamond")}
COLORS = {  # name -> RGB in [0, 1]; saturated so the names stay right under jitter and lighting
    "red": (0.86, 0.12, 0.12),
    "orange": (0.96, 0.52, 0.08),
    "yellow": (0.95, 0.85, 0.10),
    "green": (0.15, 0.65, 0.20),
    "cyan": (0.10, 0.80, 0.85),
    "blue": (0.12, 0.28, 0.88),
    "purple": (0.52, 0.18, 0.72),
    "pink": (0.96, 0.48, 0.72),
}
SIZES = ("small", "large")
RADIUS_RANGE = {"small": (0.055, 0.075), "large": (0.10, 0.13)}  # bounding-circle radius / image side
STUFF_TEXTURES = ("striped", "checkered", "dotted")  # background regions ("stuff"), referit only
BACKGROUNDS = ("plain", "striped", "checkered", "noise", "clutter")
MIN_SPACING = 0.75  # centres at least 0.75 x (sum of bounding radii) apart: shapes may overlap a little
MARGIN = 0.05  # image sides; "clearly left of" means at least this much further left

VARIANT_SPLITS = {
    "unc": ("train", "val", "testA", "testB", "ambiguous"),
    "unc+": ("train", "val", "testA", "testB", "ambiguous"),
    "gref": ("train", "val", "ambiguous"),
    "referit": ("train", "val", "test", "ambiguous"),
}
DEFAULT_SIZES = {"train": 20000, "val": 2000, "testA": 1000, "testB": 1000, "test": 2000, "ambiguous": 500}
# How often each kind of expression is asked for (the scene is redrawn until one can be made).
KIND_MIX = {
    "unc": {"attribute": 0.35, "location": 0.35, "relation": 0.30},
    "unc+": {"attribute": 1.0},  # UNC+ bans location words: appearance only
    "gref": {"attribute": 0.25, "location": 0.15, "relation": 0.60},
    "referit": {"attribute": 0.35, "location": 0.25, "relation": 0.10, "stuff": 0.30},
}
AMBIGUOUS_KIND_MIX = {
    "unc": {"attribute": 0.6, "relation": 0.4},
    "unc+": {"attribute": 1.0},
    "gref": {"attribute": 0.4, "relation": 0.6},
    "referit": {"attribute": 0.6, "relation": 0.4},
}
TWO_STEP_RELATION_PROB = {"gref": 0.6}  # "the ring above the circle that is left of the blue star"

# =================================================================================================
# 2. Words. Every word an expression can use is listed here (the vocabulary is 60-100 words).
# =================================================================================================
SHAPE_WORDS = {
    "circle": ("circle", "disc", "disk"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
    "star": ("star",),
    "cross": ("cross", "plus"),
    "ring": ("ring", "donut", "hoop"),
}
COLOR_WORDS = {c: (c,) for c in COLORS} | {"cyan": ("cyan", "turquoise"), "purple": ("purple", "violet")}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
GENERIC_NOUNS = ("one", "shape", "object", "thing")  # when the shape is not named
TEXTURE_WORDS = {"striped": ("striped",), "checkered": ("checkered", "checked"), "dotted": ("dotted", "spotted")}
AREA_NOUNS = ("area", "region", "patch", "part")  # the head noun of a stuff region
LOCATION_ADJECTIVES = {  # before the noun: "the left ring"
    "left": ("left", "leftmost"),
    "right": ("right", "rightmost"),
    "top": ("top", "upper", "topmost"),
    "bottom": ("bottom", "lower", "bottommost"),
    "middle": ("middle",),
}
LOCATION_PHRASES = {  # after the noun: "the ring on the left"
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "middle": ("in the middle", "in the center"),
}
RELATION_PHRASES = {
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
}
CLAUSE_OPENERS = ("that is", "which is")  # "the circle that is left of the star"
COMMANDS = ("find", "segment", "show me", "select", "pick", "locate", "please find", "please segment")

# The words that say where something is. `unc+` must contain none of them (tested); the small
# function words of the phrases (on, at, in, to, of) are not location words by themselves.
LOCATION_WORDS = frozenset(
    w for table in (LOCATION_ADJECTIVES, LOCATION_PHRASES, RELATION_PHRASES) for options in table.values()
    for phrase in options for w in phrase.split() if w not in ("on", "at", "in", "the", "to", "of")
)
# Every word an expression can contain (a training split's vocabulary is a subset of it).
WORDS = frozenset(
    w for table in (SHAPE_WORDS, COLOR_WORDS, SIZE_WORDS, TEXTURE_WORDS, LOCATION_ADJECTIVES, LOCATION_PHRASES,
                    RELATION_PHRASES) for options in table.values() for phrase in options for w in phrase.split()
) | {w for phrase in GENERIC_NOUNS + AREA_NOUNS + CLAUSE_OPENERS + COMMANDS for w in phrase.split()} | {"the"}
LOCATIONS = tuple(LOCATION_ADJECTIVES)  # left, right, top, bottom, middle
RELATIONS = tuple(RELATION_PHRASES)  # above, below, left of, right of


# =================================================================================================
# 3. Descriptions and the verifier
# =================================================================================================
# A description is the parsed form of an expression, a plain (JSON-serialisable) dict:
#   {"category": "object" | "stuff", "shape": ..., "color": ..., "size": ...,   (None = not said)
#    "location": None | "left" | "right" | "top" | "bottom" | "middle",
#    "relation": None | {"name": "above" | "below" | "left of" | "right of", "landmark": description}}
# "the ring above the small green shape" ->
#   {category: object, shape: ring, ..., relation: {name: above, landmark: {size: small, color: green}}}

def make_description(category="object", shape=None, color=None, size=None, location=None, relation=None,
                     landmark=None) -> dict:
    """A description with every key present (so two descriptions compare with ==)."""
    return {
        "category": category, "shape": shape, "color": color, "size": size, "location": location,
        "relation": None if relation is None else {"name": relation, "landmark": landmark},
    }


def fits_attributes(obj: dict, description: dict) -> bool:
    """Does the object have every attribute the description names?"""
    return (obj["kind"] == description["category"]
            and (description["shape"] is None or obj["shape"] == description["shape"])
            and (description["color"] is None or obj["color"] == description["color"])
            and (description["size"] is None or obj["size"] == description["size"]))


def _extreme_by(objects, candidates, location, slack):
    """Candidates at the named extreme of the group, up to `slack` (image sides).

    slack = +MARGIN (generous): every candidate within MARGIN of the extreme could be meant.
    slack = -MARGIN (strict): only a candidate that beats all the others by MARGIN.
    """
    axis, sign = {"left": (0, 1), "right": (0, -1), "top": (1, 1), "bottom": (1, -1)}[location]
    keys = {c: sign * objects[c]["center"][axis] for c in candidates}  # smaller = further that way
    return [c for c in candidates if all(keys[c] <= keys[o] + slack for o in candidates if o != c)]


def _in_middle(objects, candidates, slack):
    """Candidates with another candidate to their left and another to their right (horizontally).

    slack = +MARGIN (generous): "to their left" includes level with them, up to MARGIN to the right.
    slack = -MARGIN (strict): the others must be at least MARGIN to the left and to the right.
    """
    x = {c: objects[c]["center"][0] for c in candidates}
    return [c for c in candidates
            if any(x[o] < x[c] + slack for o in candidates if o != c)
            and any(x[o] > x[c] - slack for o in candidates if o != c)]


def relation_holds(a: dict, b: dict, name: str, strict: bool = False) -> bool:
    """Is object a `name` object b ("above", "below", "left of", "right of")?

    Generous (strict=False): yes unless a is clearly (MARGIN) on the other side or level with b.
    Strict: a is at least MARGIN that way, and more that way than sideways (a 45-degree cone).
    """
    dx = a["center"][0] - b["center"][0]
    dy = a["center"][1] - b["center"][1]  # image y grows downwards
    along, across = {"above": (-dy, dx), "below": (dy, dx), "left of": (-dx, dy), "right of": (dx, dy)}[name]
    if strict:
        return along >= MARGIN and along >= abs(across)
    return along > -MARGIN


def matching_objects(meta: dict, description: dict, strict: bool = False) -> set[int]:
    """The verifier: indices of meta["objects"] that `description` could refer to.

    Attributes filter the objects (sizes are absolute classes: "small" means a small object even if
    it is the largest ring). A location then picks among those look-alikes: left/right/top/bottom =
    the one furthest that way ("the left ring" is the leftmost ring), middle = between two others
    horizontally. A relation keeps the candidates that are `name` some object its landmark matches
    (centre to centre). Only objects (not stuff regions) have locations and relations.
    With strict=False the answer is generous (everything not clearly ruled out); the generator only
    keeps an expression when the generous answer is exactly {target} and the target also fits
    strictly, so every expression in SynthRef holds with room to spare.
    """
    objects = meta["objects"]
    candidates = [k for k, obj in enumerate(objects) if fits_attributes(obj, description)]
    slack = -MARGIN if strict else MARGIN
    location = description["location"]
    if location == "middle":
        candidates = _in_middle(objects, candidates, slack)
    elif location is not None:
        candidates = _extreme_by(objects, candidates, location, slack)
    relation = description["relation"]
    if relation is not None:
        landmarks = matching_objects(meta, relation["landmark"], strict)
        candidates = [c for c in candidates if any(
            l != c and relation_holds(objects[c], objects[l], relation["name"], strict) for l in landmarks)]
    return set(candidates)


def picks_out(meta: dict, description: dict, target: int) -> bool:
    """The acceptance test for an expression: exactly the target, generously; the target, strictly."""
    return (matching_objects(meta, description) == {target}
            and target in matching_objects(meta, description, strict=True))


def is_ambiguous(meta: dict, description: dict, target: int) -> bool:
    """For the `ambiguous` split: the target and at least one other object clearly fit."""
    clear = matching_objects(meta, description, strict=True)
    return target in clear and len(clear) >= 2


def description_depth(description: dict) -> int:
    """Number of relation steps: 0 for "the red star", 2 for "the ring above the circle left of ..."."""
    relation = description["relation"]
    return 0 if relation is None else 1 + description_depth(relation["landmark"])


# =================================================================================================
# 4. From descriptions to words (realise) and back (parse)
# =================================================================================================
def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def realise(description: dict, rng: np.random.Generator, style: str = "short") -> str:
    """Write a description as English, choosing among synonyms and phrasings with `rng`.

    style "short" (unc, unc+, referit) or "long" (gref: commands and relative clauses more often).
    """
    long = style == "long"
    words = []
    if rng.random() < (0.6 if long else 0.25):
        words.append(_pick(rng, COMMANDS))
    words.append(_noun_phrase(description, rng, long))
    return " ".join(words)


def _noun_phrase(d: dict, rng: np.random.Generator, long: bool) -> str:
    location_before = d["location"] is not None and rng.random() < 0.5
    words = ["the"]
    if location_before:
        words.append(_pick(rng, LOCATION_ADJECTIVES[d["location"]]))
    if d["size"] is not None:
        words.append(_pick(rng, SIZE_WORDS[d["size"]]))
    if d["color"] is not None:
        words.append(_pick(rng, COLOR_WORDS[d["color"]]))
    if d["category"] == "stuff":
        if d["shape"] is not None:
            words.append(_pick(rng, TEXTURE_WORDS[d["shape"]]))
        words.append(_pick(rng, AREA_NOUNS))
    else:
        words.append(_pick(rng, SHAPE_WORDS[d["shape"]]) if d["shape"] is not None else _pick(rng, GENERIC_NOUNS))
    if d["location"] is not None and not location_before:
        words.append(_pick(rng, LOCATION_PHRASES[d["location"]]))
    if d["relation"] is not None:
        if rng.random() < (0.8 if long else 0.3):
            words.append(_pick(rng, CLAUSE_OPENERS))
        words.append(_pick(rng, RELATION_PHRASES[d["relation"]["name"]]))
        words.append(_noun_phrase(d["relation"]["landmark"], rng, long))
    return " ".join(words)


def _reverse_table(table: dict) -> dict:
    """{"left": ("on the left",)} -> {("on", "the", "left"): "left"}"""
    return {tuple(phrase.split()): value for value, options in table.items() for phrase in options}


_WORD_TO = {
    "shape": {w: s for s, ws in SHAPE_WORDS.items() for w in ws},
    "color": {w: c for c, ws in COLOR_WORDS.items() for w in ws},
    "size": {w: s for s, ws in SIZE_WORDS.items() for w in ws},
    "location": {w: loc for loc, ws in LOCATION_ADJECTIVES.items() for w in ws},
    "texture": {w: t for t, ws in TEXTURE_WORDS.items() for w in ws},
}
_PHRASE_TO_LOCATION = _reverse_table(LOCATION_PHRASES)
_PHRASE_TO_RELATION = _reverse_table(RELATION_PHRASES)
_CLAUSE_OPENERS = [tuple(p.split()) for p in CLAUSE_OPENERS]


def parse_expression(text: str) -> dict:
    """Read an expression back into its description (the inverse of `realise`).

    The tests parse every generated text and check that the verifier, run on what the words say,
    picks out the target: this checks the words themselves, not only the generator's bookkeeping.
    Raises ValueError for text outside SynthRef's small grammar.
    """
    tokens = tokenize(text)
    if "the" not in tokens:
        raise ValueError(f"Cannot parse {text!r}: SynthRef expressions contain 'the ...'")
    start = tokens.index("the")
    if " ".join(tokens[:start]) not in ("",) + COMMANDS:
        raise ValueError(f"Cannot parse {text!r}: unknown opening {' '.join(tokens[:start])!r}")
    description, end = _parse_noun_phrase(tokens, start, text)
    if end != len(tokens):
        raise ValueError(f"Cannot parse {text!r}: unexpected words {' '.join(tokens[end:])!r}")
    return description


def _match_phrase(tokens, pos, table):
    """Longest phrase of `table` starting at tokens[pos] -> (value, new pos), or (None, pos)."""
    for phrase in sorted(table, key=len, reverse=True):
        if tuple(tokens[pos:pos + len(phrase)]) == phrase:
            return table[phrase], pos + len(phrase)
    return None, pos


def _parse_noun_phrase(tokens, pos, text):
    if pos >= len(tokens) or tokens[pos] != "the":
        raise ValueError(f"Cannot parse {text!r}: expected 'the' at word {pos}")
    pos += 1
    found = {"category": "object"}
    while pos < len(tokens):  # modifiers, then the head noun
        word = tokens[pos]
        kinds = [k for k in ("location", "size", "color", "texture") if word in _WORD_TO[k]]
        if kinds:
            key = "shape" if kinds[0] == "texture" else kinds[0]
            found[key] = _WORD_TO[kinds[0]][word]
            pos += 1
            continue
        if word in _WORD_TO["shape"]:
            found["shape"] = _WORD_TO["shape"][word]
        elif word in AREA_NOUNS:
            found["category"] = "stuff"
        elif word not in GENERIC_NOUNS:
            raise ValueError(f"Cannot parse {text!r}: unexpected word {word!r}")
        pos += 1
        break
    else:
        raise ValueError(f"Cannot parse {text!r}: the expression has no noun")
    location, pos = _match_phrase(tokens, pos, _PHRASE_TO_LOCATION)
    if location is not None:
        found["location"] = location
    opener_pos = pos
    for opener in _CLAUSE_OPENERS:
        if tuple(tokens[pos:pos + len(opener)]) == opener:
            pos += len(opener)
            break
    relation, pos = _match_phrase(tokens, pos, _PHRASE_TO_RELATION)
    if relation is None:
        if pos != opener_pos:
            raise ValueError(f"Cannot parse {text!r}: 'that is' / 'which is' without a relation")
        return make_description(**found), pos
    landmark, pos = _parse_noun_phrase(tokens, pos, text)
    return make_description(**found, relation=relation, landmark=landmark), pos


# =================================================================================================
# 5. Scenes and expressions (no pixels: this is what `text(i)` runs)
# =================================================================================================
OBJECT_ATTRIBUTE_SETS = (
    ("shape",), ("color",), ("size",), ("color", "shape"), ("size", "shape"), ("size", "color"),
    ("size", "color", "shape"),
)
STUFF_ATTRIBUTE_SETS = (("shape",), ("color",), ("color", "shape"))  # a stuff region's shape is its texture


def sample_rng(seed: int, variant: str, split: str, index: int, stream: int) -> np.random.Generator:
    """The random stream of one sample: stream 0 draws the scene and words, stream 1 the pixels.

    Seeded from the numbers (seed, crc32(variant), crc32(split), index, stream): stable across runs,
    processes and platforms (Python's hash() of a string is not), and different for every split.
    """
    entropy = [seed, zlib.crc32(variant.encode()), zlib.crc32(split.encode()), index, stream]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _weighted_order(rng, options, weights):
    """The options in a random order, heavier ones earlier on average.

    Each option draws an exponential "finishing time" with rate = its weight and they are sorted by
    it (an "exponential race": the same as weighted sampling without replacement, but vectorised).
    Taking the first option that works from this order picks among the working ones at random.
    """
    if not options:
        return []
    finish = rng.exponential(size=len(options)) / np.asarray(weights, dtype=float)
    return [options[k] for k in np.argsort(finish, kind="stable")]


def _attribute_description(obj: dict, keys) -> dict:
    return make_description(category=obj["kind"], **{k: obj[k] for k in keys})


def _attribute_sets(obj):
    return STUFF_ATTRIBUTE_SETS if obj["kind"] == "stuff" else OBJECT_ATTRIBUTE_SETS


def find_attribute_description(meta, target, rng, long=False, accept=picks_out):
    """ "the small red star": attributes only. Naming the shape is preferred, as people do;
    `long` (gref) prefers naming more attributes than needed."""
    obj = meta["objects"][target]
    sets = _attribute_sets(obj)
    weights = [len(keys) ** 2 if long else (2 if "shape" in keys else 1) for keys in sets]
    for keys in _weighted_order(rng, sets, weights):
        description = _attribute_description(obj, keys)
        if accept(meta, description, target):
            return description
    return None


def _lookalike_sets(meta, target):
    """Attribute sets (possibly empty) that the target shares with at least one other object."""
    obj = meta["objects"][target]
    found = []
    for keys in ((),) + OBJECT_ATTRIBUTE_SETS:
        if len(matching_objects(meta, _attribute_description(obj, keys))) >= 2:
            found.append(keys)
    return found


def find_location_description(meta, target, rng):
    """ "the left ring", "the square in the middle": the target's place among its look-alikes."""
    obj = meta["objects"][target]
    if obj["kind"] != "object":
        return None
    options = [(keys, loc) for keys in _lookalike_sets(meta, target) for loc in LOCATIONS]
    weights = [2 if "shape" in keys else 1 for keys, _ in options]
    for keys, location in _weighted_order(rng, options, weights):
        description = make_description(**{k: obj[k] for k in keys}, location=location)
        if picks_out(meta, description, target):
            return description
    return None


def find_relation_description(meta, target, rng, long=False, steps=1, exclude=(), accept=picks_out):
    """ "the ring above the small green shape": look-alikes told apart by a landmark.

    The landmark is named by its attributes (steps=1) or, for gref's two-step relations, by a
    relation of its own (steps=2). The target's own attributes must fit more than one object,
    otherwise the relation would be redundant.
    """
    objects = meta["objects"]
    obj = objects[target]
    if obj["kind"] != "object":
        return None
    landmarks = [k for k, o in enumerate(objects) if o["kind"] == "object" and k != target and k not in exclude]
    options = [(keys, l, name) for keys in _lookalike_sets(meta, target) for l in landmarks for name in RELATIONS]
    weights = [2 if "shape" in keys else 1 for keys, _, _ in options]
    landmark_names = {}  # one description per landmark, found when first needed
    for keys, landmark, name in _weighted_order(rng, options, weights):
        if not relation_holds(obj, objects[landmark], name, strict=True):
            continue  # the target must clearly be `name` the landmark: a cheap test before the others
        if landmark not in landmark_names:
            if steps > 1:
                landmark_names[landmark] = find_relation_description(
                    meta, landmark, rng, long, steps - 1, exclude=tuple(exclude) + (target,))
            else:
                landmark_names[landmark] = find_attribute_description(meta, landmark, rng, long)
        if landmark_names[landmark] is None:
            continue
        description = make_description(**{k: obj[k] for k in keys}, relation=name, landmark=landmark_names[landmark])
        if accept(meta, description, target):
            return description
    return None


def find_ambiguous_description(meta, target, rng, kind, long=False):
    """An under-specified expression: "the red circle" when two red circles are in view."""
    if kind == "attribute":
        return find_attribute_description(meta, target, rng, long, accept=is_ambiguous)
    return find_relation_description(meta, target, rng, long, accept=is_ambiguous)


def _place_objects(rng, n_objects, shapes, colors):
    """Random non-overlapping-ish positions: centres at least MIN_SPACING x (r_i + r_j) apart."""
    objects = []
    for _ in range(n_objects):
        size = SIZES[int(rng.integers(2))]
        radius = float(rng.uniform(*RADIUS_RANGE[size]))
        tries = rng.uniform(radius + 0.01, 1 - radius - 0.01, size=(40, 2))  # 40 candidate centres at once
        ok = np.ones(len(tries), dtype=bool)
        for other in objects:
            distance = np.hypot(tries[:, 0] - other["center"][0], tries[:, 1] - other["center"][1])
            ok &= distance >= MIN_SPACING * (radius + other["radius"])
        if not ok.any():
            continue  # the scene is full: keep fewer objects
        cx, cy = tries[int(np.argmax(ok))]
        objects.append({
            "kind": "object", "shape": _pick(rng, shapes), "color": _pick(rng, colors), "size": size,
            "center": [round(float(cx), 4), round(float(cy), 4)], "radius": round(radius, 4),
            "angle": round(float(rng.uniform(-12, 12)), 2),  # small: a square must not turn into a diamond
        })
    return objects


def _place_stuff(rng, n_regions, colors):
    """Background regions for referit: bands along opposite image sides, each with a texture."""
    regions = []
    vertical = rng.random() < 0.5
    sides = ("left", "right") if vertical else ("top", "bottom")
    textures = list(rng.permutation(STUFF_TEXTURES))
    for k, side in enumerate(rng.permutation(sides)[:n_regions]):
        depth = float(rng.uniform(0.25, 0.4))
        x0, y0, x1, y1 = {"left": (0, 0, depth, 1), "right": (1 - depth, 0, 1, 1),
                          "top": (0, 0, 1, depth), "bottom": (0, 1 - depth, 1, 1)}[side]
        # two regions may share a texture (then only the colour tells them apart)
        texture = textures[0] if k == 1 and rng.random() < 0.3 else textures[k]
        regions.append({
            "kind": "stuff", "shape": str(texture), "color": colors[k], "size": "large",
            "center": [round((x0 + x1) / 2, 4), round((y0 + y1) / 2, 4)], "radius": None, "angle": 0.0,
            "region": [round(v, 4) for v in (x0, y0, x1, y1)],
        })
    return regions


def generate_scene(variant: str, split: str, index: int, seed: int = 0) -> tuple[dict, str]:
    """Sample `index` of (variant, split) as (meta without pixel measurements, text). No rendering.

    Draws the kind of expression first (so the kind mix is as KIND_MIX says), then scenes until the
    target (chosen at random among the objects, so an image-only model has no favourite to guess)
    can be described that way.
    """
    rng = sample_rng(seed, variant, split, index, stream=0)
    ambiguous = split == "ambiguous"
    mix = (AMBIGUOUS_KIND_MIX if ambiguous else KIND_MIX)[variant]
    kind = _pick_weighted(rng, mix)
    long = variant == "gref"
    for _attempt in range(200):
        palette_shapes = [str(s) for s in rng.choice(SHAPES, size=int(rng.integers(2, 4)), replace=False)]
        palette_colors = [str(c) for c in rng.choice(list(COLORS), size=int(rng.integers(2, 4)), replace=False)]
        objects = _place_objects(rng, int(rng.integers(3, 7)), palette_shapes, palette_colors)
        if variant == "referit" and (kind == "stuff" or rng.random() < 0.5):
            # stuff colours are ones no object has, so objects stay visible on top of the regions
            spare = [c for c in COLORS if c not in palette_colors]
            stuff_colors = [str(c) for c in rng.choice(spare, size=2, replace=False)]
            objects = _place_stuff(rng, int(rng.integers(1, 3)), stuff_colors) + objects
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        if variant == "referit" and background in ("striped", "checkered"):
            background = "noise"  # in referit only stuff regions carry those textures
        meta = {"variant": variant, "split": split, "index": index, "seed": seed, "background": background,
                "objects": objects}
        eligible = [k for k, o in enumerate(objects) if (o["kind"] == "stuff") == (kind == "stuff")]
        if split in SHAPE_GROUPS:
            eligible = [k for k in eligible if objects[k]["shape"] in SHAPE_GROUPS[split]]
        for target in rng.permutation(eligible):
            target = int(target)
            description = _describe(meta, target, rng, kind, variant, ambiguous, long)
            if description is not None:
                break
        else:
            continue  # no target of this scene can be described that way: draw another scene
        target_obj = objects[target]
        meta.update({
            "target": target,
            "kind": kind,
            "description": description,
            "matches": sorted(matching_objects(meta, description)),
            "n_lookalikes": sum(o["kind"] == target_obj["kind"] and o["shape"] == target_obj["shape"]
                                for o in objects) - 1,
        })
        return meta, realise(description, rng, "long" if long else "short")
    raise RuntimeError(f"SynthRef could not make a {kind} expression for {variant}/{split}/{index}")


def _pick_weighted(rng, mix: dict) -> str:
    names = list(mix)
    p = np.array([mix[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _describe(meta, target, rng, kind, variant, ambiguous, long):
    if ambiguous:
        return find_ambiguous_description(meta, target, rng, kind, long)
    if kind in ("attribute", "stuff"):
        return find_attribute_description(meta, target, rng, long)
    if kind == "location":
        return find_location_description(meta, target, rng)
    steps = 2 if rng.random() < TWO_STEP_RELATION_PROB.get(variant, 0.0) else 1
    description = find_relation_description(meta, target, rng, long, steps=steps)
    if description is None and steps == 2:
        description = find_relation_description(meta, target, rng, long, steps=1)
    return description


# =================================================================================================
# 6. Pixels: background, stuff regions, shapes, lighting, noise
# =================================================================================================
@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised pixel-centre coordinates x, y (each size x size, float32, values in (0, 1))."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = np.meshgrid(coords, coords)  # x varies along columns, y along rows
    x.flags.writeable = y.flags.writeable = False  # shared by every sample: never modify them
    return x, y


@lru_cache(maxsize=8)
def _noise_bank(size: int) -> np.ndarray:
    """Unit Gaussian noise, 2size x 2size x 3, from a fixed seed. A sample's sensor noise is a crop
    of it at a random offset: drawing fresh noise for every pixel was the slowest step of rendering."""
    bank = np.random.default_rng(2018).standard_normal((2 * size, 2 * size, 3), dtype=np.float32)
    bank.flags.writeable = False  # shared by every sample: never modify it
    return bank


def _pattern(name: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 0/1 float pattern over the coordinates (stripes at a random angle, checks, dots)."""
    if name == "striped":
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(0.05, 0.1)
        return (((x * np.cos(angle) + y * np.sin(angle)) / period) % 1.0 < 0.5).astype(np.float32)
    if name == "checkered":
        cell = rng.uniform(0.05, 0.1)
        return ((np.floor(x / cell) + np.floor(y / cell)) % 2).astype(np.float32)
    if name == "dotted":
        cell = rng.uniform(0.05, 0.08)
        dx = (x / cell) % 1.0 - 0.5
        dy = (y / cell) % 1.0 - 0.5
        return (dx * dx + dy * dy < 0.09).astype(np.float32)  # dots of radius 0.3 cells
    raise ValueError(name)


def _smooth_noise(size: int, rng: np.random.Generator, cells: int = 6) -> np.ndarray:
    """Blotchy texture in [-1, 1]: a few random values blown up with bilinear interpolation."""
    small = rng.uniform(-1, 1, size=(cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR))


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A muted (low-saturation) textured background, float32 size x size x 3 in [0, 1]."""
    x, y = _grid(size)
    base = np.clip(rng.uniform(0.35, 0.65) + rng.normal(0, 0.04, size=3), 0, 1).astype(np.float32)
    if kind in ("striped", "checkered"):
        contrast = rng.uniform(0.05, 0.12)
        shade = 1 + contrast * (2 * _pattern(kind, x, y, rng) - 1)
    elif kind == "noise":
        shade = 1 + rng.uniform(0.08, 0.2) * _smooth_noise(size, rng)
    else:  # plain and clutter: a gentle gradient
        angle = rng.uniform(0, 2 * np.pi)
        shade = 1 + rng.uniform(0, 0.15) * ((x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle))
    image = shade[..., None] * base
    if kind == "clutter":
        image = _draw_clutter(image, rng)
    return image


def _draw_clutter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Faint random lines and arcs: edges that are not objects."""
    size = image.shape[0]
    canvas = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    mean_tone = image.mean((0, 1)) * 255
    for _ in range(int(rng.integers(6, 14))):
        tone = tuple(int(v) for v in np.clip(mean_tone + rng.normal(0, 35, size=3), 0, 255))
        x0, y0, x1, y1 = (rng.uniform(-0.1, 1.1, size=4) * size).tolist()
        width = int(rng.integers(1, max(2, size // 64) + 1))
        if rng.random() < 0.5:
            draw.line([(x0, y0), (x1, y1)], fill=tone, width=width)
        else:
            box = [min(x0, x1), min(y0, y1), max(x0, x1) + 1, max(y0, y1) + 1]
            draw.arc(box, start=float(rng.uniform(0, 360)), end=float(rng.uniform(0, 360)), fill=tone, width=width)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _polygon(shape: str) -> np.ndarray:
    """Vertices of a polygon shape on the unit bounding circle (x right, y down)."""
    if shape == "square":
        return np.array([(-0.78, -0.78), (0.78, -0.78), (0.78, 0.78), (-0.78, 0.78)])
    if shape == "diamond":  # a rhombus taller than wide, so it never looks like a tilted square
        return np.array([(0, -1.0), (0.75, 0), (0, 1.0), (-0.75, 0)])
    if shape == "triangle":  # pointing up, centred on its centroid
        angles = np.deg2rad([-90, 30, 150])
        return np.stack([np.cos(angles), np.sin(angles) + 0.12], axis=1) * 1.05
    if shape == "star":  # five thin spikes
        angles = np.deg2rad(np.arange(10) * 36 - 90)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.4)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if shape == "cross":  # a plus sign with thin arms
        a, w = 0.95, 0.28
        return np.array([(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w),
                         (-a, w), (-a, -w), (-w, -w)])
    raise ValueError(shape)


_POLYGONS = {s: _polygon(s) for s in ("square", "diamond", "triangle", "star", "cross")}


def _shape_mask(obj: dict, size: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """The object's full (unoccluded) mask, drawn only inside its bounding box: (box slices, bool crop)."""
    cx, cy = obj["center"][0] * size - 0.5, obj["center"][1] * size - 0.5  # in pixel-index units
    r = obj["radius"] * size
    x0, y0 = max(int(np.floor(cx - r)) - 1, 0), max(int(np.floor(cy - r)) - 1, 0)
    x1, y1 = min(int(np.ceil(cx + r)) + 2, size), min(int(np.ceil(cy + r)) + 2, size)
    if obj["shape"] in ("circle", "ring"):
        dy, dx = np.ogrid[y0 - cy:y1 - cy, x0 - cx:x1 - cx]
        d2 = dx * dx + dy * dy
        crop = d2 <= (0.92 * r) ** 2
        if obj["shape"] == "ring":
            crop &= d2 > (0.55 * r) ** 2  # the hole shows what is behind the ring
    else:
        theta = np.deg2rad(obj["angle"])
        rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        points = _POLYGONS[obj["shape"]] @ rotation.T * r + (cx - x0, cy - y0)
        canvas = Image.new("L", (x1 - x0, y1 - y0), 0)
        ImageDraw.Draw(canvas).polygon([tuple(p) for p in points.tolist()], fill=1)
        crop = np.asarray(canvas, dtype=bool)
    return (slice(y0, y1), slice(x0, x1)), crop


def render(meta: dict, image_size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw a scene: (uint8 HxWx3 image, [bool HxW visible mask per object, in meta["objects"] order]).

    Objects are drawn in list order (stuff regions first, so they lie underneath); an object's
    visible mask is its full mask minus everything drawn after it.
    """
    size = image_size
    x, y = _grid(size)
    image = _background(meta["background"], size, rng)
    full_masks = []
    for obj in meta["objects"]:
        full = np.zeros((size, size), dtype=bool)
        if obj["kind"] == "stuff":
            x0, y0, x1, y1 = (int(round(v * size)) for v in obj["region"])
            box = (slice(y0, y1), slice(x0, x1))
            full[box] = True
            tone = 0.75 * np.array(COLORS[obj["color"]]) + 0.25 * 0.5  # a bit muted: it is background
            pattern = _pattern(obj["shape"], x[box], y[box], rng)[..., None]
            image[box] = (pattern * tone + (1 - pattern) * 0.55 * tone).astype(np.float32)
        else:
            box, crop = _shape_mask(obj, size)
            full[box] = crop
            # colour jitter and a shading gradient across the object, like light on a real thing
            color = np.clip(np.array(COLORS[obj["color"]]) * rng.uniform(0.85, 1.1) + rng.normal(0, 0.03, 3), 0, 1)
            angle = rng.uniform(0, 2 * np.pi)
            gradient = ((x[box] - obj["center"][0]) * np.cos(angle) + (y[box] - obj["center"][1]) * np.sin(angle))
            shade = 1 + rng.uniform(0, 0.15) * gradient / obj["radius"]
            region = image[box]
            region[crop] = (shade[crop][:, None] * color).astype(np.float32)
        full_masks.append(full)
    # visible = full minus everything drawn later (on top)
    visible_masks = [None] * len(full_masks)
    covered = np.zeros((size, size), dtype=bool)
    for k in range(len(full_masks) - 1, -1, -1):
        visible_masks[k] = full_masks[k] & ~covered
        covered |= full_masks[k]
    # global lighting, colour cast and sensor noise (all in place: this runs 20,000 times a minute)
    angle = rng.uniform(0, 2 * np.pi)
    light = 1 + rng.uniform(0, 0.3) * ((x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle))
    image *= light[..., None]
    image *= rng.uniform(0.92, 1.08, size=3).astype(np.float32)
    oy, ox = rng.integers(size, size=2)
    image += _noise_bank(size)[oy:oy + size, ox:ox + size] * np.float32(rng.uniform(0.01, 0.04))
    np.clip(image, 0, 1, out=image)
    image = (image * 255 + 0.5).astype(np.uint8)
    for obj, full, visible in zip(meta["objects"], full_masks, visible_masks):
        obj.update(_pixel_measurements(full, visible))
    return image, visible_masks


def _pixel_measurements(full: np.ndarray, visible: np.ndarray) -> dict:
    """bbox [x0, y0, x1, y1] of the visible part (pixels; x1, y1 exclusive), its area and visible fraction."""
    rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
    bbox = [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1] if len(rows) else [0, 0, 0, 0]
    area, full_area = int(visible.sum()), int(full.sum())
    return {"bbox": bbox, "area": area, "visible_fraction": round(area / max(full_area, 1), 4)}


# =================================================================================================
# 7. The Dataset
# =================================================================================================
class SynthRef(Dataset):
    """SynthRef(variant="unc", split="train", size=None, image_size=192, seed=0).

    ds[i]  -> {"image": float 3xHxW (ImageNet-normalised), "mask": float 1xHxW in {0,1},
               "text": str, "meta": JSON-serialisable dict}
    ds.raw(i)            -> (uint8 HxWx3 image, bool HxW mask, text, meta)
    ds.text(i)           -> the expression only, without rendering (for building vocabularies)
    ds.scene(i)          -> (meta without pixel measurements, text), without rendering
    ds.instance_masks(i) -> [bool HxW visible mask of each object in meta["objects"] order]
    ds.render_sample(i)  -> (image, instance masks, text, meta) from a single rendering

    meta: variant, split, index, seed, image_size, background, objects (kind "object"/"stuff", shape,
    color, size, center and radius in image sides, angle, bbox [x0,y0,x1,y1] in pixels with x1, y1
    exclusive, visible area in pixels, visible_fraction; stuff regions also have region), target
    (index into objects), kind (attribute/location/relation/stuff), description (the parsed
    expression, see `matching_objects`), matches (objects the expression fits: [target] except in
    the ambiguous split) and n_lookalikes (other objects of the same kind with the target's shape).

    size=None gives DEFAULT_SIZES[split]; any other size is fine too, and sample i is the same
    whatever the size (a smaller dataset is a prefix of a larger one). cache=True keeps every rendered
    sample in memory (uint8: about 65 KB at 128 px, 1.3 GB for 20,000), so later epochs skip the
    rendering; each DataLoader worker process keeps its own.
    """

    def __init__(self, variant: str = "unc", split: str = "train", size: int | None = None,
                 image_size: int = 192, seed: int = 0, cache: bool = False):
        if variant not in VARIANT_SPLITS:
            raise ValueError(f"Unknown SynthRef variant {variant!r}; valid variants: {', '.join(VARIANT_SPLITS)}")
        if split not in VARIANT_SPLITS[variant]:
            raise ValueError(f"Unknown split {split!r} for SynthRef variant {variant!r}; valid splits: "
                             f"{', '.join(VARIANT_SPLITS[variant])}")
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
                or image_size < 64 or image_size % 32:
            raise ValueError(f"image_size must be an integer multiple of 32 (the backbone's largest stride), "
                             f"at least 64, e.g. 128 or 192; got {image_size!r}")
        size = DEFAULT_SIZES[split] if size is None else size
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"size must be a positive integer (or None for the default); got {size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
        self.variant, self.split = variant, split
        self.size, self.image_size, self.seed = int(size), int(image_size), int(seed)
        self._cache: dict[int, tuple] | None = {} if cache else None

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return (f"SynthRef(variant={self.variant!r}, split={self.split!r}, size={self.size}, "
                f"image_size={self.image_size}, seed={self.seed})")

    def _check_index(self, index) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"SynthRef indices are integers, got {type(index).__name__}")
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} is out of range for {self!r} (valid: 0..{self.size - 1})")
        return int(index) % self.size

    def scene(self, index: int) -> tuple[dict, str]:
        """(meta without the pixel measurements, text); no rendering."""
        return generate_scene(self.variant, self.split, self._check_index(index), self.seed)

    def text(self, index: int) -> str:
        return self.scene(index)[1]

    def render_sample(self, index: int) -> tuple[np.ndarray, list[np.ndarray], str, dict]:
        """(uint8 image, visible masks of all objects, text, meta) from one rendering."""
        meta, text = self.scene(index)
        index = meta["index"]
        image, visible_masks = render(meta, self.image_size, sample_rng(self.seed, self.variant, self.split, index, 1))
        meta["image_size"] = self.image_size
        return image, visible_masks, text, meta

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray, str, dict]:
        if self._cache is not None and self._check_index(index) in self._cache:
            image, mask, text, meta = self._cache[self._check_index(index)]
            return image.copy(), mask.copy(), text, copy.deepcopy(meta)
        image, visible_masks, text, meta = self.render_sample(index)
        if self._cache is not None:
            self._cache[meta["index"]] = (image, visible_masks[meta["target"]], text, copy.deepcopy(meta))
        return image, visible_masks[meta["target"]], text, meta

    def instance_masks(self, index: int) -> list[np.ndarray]:
        return self.render_sample(index)[1]

    def __getitem__(self, index: int) -> dict:
        image, mask, text, meta = self.raw(index)
        return {"image": image_to_tensor(image), "mask": mask_to_tensor(mask), "text": text, "meta": meta}


def of_kinds(dataset: SynthRef, kinds) -> Dataset:
    """The samples of `dataset` whose expression is of one of `kinds` ("attribute", "location", "relation",
    "stuff"), as a torch Subset; the whole dataset if `kinds` is empty. Read from the scene descriptions:
    nothing is rendered. Notebook 07, §0 (fast mode trains on the attribute queries)."""
    if not kinds:
        return dataset
    known = set(KIND_MIX[dataset.variant])
    if set(kinds) - known:
        raise ValueError(f"Unknown expression kinds {sorted(set(kinds) - known)} for SynthRef "
                         f"{dataset.variant!r}; choose from {sorted(known)}")
    return Subset(dataset, [i for i in range(len(dataset)) if dataset.scene(i)[0]["kind"] in kinds])
