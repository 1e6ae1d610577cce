"""Sprouting: turn the source models' free-text proposals into one new domain name.

Each source continues a comma-separated list of the parent's topics; the names are parsed,
filtered (1–3 words of letters and digits, not only filler words like "however", not already a
sibling or an ancestor, not `unk`)
and voted on: each source gives one vote to each distinct name it proposed, the most-voted
name wins, ties going to the name proposed earliest (best rank, then source order).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fusedata.explore.tree import UNK

MAX_WORDS = 3
MAX_CHARS = 40
_WORD = re.compile(r"^[^\W_]+$")  # letters and digits of any script, nothing else
# names made only of these words are list filler, not domains ("However", "Several others")
FILLER = frozenset("""a all an and another any are as etc general however i is it me misc miscellaneous more
most much my no none not of one or other others several some such the their these this those topic topics
various we you""".split())
_SPLIT = re.compile(r",|;|\band\b|\bor\b|\|", re.IGNORECASE)


def parse_proposals(text: str) -> list[str]:
    """Candidate names from one continuation: its first line, split at commas (and 'and')."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    out = []
    for part in _SPLIT.split(line):
        name = " ".join(part.split()).strip(" .")
        if name:
            out.append(name)
    return out


def valid_name(name: str, taken: set[str]) -> bool:
    """1–3 words, letters and digits only, not only filler words, and not a name already in use
    here (`taken`, casefolded)."""
    words = name.split()
    if not 1 <= len(words) <= MAX_WORDS or len(name) > MAX_CHARS:
        return False
    if not all(_WORD.match(w) for w in words):
        return False
    if any(w.isdigit() for w in words) or all(w.casefold() in FILLER for w in words):
        return False
    key = name.casefold()
    return key != UNK and key not in taken


@dataclass(frozen=True)
class Vote:
    winner: str | None  # None: no valid name at all (a failed sprout)
    votes: dict[str, int]  # casefolded name → sources that proposed it
    reason: str  # the winner, or why there is none


def vote(proposals: list[list[str]], taken: set[str]) -> Vote:
    """Pick one name from the proposals of several sources (one list per source, in rank order)."""
    votes: dict[str, int] = {}
    first_seen: dict[str, tuple[int, int]] = {}  # key → (best rank, source index)
    display: dict[str, str] = {}
    rejected = 0
    for s, names in enumerate(proposals):
        seen_here: set[str] = set()
        for rank, name in enumerate(names):
            if not valid_name(name, taken):
                rejected += 1
                continue
            key = name.casefold()
            if key in seen_here:
                continue
            seen_here.add(key)
            votes[key] = votes.get(key, 0) + 1
            if key not in first_seen or (rank, s) < first_seen[key]:
                first_seen[key] = (rank, s)
                display[key] = name
    if not votes:
        total = sum(len(p) for p in proposals)
        return Vote(None, {}, f"no valid name among {total} proposed ({rejected} filtered out)")
    best = min(votes, key=lambda k: (-votes[k], first_seen[k], k))
    return Vote(_tidy(display[best]), votes, f"{_tidy(display[best])} ({votes[best]} of {len(proposals)} votes)")


def _tidy(name: str) -> str:
    """Capitalise the first letter, keep the rest as written (acronyms stay intact)."""
    return name[:1].upper() + name[1:]
