"""The pretraining corpus of the built-in model: English text that every Python install ships offline.

Two sources, both part of CPython itself, so no download and no data set licence is involved:
``pydoc_data.topics.topics`` (the reference manual's help topics, about 0.46M characters) and the docstrings
of a fixed list of standard-library modules (their public classes, functions and methods).

Determinism matters more than size here: the list of modules is fixed and sorted, every iteration is over
sorted names, duplicate docstrings (re-exports, inherited text) are dropped by keeping the first in that
order, and the train/held-out split depends only on each document's key. The text still depends on the
Python version (docstrings change between releases), so the pretraining report records it.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["STDLIB_MODULES", "Corpus", "Document", "collect_documents", "load_corpus"]

# Public standard-library modules whose docstrings read as English prose. Deliberately fixed (not
# sys.stdlib_module_names): modules with import side effects (this, antigravity, turtledemo, idlelib) are
# left out, and platform-only ones are simply skipped where they fail to import.
# fmt: off
STDLIB_MODULES: tuple[str, ...] = tuple(sorted({
    "abc", "argparse", "array", "ast", "asyncio", "asyncio.base_events", "asyncio.events", "asyncio.futures",
    "asyncio.locks", "asyncio.queues", "asyncio.streams", "asyncio.subprocess", "asyncio.tasks",
    "asyncio.transports", "base64", "bdb", "binascii", "bisect", "builtins", "bz2", "calendar", "cmath", "cmd",
    "code", "codecs", "codeop", "collections", "collections.abc", "colorsys", "compileall", "concurrent.futures",
    "configparser", "contextlib", "contextvars", "copy", "copyreg", "csv", "ctypes", "dataclasses", "datetime",
    "dbm", "decimal", "difflib", "dis", "doctest", "email", "email.charset", "email.generator", "email.header",
    "email.headerregistry", "email.message", "email.parser", "email.policy", "email.utils", "enum", "errno",
    "faulthandler", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "gc", "getopt", "getpass",
    "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser", "http", "http.client",
    "http.cookiejar", "http.cookies", "http.server", "imaplib", "importlib", "importlib.abc", "importlib.machinery",
    "importlib.metadata", "importlib.resources", "importlib.util", "inspect", "io", "ipaddress", "itertools", "json",
    "json.decoder", "json.encoder", "keyword", "linecache", "locale", "logging", "logging.config",
    "logging.handlers", "lzma", "mailbox", "marshal", "math", "mimetypes", "mmap", "modulefinder", "multiprocessing",
    "multiprocessing.connection", "multiprocessing.managers", "multiprocessing.pool", "multiprocessing.process",
    "multiprocessing.queues", "multiprocessing.shared_memory", "netrc", "numbers", "opcode", "operator", "optparse",
    "os", "os.path", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib",
    "pprint", "profile", "pstats", "pty", "py_compile", "pyclbr", "pydoc", "queue", "quopri", "random", "re",
    "reprlib", "rlcompleter", "runpy", "sched", "secrets", "select", "selectors", "shelve", "shlex", "shutil",
    "signal", "site", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat", "statistics", "string",
    "stringprep", "struct", "subprocess", "symtable", "sys", "sysconfig", "tabnanny", "tarfile", "tempfile",
    "textwrap", "threading", "time", "timeit", "token", "tokenize", "tomllib", "trace", "traceback", "tracemalloc",
    "types", "typing", "unicodedata", "unittest", "unittest.case", "unittest.loader", "unittest.mock",
    "unittest.result", "unittest.runner", "unittest.suite", "urllib.error", "urllib.parse", "urllib.request",
    "urllib.robotparser", "uuid", "venv", "warnings", "wave", "weakref", "webbrowser", "wsgiref.handlers",
    "wsgiref.headers", "wsgiref.simple_server", "wsgiref.util", "wsgiref.validate", "xml.dom", "xml.dom.minidom",
    "xml.dom.pulldom", "xml.etree.ElementTree", "xml.sax", "xml.sax.handler", "xml.sax.saxutils",
    "xml.sax.xmlreader", "xmlrpc.client", "xmlrpc.server", "zipapp", "zipfile", "zipimport", "zlib", "zoneinfo",
}))
# fmt: on

MIN_DOC_CHARS = 40  # one-liners such as "Return self." add nothing but duplicates of a phrase
HELDOUT_PERCENT = 5


@dataclass(frozen=True)
class Document:
    """One unit of text; ``key`` (``topic:...`` or ``doc:module.qualname``) decides its split."""

    key: str
    text: str

    @property
    def heldout(self) -> bool:
        # A hash of the key, not of a random draw or of list position: adding a module elsewhere in the
        # list never moves an existing document between train and held-out.
        digest = hashlib.sha256(self.key.encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


@dataclass(frozen=True)
class Corpus:
    """The split corpus: documents in their fixed order, plus which modules could not be imported."""

    train: tuple[Document, ...]
    heldout: tuple[Document, ...]
    skipped_modules: tuple[str, ...]

    @property
    def train_chars(self) -> int:
        return sum(len(d.text) for d in self.train)

    @property
    def heldout_chars(self) -> int:
        return sum(len(d.text) for d in self.heldout)

    def fingerprint(self) -> str:
        """sha256 over every key and text in order: two machines built the same corpus iff these match."""
        h = hashlib.sha256()
        for doc in (*self.train, *self.heldout):
            h.update(doc.key.encode("utf-8") + b"\0" + doc.text.encode("utf-8") + b"\0")
        return h.hexdigest()


def _clean(doc: object) -> str | None:
    """A docstring as plain text (indentation removed), or None when it is missing or too short."""
    if not isinstance(doc, str):
        return None
    text = inspect.cleandoc(doc).strip()
    return text if len(text) >= MIN_DOC_CHARS else None


def _module_docs(module_name: str, module: object) -> Iterator[tuple[str, str]]:
    """(key, docstring) for the module, its public classes and routines, and their public methods."""
    yield f"doc:{module_name}", getattr(module, "__doc__", None)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_"):
            continue
        if inspect.isroutine(obj):
            yield f"doc:{module_name}.{name}", obj.__doc__
        elif inspect.isclass(obj):
            yield f"doc:{module_name}.{name}", obj.__doc__
            for attr, member in sorted(vars(obj).items()):
                # Methods and properties only; ``__init__`` is kept because it documents the arguments.
                if attr.startswith("_") and attr != "__init__":
                    continue
                if inspect.isroutine(member) or isinstance(member, property):
                    yield f"doc:{module_name}.{name}.{attr}", getattr(member, "__doc__", None)


def collect_documents() -> tuple[list[Document], list[str]]:
    """All documents in a fixed order (topics first, then modules), and the modules that failed to import."""
    from pydoc_data.topics import topics

    docs: list[Document] = []
    seen: set[str] = set()  # membership only; never iterated, so set order cannot leak into the result

    def add(key: str, raw: object) -> None:
        text = _clean(raw)
        if text is not None and text not in seen:
            seen.add(text)
            docs.append(Document(key, text))

    for name in sorted(topics):
        add(f"topic:{name}", topics[name])

    skipped: list[str] = []
    for module_name in STDLIB_MODULES:
        # Deprecated modules (and typing.io/typing.re on attribute access) warn; irrelevant here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                module = importlib.import_module(module_name)
            except Exception:
                skipped.append(module_name)
                continue
            for key, raw in _module_docs(module_name, module):
                add(key, raw)
    return docs, skipped


def load_corpus(isolated: bool = True) -> Corpus:
    """The corpus split into train and held-out documents by key hash.

    ``isolated`` collects the text in a fresh ``python -I -S`` interpreter: third-party packages patch the
    standard library on import (transformers adds ``logging.Logger.warning_once``, torch wraps
    ``inspect.getfile``), so collecting inside a process that imported them would change the corpus.
    ``-S`` also skips site-packages and their ``.pth`` hooks: only the stdlib itself is visible.
    """
    if isolated:
        proc = subprocess.run(
            [sys.executable, "-I", "-S", str(Path(__file__).resolve()), "--json"],
            check=True,
            capture_output=True,
            text=True,
            encoding="utf-8",
        )
        payload = json.loads(proc.stdout)
        docs = [Document(key, text) for key, text in payload["documents"]]
        skipped = payload["skipped"]
    else:
        docs, skipped = collect_documents()
    return Corpus(
        train=tuple(d for d in docs if not d.heldout),
        heldout=tuple(d for d in docs if d.heldout),
        skipped_modules=tuple(skipped),
    )


if __name__ == "__main__":
    # Run as a plain script (this is what load_corpus() does), so stdlib imports only at module level.
    if "--json" in sys.argv[1:]:
        documents, skipped_modules = collect_documents()
        json.dump({"documents": [[d.key, d.text] for d in documents], "skipped": skipped_modules}, sys.stdout)
    else:
        corpus = load_corpus()
        print(f"train: {len(corpus.train)} docs, {corpus.train_chars} chars")
        print(f"heldout: {len(corpus.heldout)} docs, {corpus.heldout_chars} chars")
        print(f"fingerprint: {corpus.fingerprint()}")
        print(f"skipped modules: {', '.join(corpus.skipped_modules) or 'none'}")
