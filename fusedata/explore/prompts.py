"""The texts the models see. Plain few-shot completions for proposing names and writing
questions (base and instruct models both continue a pattern); answers use a model's chat
template when it has one, since an instruct model answers best in its own format.

Every generated text is cut at the first line break where one line is expected, so the
result does not depend on how long a model would ramble on.
"""

from __future__ import annotations

from typing import Any

NAMES_EXAMPLES = (
    "Topics within Cooking: Baking, Grilling, Fermentation, Knife skills\n"
    "Topics within Astronomy > Stars: Supernovae, Red giants, Binary stars\n"
)

# style → (how the list of questions is introduced, two examples of (topic, question))
STYLES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "factual": ("Short factual questions, one per topic.", [
        ("Geography > Rivers > Nile", "Which countries does the Nile flow through?"),
        ("Biology > Cells > Mitochondria", "What does a mitochondrion produce for the cell?"),
    ]),
    "explain": ("Questions that ask to explain why or how something happens, one per topic.", [
        ("Physics > Optics > Rainbows", "Why does a rainbow appear when the sun shines after rain?"),
        ("Economics > Markets > Inflation", "How does printing more money lead to higher prices?"),
    ]),
    "how-to": ("Practical how-to questions, one per topic.", [
        ("Cooking > Baking > Bread", "How do I know when bread dough has risen enough?"),
        ("Computing > Networks > Wi-Fi", "How can I find out why my Wi-Fi connection keeps dropping?"),
    ]),
    "problem": ("Small problems with a definite answer, one per topic.", [
        ("Mathematics > Arithmetic > Percentages", "A shirt costs 40 dollars and is 25 percent off. What is the sale price?"),
        ("Chemistry > Stoichiometry > Moles", "How many moles are in 36 grams of water?"),
    ]),
    "compare": ("Questions that compare two things, one per topic.", [
        ("History > Empires > Rome", "How did the Roman Republic differ from the Roman Empire?"),
        ("Music > Instruments > Strings", "What is the difference between a violin and a viola?"),
    ]),
}

JUDGE_LABELS = "ABCDEFGH"


def topic(path: list[str]) -> str:
    return " > ".join(path)


def names_prompt(parent_path: list[str], existing: list[str]) -> str:
    """Ends inside a comma-separated list that already holds the existing children, so the
    continuation proposes new ones."""
    header = f"Topics within {topic(parent_path)}" if parent_path else "Broad fields of knowledge"
    listed = ", ".join(existing)
    return f"{NAMES_EXAMPLES}{header}:" + (f" {listed}," if listed else "")


def question_prompt(path: list[str], style: str) -> str:
    intro, examples = STYLES[style]
    shots = "".join(f"Topic: {t}\nQuestion: {q}\n" for t, q in examples)
    return f"{intro}\n{shots}Topic: {topic(path)}\nQuestion:"


def answer_prompt(tokenizer: Any, question: str) -> str:
    """The model's chat template (a user turn) when it has one, else a plain Q/A prompt."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return f"Question: {question}\nAnswer:"


def judge_prompt(question: str, answers: list[str]) -> str:
    """Answers labelled A, B, ... in the order given (the caller shuffles and records it);
    the judge's next-token probabilities over the labels are its scores."""
    parts = [
        "Which answer to the question is better: more correct, more helpful and more complete?\n",
        f"Question: {question}\n",
    ]
    for label, answer in zip(JUDGE_LABELS, answers, strict=False):
        parts.append(f"Answer {label}: {answer.strip() or '(no answer)'}\n")
    parts.append("The better answer is Answer")
    return "\n".join(parts)


def first_line(text: str) -> str:
    stripped = text.strip()
    return stripped.splitlines()[0].strip() if stripped else ""


def clean_answer(text: str) -> str:
    """An answer up to where a plain-format model starts a new question or a blank line."""
    for stop in ("\nQuestion:", "\n\n\n"):
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    return text.strip()


def usable_question(text: str) -> bool:
    return len(text.split()) >= 3
