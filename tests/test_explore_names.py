"""Sprout names: parsing a continuation, the filter, and the vote."""

from __future__ import annotations

from fusedata.explore.names import parse_proposals, valid_name, vote
from fusedata.explore.prompts import names_prompt


def test_parse_takes_the_first_line_split_at_commas_and_and():
    assert parse_proposals(" Optics, Thermodynamics and Mechanics.\nTopics within Cooking: Soup") == [
        "Optics", "Thermodynamics", "Mechanics"]
    assert parse_proposals("  Quantum   field theory ;  Lasers ") == ["Quantum field theory", "Lasers"]
    assert parse_proposals("\n\n") == []
    assert parse_proposals("") == []


def test_filter_one_to_three_words_of_letters_and_digits_not_taken():
    taken = {"physics", "optics"}
    assert valid_name("Mechanics", taken)
    assert valid_name("Quantum field theory", taken)
    assert valid_name("Théorie des nombres", taken)  # letters of any script
    assert valid_name("Web3 security", taken)
    assert not valid_name("Optics", taken)  # a sibling or an ancestor already
    assert not valid_name("OPTICS", taken)  # case does not make it new
    assert not valid_name("unk", taken)
    assert not valid_name("Four words is too", taken)
    assert not valid_name("Physics > Optics", taken)  # punctuation
    assert not valid_name("Rock-climbing", taken)
    assert not valid_name("etc.", taken)
    assert not valid_name("1990", taken)  # a number is not a domain
    assert not valid_name("However", taken) and not valid_name("Several others", taken)  # list filler
    assert valid_name("Other worlds", taken)  # one real word is enough
    assert not valid_name("x" * 41, taken)


def test_vote_most_sources_win_then_earliest_rank():
    v = vote([["Optics", "Lasers"], ["Lasers", "Acoustics"], ["Acoustics", "Lasers"]], taken=set())
    assert v.winner == "Lasers" and v.votes == {"optics": 1, "lasers": 3, "acoustics": 2}
    tie = vote([["Optics", "Lasers"], ["Lasers", "Optics"]], taken=set())
    assert tie.winner == "Optics"  # 2 votes each; Optics is ranked first by the first source
    assert vote([["Lasers"], ["optics"]], taken=set()).winner == "Lasers"  # rank 0 both; source order
    assert vote([["lasers", "lasers", "LASERS"]], taken=set()).votes == {"lasers": 1}  # one vote per source
    assert vote([["lasers"]], taken=set()).winner == "Lasers"  # first letter capitalised


def test_vote_fails_when_nothing_survives_the_filter():
    v = vote([["Physics", "a, b"], []], taken={"physics"})
    assert v.winner is None and v.votes == {} and "no valid name" in v.reason


def test_names_prompt_lists_existing_children_so_the_model_continues_the_list():
    assert names_prompt([], []).endswith("Broad fields of knowledge:")
    assert names_prompt(["Science", "Physics"], ["Optics", "Mechanics"]).endswith(
        "Topics within Science > Physics: Optics, Mechanics,")
