"""Write data/imagenet/classes.json: ImageNet-1K class metadata for context-based prompt augmentation.

Each of the 1000 ILSVRC-2012 classes gets its CLIP display name, its WordNet lemmas, hypernyms and gloss,
and a short ``context`` phrase for CPA prompts ("a photo of a {name}, a type of {context}."), chosen so
that classes which would otherwise read alike get different prompts.

Sources (nothing is downloaded):
  * timm's ``timm/data/_info/``: the 1000 wnids in index order, their lemmas and definitions;
  * open_clip's ``zero_shot_metadata.IMAGENET_CLASSNAMES``: CLIP's cleaned display names, same order;
  * the WordNet 3.0 database (Debian package ``wordnet-base``, ``/usr/share/wordnet/data.noun``) for the
    hypernym graph. An ImageNet wnid such as ``n01440764`` is the part of speech plus the WordNet 3.0
    synset offset.

Context rule:
  1. Candidates for a class, in order: the first lemma of each direct hypernym (``@`` and ``@i``
     pointers, in database order), then the first lemma of each further ancestor (breadth first), then
     the class's own lemmas, then a short and a longer head phrase of its gloss.
  2. A candidate equal (case-insensitively) to the display name is skipped, so the default is the first
     lemma of the first direct hypernym unless that merely repeats the name (then it climbs, e.g.
     "tights" -> "hosiery").
  3. Homonym groups are classes sharing a display name or a first WordNet lemma (the original ILSVRC
     class name), case-insensitively: e.g. the two "missile"s, or "crane bird" / "construction crane"
     (both "crane" in WordNet). Within a group every context must differ. Members whose default
     context collides are re-chosen, skipping every candidate that is also a candidate (or the name)
     of another member, i.e. climbing to a phrase that only that member has, so the new contexts
     cannot coincide.
  4. ``OVERRIDES`` (wnid -> context) is applied before the rules and is meant only for a class where no
     rule gives a distinct context; it is empty because the rules suffice for ImageNet-1K.
The script fails if any group still has repeated contexts.

Run by hand; the output is committed:
    python scripts/make_imagenet_classes.py [--wordnet /usr/share/wordnet] [--out data/imagenet/classes.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "data" / "imagenet" / "classes.json"
DEFAULT_WORDNET = Path("/usr/share/wordnet")
HYPERNYM_POINTERS = ("@", "@i")
GLOSS_WORDS = (5, 8)  # the short gloss phrase is cut at a function word; the long one is not
LEADING_WORDS = frozenset({"a", "an", "the", "any", "one", "some", "of", "various", "several", "numerous"})
CUT_WORDS = frozenset({"of", "with", "for", "that", "which", "who", "in", "on", "at", "by", "from", "to",
                       "used", "having", "and", "or", "as", "usually", "especially", "often"})

# wnid -> context, only for classes where no rule yields a distinct context (none needed so far).
OVERRIDES: dict[str, str] = {}


@dataclass(frozen=True)
class Synset:
    """One WordNet noun synset: its lemmas (underscores as spaces) and direct hypernym offsets."""

    lemmas: tuple[str, ...]
    hypernyms: tuple[str, ...]


@dataclass
class ImageNetClass:
    """One ImageNet-1K class with the fields written to the JSON and its ranked context candidates."""

    index: int
    wnid: str
    name: str
    lemmas: list[str]
    gloss: str
    hypernyms: list[str]
    ancestors: list[str]
    gloss_phrases: list[str]
    context: str = ""

    @property
    def candidates(self) -> list[str]:
        """Context candidates in order of preference: ancestors, own lemmas, gloss phrases."""
        return self.ancestors + self.lemmas + self.gloss_phrases


def read_wordnet_nouns(wordnet_dir: Path) -> dict[str, Synset]:
    """Parse data.noun (WordNet 3.0 database format) into offset -> Synset."""
    path = wordnet_dir / "data.noun"
    if not path.is_file():
        sys.exit(f"error: WordNet noun database not found at {path}; install it with "
                 f"`apt-get install -y wordnet-base` or pass --wordnet DIR (the folder holding data.noun)")
    synsets: dict[str, Synset] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            fields = line.split(" | ", 1)[0].split()
            offset, n_words = fields[0], int(fields[3], 16)
            lemmas = tuple(fields[4 + 2 * i].replace("_", " ") for i in range(n_words))
            pos = 4 + 2 * n_words
            n_pointers = int(fields[pos])
            pointers = [fields[pos + 1 + 4 * i: pos + 5 + 4 * i] for i in range(n_pointers)]
            hypernyms = tuple(p[1] for p in pointers if p[0] in HYPERNYM_POINTERS and p[2] == "n")
            synsets[offset] = Synset(lemmas, hypernyms)
    return synsets


def read_timm_info() -> tuple[list[str], dict[str, str], dict[str, str]]:
    """The 1000 wnids in index order, and wnid -> lemma line / definition from timm's bundled files."""
    info = resources.files("timm.data") / "_info"

    def table(name: str) -> dict[str, str]:
        rows = (line.split("\t", 1) for line in (info / name).read_text(encoding="utf-8").splitlines())
        return {wnid: value.strip() for wnid, value in rows}

    wnids = (info / "imagenet_synsets.txt").read_text(encoding="utf-8").split()
    return wnids, table("imagenet_synset_to_lemma.txt"), table("imagenet_synset_to_definition.txt")


def ancestor_lemmas(offset: str, synsets: dict[str, Synset]) -> list[str]:
    """First lemma of every ancestor of a synset, direct hypernyms first, then breadth first upwards."""
    seen: set[str] = set()
    frontier = list(synsets[offset].hypernyms)
    out: list[str] = []
    while frontier:
        following: list[str] = []
        for parent in frontier:
            if parent not in seen:
                seen.add(parent)
                out.append(synsets[parent].lemmas[0])
                following.extend(synsets[parent].hypernyms)
        frontier = following
    return out


def gloss_phrases(gloss: str) -> list[str]:
    """Head phrases of a gloss's first clause without leading determiners: a short one cut before the
    first function word ("large venomous ray with ..." -> "large venomous ray"), then a longer one."""
    words = re.split(r"[;,:]", re.sub(r"\([^)]*\)", "", gloss).strip(), maxsplit=1)[0].split()
    while words and words[0].lower() in LEADING_WORDS:
        words = words[1:]
    cut = next((i for i, word in enumerate(words) if i > 0 and word.lower() in CUT_WORDS), len(words))
    short, long = " ".join(words[:min(cut, GLOSS_WORDS[0])]), " ".join(words[:GLOSS_WORDS[1]])
    return [short] if short == long else [short, long]


def first_allowed(candidates: list[str], banned: set[str]) -> str:
    """The first candidate not in banned (compared lower-cased), or "" if there is none."""
    return next((c for c in candidates if c.lower() not in banned), "")


def build_classes(synsets: dict[str, Synset]) -> list[ImageNetClass]:
    """The 1000 classes in index order, joining timm's wnids, open_clip's names and the WordNet graph."""
    wnids, lemma_lines, definitions = read_timm_info()
    if len(wnids) != 1000 or len(IMAGENET_CLASSNAMES) != 1000:
        sys.exit(f"error: expected 1000 wnids and names, got {len(wnids)} and {len(IMAGENET_CLASSNAMES)}")
    classes = []
    for index, (wnid, name) in enumerate(zip(wnids, IMAGENET_CLASSNAMES, strict=True)):
        offset = wnid[1:]
        if not re.fullmatch(r"n\d{8}", wnid) or offset not in synsets:
            sys.exit(f"error: {wnid} (index {index}) is not a noun synset of the WordNet database")
        lemmas = [lemma.strip() for lemma in lemma_lines[wnid].split(",")]
        gloss = definitions[wnid]
        hypernyms = [synsets[h].lemmas[0] for h in synsets[offset].hypernyms]
        classes.append(ImageNetClass(index, wnid, name, lemmas, gloss, hypernyms,
                                     ancestor_lemmas(offset, synsets), gloss_phrases(gloss)))
    return classes


def terms(c: ImageNetClass) -> set[str]:
    """The class's name and all its context candidates, lower-cased."""
    return {t.lower() for t in [c.name, *c.candidates]}


def homonym_groups(classes: list[ImageNetClass]) -> list[list[ImageNetClass]]:
    """Classes sharing a display name or a first lemma (case-insensitive), merged transitively."""
    parent = list(range(len(classes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_key: dict[str, int] = {}
    for c in classes:
        for key in (f"name:{c.name.lower()}", f"lemma:{c.lemmas[0].lower()}"):
            if key in by_key:
                parent[root(c.index)] = root(by_key[key])
            else:
                by_key[key] = c.index
    members: dict[int, list[ImageNetClass]] = defaultdict(list)
    for c in classes:
        members[root(c.index)].append(c)
    return [group for group in members.values() if len(group) > 1]


def choose_contexts(classes: list[ImageNetClass], groups: list[list[ImageNetClass]]) -> None:
    """Set each class's context: overrides, then the default rule, then re-choice within homonym groups."""
    for c in classes:
        c.context = OVERRIDES.get(c.wnid) or first_allowed(c.candidates, {c.name.lower()})
    for group in groups:
        counts: dict[str, int] = defaultdict(int)
        for c in group:
            counts[c.context.lower()] += 1
        for c in group:
            if counts[c.context.lower()] > 1 and c.wnid not in OVERRIDES:
                banned = {c.name.lower()}.union(*(terms(o) for o in group if o is not c))
                c.context = first_allowed(c.candidates, banned)


def check(classes: list[ImageNetClass], groups: list[list[ImageNetClass]]) -> None:
    """Exit with a message if a context is empty, repeats its name or repeats within a homonym group."""
    problems = [f"{c.wnid} {c.name!r}: context {c.context!r} is empty or repeats the name"
                for c in classes if not c.context or c.context.lower() == c.name.lower()]
    for group in groups:
        contexts = [c.context.lower() for c in group]
        if len(set(contexts)) != len(contexts):
            listing = ", ".join(f"{c.wnid}={c.context!r}" for c in group)
            problems.append(f"repeated contexts in group {listing}")
    if problems:
        sys.exit("error: add an entry to OVERRIDES for:\n  " + "\n  ".join(problems))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--wordnet", type=Path, default=DEFAULT_WORDNET,
                        help=f"WordNet 3.0 database folder holding data.noun (default {DEFAULT_WORDNET})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output JSON file")
    args = parser.parse_args()

    classes = build_classes(read_wordnet_nouns(args.wordnet))
    groups = homonym_groups(classes)
    choose_contexts(classes, groups)
    check(classes, groups)

    rows = [{"index": c.index, "wnid": c.wnid, "name": c.name, "lemmas": c.lemmas,
             "hypernyms": c.hypernyms, "gloss": c.gloss, "context": c.context} for c in classes]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    defaults = sum(c.context == (c.hypernyms[0] if c.hypernyms else "") for c in classes)
    print(f"wrote {len(rows)} classes to {args.out} ({args.out.stat().st_size:,} bytes); "
          f"{defaults} use the first direct hypernym, {len(classes) - defaults} another phrase")
    print(f"{len(groups)} homonym groups (same display name or first WordNet lemma):")
    for group in groups:
        print("  " + " | ".join(f"{c.index} {c.wnid} {c.name!r} -> {c.context!r}" for c in group))
    print("contexts other than the first direct hypernym:")
    for c in classes:
        if c.context != (c.hypernyms[0] if c.hypernyms else ""):
            print(f"  {c.index} {c.wnid} {c.name!r} -> {c.context!r} "
                  f"(direct hypernyms {c.hypernyms})")


if __name__ == "__main__":
    main()
