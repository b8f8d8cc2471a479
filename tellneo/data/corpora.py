"""General instruction data that needs no download: built from English text that ships with Python itself.

Sources (Python Software Foundation License, distributed with every CPython):

* ``pydoc_data.topics`` — the language reference topics behind ``help('topic')`` (about 80 long texts);
* docstrings of the standard library, read with ``ast`` from the ``.py`` files (nothing is imported, so no module
  runs any code), for modules, classes, functions and methods.

Every record is an instruction/response pair ``{"prompt", "response", "source"}``. The set is deterministic for a
given Python version (the docstrings differ between versions; :func:`corpus_fingerprint` identifies it).
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

# Parts of the standard library whose docstrings are not prose about Python (tests, GUI toolkits, vendored code).
_SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
              "config-3", "__pycache__", "pydoc_data", "encodings", "msilib", "venv"}

_TOPIC_PROMPTS = (
    "Explain the Python language topic '{topic}'.",
    "What does the Python reference manual say about {topic}?",
    "Describe how {topic} works in Python.",
)
_DOC_PROMPTS = {
    "module": ("What is the Python module `{name}` for?", "Summarize the purpose of the `{name}` module."),
    "class": ("What is the class `{name}` in Python's standard library?", "Describe the `{name}` class."),
    "function": ("What does `{name}` do in Python?", "Explain the function `{name}`."),
}


def _clean(text: str, max_chars: int) -> str:
    """First paragraphs of a docstring/topic, whitespace-normalised, cut at a sentence end near max_chars."""
    text = text.replace("\r\n", "\n").strip()
    paragraphs = [re.sub(r"[ \t]+", " ", p.strip()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    out = ""
    for p in paragraphs:
        if out and len(out) + len(p) + 2 > max_chars:
            break
        out = f"{out}\n\n{p}" if out else p
    if len(out) > max_chars:
        cut = out.rfind(". ", 0, max_chars)
        out = out[: cut + 1] if cut > max_chars // 3 else out[:max_chars]
    return out.strip()


def pydoc_topic_pairs(max_chars: int = 1200) -> list[dict[str, str]]:
    """One pair per ``pydoc_data.topics`` entry (prompt wording rotates deterministically)."""
    from pydoc_data.topics import topics

    pairs = []
    for i, name in enumerate(sorted(topics)):
        body = _clean(topics[name], max_chars)
        if len(body) < 80:
            continue
        readable = name.replace("-", " ")
        pairs.append({"prompt": _TOPIC_PROMPTS[i % len(_TOPIC_PROMPTS)].format(topic=readable), "response": body,
                      "source": f"pydoc_data.topics:{name}"})
    return pairs


def _stdlib_files() -> Iterator[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("_") and rel.name != "__init__.py":
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            yield ".".join(parts), path


def stdlib_docstring_pairs(max_chars: int = 900, min_chars: int = 60) -> list[dict[str, str]]:
    """Pairs from standard-library docstrings (modules, public classes, functions and methods), parsed with ast."""
    pairs: list[dict[str, str]] = []
    for module, path in _stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        found: list[tuple[str, str, str]] = []
        doc = ast.get_docstring(tree)
        if doc:
            found.append(("module", module, doc))
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                if (d := ast.get_docstring(node)):
                    found.append((kind, f"{module}.{node.name}", d))
                if isinstance(node, ast.ClassDef):
                    for sub in node.body:
                        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and not sub.name.startswith("_"):
                            if (d := ast.get_docstring(sub)):
                                found.append(("function", f"{module}.{node.name}.{sub.name}", d))
        for kind, name, doc in found:
            body = _clean(doc, max_chars)
            if len(body) < min_chars:
                continue
            digest = int(hashlib.sha256(name.encode()).hexdigest(), 16)
            prompts = _DOC_PROMPTS[kind]
            pairs.append({"prompt": prompts[digest % len(prompts)].format(name=name), "response": body,
                          "source": f"stdlib:{name}"})
    return pairs


def python_docs_pairs(max_pairs: int | None = None) -> list[dict[str, str]]:
    """pydoc topics followed by standard-library docstrings, optionally cut to ``max_pairs`` (deterministic)."""
    pairs = pydoc_topic_pairs() + stdlib_docstring_pairs()
    return pairs if max_pairs is None else pairs[:max_pairs]


def corpus_fingerprint(pairs: list[dict[str, str]]) -> str:
    """sha256 (first 16 hex digits) of the records, to write next to results that used them."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps(p, sort_keys=True).encode())
    return h.hexdigest()[:16]
