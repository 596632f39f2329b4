"""Three text domains and a held-out general set, built from text every installation has.

No download: every passage is read from Python and from the distributions this project
depends on (its requirements and, recursively, theirs), so a machine with the project
installed rebuilds the same sets (given the same package versions).

* ``stdlib_docs`` — docstrings (``inspect.getdoc``) of the modules in `STDLIB_MODULES` and
  of their public functions, classes and methods;
* ``licenses`` — LICENSE / COPYING / NOTICE files shipped in those distributions' metadata;
* ``package_readmes`` — those distributions' long descriptions (the README on PyPI);
* ``general`` (held out, never a training domain) — scikit-learn's bundled dataset
  descriptions (``sklearn/datasets/descr/*.rst``): English prose about biology, medicine,
  housing, images and news, far from the three domains.

Text becomes passages: paragraphs (split at blank lines, whitespace collapsed) are joined until
a passage has at least `min_words` words and cut at `max_words`; passages with less than 60 %
letters (tables, code) and exact duplicates (licenses repeat a lot) are dropped. Each set is
shuffled with `random.Random(seed)` and split into train / eval.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from importlib.resources import files

from softmask_peft.errors import EmptyDataError

DOMAINS = ("stdlib_docs", "licenses", "package_readmes")
PROJECT = "softmask-peft"
STDLIB_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "enum", "fractions", "functools", "gzip", "hashlib", "heapq", "http.client", "inspect",
    "ipaddress", "itertools", "json", "logging", "math", "operator", "os", "pathlib", "pickle",
    "pprint", "queue", "random", "re", "sched", "secrets", "shlex", "shutil", "socket",
    "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref",
    "zipfile",
)  # fmt: skip
LICENSE_NAME = re.compile(r"(LICEN[CS]E|COPYING|NOTICE)", re.IGNORECASE)


@dataclass
class TextSplit:
    train: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)


@dataclass
class TextDomains:
    """The three domains (in training order), the general set and the sources' description."""

    domains: dict[str, TextSplit]
    general: TextSplit

    def summary(self) -> dict[str, dict[str, int]]:
        sets = {**self.domains, "general": self.general}
        return {k: {"train": len(v.train), "eval": len(v.eval)} for k, v in sets.items()}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_distributions(root: str = PROJECT) -> list[metadata.Distribution]:
    """Installed distributions `root` requires (without extras), recursively, sorted by name."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [root]
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = dist
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            todo.append(re.split(r"[\s;<>=!~\[(]", req.strip(), maxsplit=1)[0])
    seen.pop(_norm(root), None)
    return [seen[k] for k in sorted(seen)]


def _stdlib_docs() -> list[str]:
    with warnings.catch_warnings():  # e.g. typing's deprecated aliases warn when inspected
        warnings.simplefilter("ignore", DeprecationWarning)
        return [doc for name in STDLIB_MODULES for doc in _module_docs(name)]


def _module_docs(mod_name: str) -> list[str]:
    """The module's docstring, then its public classes' and functions' (and methods'), by name."""
    mod = importlib.import_module(mod_name)
    texts = [inspect.getdoc(mod) or ""]
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        texts.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            texts += [
                inspect.getdoc(member) or ""
                for attr, member in sorted(vars(obj).items())
                if not attr.startswith("_") and inspect.isfunction(member)
            ]
    return texts


def _licenses(dists: list[metadata.Distribution]) -> list[str]:
    texts = []
    for dist in dists:
        for f in sorted(dist.files or [], key=str):
            if LICENSE_NAME.search(f.name) and f.suffix.lower() in ("", ".txt", ".md", ".rst"):
                try:
                    texts.append(f.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError):
                    continue
    return texts


def _readmes(dists: list[metadata.Distribution]) -> list[str]:
    return [dist.metadata.get_payload() or dist.metadata.get("Description") or "" for dist in dists]


def _general() -> list[str]:
    descr = files("sklearn.datasets").joinpath("descr")
    return [
        p.read_text(encoding="utf-8")
        for p in sorted(descr.iterdir(), key=lambda p: p.name)
        if p.name.endswith(".rst")
    ]


def passages(texts: list[str], min_words: int = 40, max_words: int = 120) -> list[str]:
    """Split texts into passages of min_words..max_words words (see the module docstring)."""
    out: list[str] = []
    seen: set[str] = set()

    def emit(words: list[str]) -> None:
        text = " ".join(words)
        letters = sum(c.isalpha() for c in text)
        if len(words) >= min_words and letters >= 0.6 * len(text) and text not in seen:
            seen.add(text)
            out.append(text)

    for text in texts:
        buf: list[str] = []
        for para in re.split(r"\n\s*\n", text):
            buf += para.split()
            while len(buf) >= max_words:
                emit(buf[:max_words])
                buf = buf[max_words:]
            if len(buf) >= min_words:
                emit(buf)
                buf = []
        emit(buf)
    return out


def _split(items: list[str], max_items: int, eval_fraction: float, seed: int) -> TextSplit:
    items = list(items)
    random.Random(seed).shuffle(items)
    items = items[:max_items]
    n_eval = max(1, round(len(items) * eval_fraction))
    return TextSplit(train=items[n_eval:], eval=items[:n_eval])


def load_text_domains(
    max_passages: int = 400,
    eval_fraction: float = 0.2,
    seed: int = 0,
    min_words: int = 40,
    max_words: int = 120,
) -> TextDomains:
    """Build the three domains and the general set; at most `max_passages` passages each."""
    if max_passages < 2 or not 0 < eval_fraction < 1:
        raise ValueError(
            f"need max_passages >= 2 and 0 < eval_fraction < 1, got {max_passages}, {eval_fraction}"
        )
    dists = dependency_distributions()
    sources = {
        "stdlib_docs": _stdlib_docs(),
        "licenses": _licenses(dists),
        "package_readmes": _readmes(dists),
    }
    domains = {}
    for name in DOMAINS:
        items = passages(sources[name], min_words, max_words)
        if len(items) < 2:
            raise EmptyDataError(f"text domain {name!r} has {len(items)} passages; need 2")
        domains[name] = _split(items, max_passages, eval_fraction, seed)
    general = _split(passages(_general(), min_words, max_words), max_passages, 0.5, seed)
    return TextDomains(domains, general)
