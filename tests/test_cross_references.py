"""Every pointer in the book's prose leads somewhere: roles resolve, "see ..." names a thing
that exists, a chapter is named by a name it has, and no sentence points at a table or figure
in another chapter without a link (such a sentence outlives the table it names).

The prose is ``book/*.md`` and the markdown cells of ``notebooks/*.py`` (the chapters under
``book/executed/``). The nitpicky book build checks roles too; this test runs without one.
"""

from __future__ import annotations

import re
from pathlib import Path

import jupytext
import pytest

from lib.run import findings, layout
from lib.run.parameters import merged_parameters

BOOK = layout.REPO / "book"

#: What "the <name> chapter" may name: the chapter's file in the book.
CHAPTER_NAMES = {
    "data": "executed/01_data", "training": "executed/02_train", "method": "method",
    "attack": "executed/03_attack", "analysis": "executed/04_analysis",
    "results": "executed/04_analysis", "minimality": "executed/05_minimality",
    "margins": "executed/07_margins",
    "reproduce": "reproduce", "reference": "api", "references": "references",
}

ROLE = re.compile(r"\{(doc|ref|numref|glue:text|glue|download)\}`([^`]*)`")
SEE = re.compile(r"\bsee\s+(the\s+[\w-]+(?:\s+[\w-]+)?|below|above|\{[\w:]+\}`[^`]*`|`[^`]*`)",
                 re.IGNORECASE)
CHAPTER = re.compile(r"\bthe ([\w-]+) chapter\b", re.IGNORECASE)
UNLINKED = re.compile(r"\bthe (?:table|figure|chart|plot)s?\b[^.]{0,60}?\b(?:at the end of|in)\s+"
                      r"(?:\{doc\}`[^`]*`|the [\w-]+ chapter)", re.IGNORECASE)


def chapters() -> dict[str, str]:
    """``{document name relative to book/: its prose}``."""
    texts = {path.relative_to(BOOK).with_suffix("").as_posix(): path.read_text()
             for path in BOOK.glob("*.md")}
    for stage in layout.STAGES:
        source = layout.notebook_path(stage)
        if source.exists():
            notebook = jupytext.read(source)
            texts[f"executed/{stage}"] = "\n\n".join(
                cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    # the page of conclusions is generated; its sentences for a run folder with nothing in it
    texts[f"executed/{Path(findings.PAGE).stem}"] = findings.findings_markdown(
        layout.REPO / "data" / "runs" / "no run folder")
    return texts


def labels() -> set[str]:
    """Every label a {ref} or {numref} may name: ``(label)=`` targets and named figures."""
    found = set()
    for text in chapters().values():
        found |= set(re.findall(r"^\((\S+)\)=\s*$", text, flags=re.MULTILINE))
    for stage in layout.STAGES:
        source = layout.notebook_path(stage)
        if source.exists():
            found |= set(re.findall(r'"name": "([^"]+)"', source.read_text()))
    return found


def glued(document: str) -> set[str]:
    """The keys a chapter notebook glues (``glue("key", ...)`` in its source)."""
    source = layout.notebook_path(Path(document).name)
    return set(re.findall(r'glue\(\s*f?"([^"{]+)"', source.read_text())) if source.exists() \
        else set()


def _target(text: str) -> str:
    """A role's target: ``text <target>`` or the whole content."""
    found = re.search(r"<([^>]+)>\s*$", text)
    return (found[1] if found else text).strip()


def role_problems(document: str, text: str, known_labels: set[str],
                  documents: set[str]) -> list[str]:
    problems = []
    here = Path(document).parent
    for kind, content in ROLE.findall(text):
        target = _target(content)
        if kind == "doc":
            resolved = (here / target).as_posix() if not target.startswith("/") else target[1:]
            resolved = Path(resolved).as_posix()
            normal = "/".join(p for p in resolved.split("/") if p != ".")
            while "/../" in f"/{normal}/":
                parts = normal.split("/")
                k = parts.index("..")
                normal = "/".join(parts[:k - 1] + parts[k + 1:])
            if normal not in documents:
                problems.append(f"{document}: {{doc}}`{content}` names no chapter")
        elif kind in ("ref", "numref") and target not in known_labels:
            problems.append(f"{document}: {{{kind}}}`{content}` names no label")
        elif kind.startswith("glue") and "::" in content:
            other, key = content.split("::", 1)
            other = (here / other).with_suffix("").as_posix().removeprefix("./")
            if key.split(":")[0] not in glued(other):
                problems.append(f"{document}: {{{kind}}}`{content}`: {other} glues no such key")
    return problems


def prose_problems(document: str, text: str) -> list[str]:
    """Plain-text pointers that lead nowhere (see the module's docstring)."""
    problems = []
    for pointer in SEE.findall(text):
        words = pointer.lower()
        if words in ("below", "above") or pointer.startswith("{"):
            continue  # a role is checked by role_problems
        if pointer.startswith("`"):
            if not (layout.REPO / pointer.strip("`")).exists():
                problems.append(f"{document}: 'see {pointer}' names no file")
        elif words.startswith("the readme"):
            continue
        else:
            named = re.fullmatch(r"the ([\w-]+) chapter", words)
            if named is None or named[1] not in CHAPTER_NAMES:
                problems.append(f"{document}: 'see {pointer}' points at no chapter, label or file")
    for name in CHAPTER.findall(text):
        if name.lower() not in CHAPTER_NAMES:
            problems.append(f"{document}: 'the {name} chapter' is not a chapter of the book")
    problems += [f"{document}: '{m.group(0)}' names a table or figure without a link "
                 "(use {numref} or {ref})" for m in UNLINKED.finditer(text)]
    return problems


def test_every_chapter_name_is_a_chapter() -> None:
    documents = set(chapters())
    assert {f for f in CHAPTER_NAMES.values()} <= documents


def test_every_pointer_in_the_book_leads_somewhere() -> None:
    texts = chapters()
    known_labels, documents = labels(), set(texts)
    problems = []
    for document, text in texts.items():
        problems += role_problems(document, text, known_labels, documents)
        problems += prose_problems(document, text)
    assert problems == []


@pytest.mark.parametrize("sentence", [
    "The table at the end of {doc}`executed/03_attack` gives the expected time.",
    "The figure in the attack chapter shows it.",
    "(see the table of timings)",
    "see `benchmarks/no_such_file.py`",
    "as the speed chapter says",
    "(see the data)",
], ids=["table-at-the-end-of", "figure-in-a-chapter", "see-a-table", "see-a-file",
        "unknown-chapter", "see-no-chapter"])
def test_a_pointer_to_nothing_is_found(sentence: str) -> None:
    assert prose_problems("reproduce", sentence) != []


@pytest.mark.parametrize(("sentence", "problem"), [
    ("{doc}`executed/99_none`", "names no chapter"),
    ("{numref}`fig-no-such-figure`", "names no label"),
    ("{glue:text}`executed/02_train.ipynb::no_such_key`", "glues no such key"),
], ids=["doc", "numref", "glue"])
def test_a_role_that_resolves_nowhere_is_found(sentence: str, problem: str) -> None:
    (found,) = role_problems("reproduce", sentence, labels(), set(chapters()))
    assert problem in found


@pytest.mark.parametrize("sentence", [
    "(see {doc}`executed/01_data`)", "see below", "(see the README)",
    "see the reproduce chapter", "see `benchmarks/bench_attack.py`",
    "which only see their own step", "the measurement does see a split",
])
def test_pointers_that_lead_somewhere_pass(sentence: str) -> None:
    assert prose_problems("method", sentence) == []


def test_the_attack_chapter_states_the_default_profile_as_it_is() -> None:
    # the chapter gives the default profile's attacked checkpoints and the one it leaves out
    attacked = merged_parameters("03_attack", profile="default", with_defaults=True)["epochs"]
    trained = merged_parameters("02_train", profile="default", with_defaults=True)["epochs"]
    left_out = [e for e in range(1, trained + 1) if e not in attacked]
    text = " ".join(chapters()["executed/03_attack"].split())
    listed = ", ".join(map(str, attacked[:-1])) + f" and {attacked[-1]}"
    assert f"The default profile attacks the checkpoints of epochs {listed}" in text
    assert left_out == [2] and "leaves out epoch 2 by choice" in text
