"""The evaluation corpus (`--eval-corpus`): documents of natural English that every checkpoint
is scored on as lm-eval scores perplexity, split into an eval set and a disjoint fit set.

The built-in corpus, `lee`, is the Lee background corpus that gensim ships as test data
(gensim/test/test_data/lee_background.cor, gensim 4.4.0, LGPL-2.1 like the package): 300
news articles of the Australian Broadcasting Corporation's news mail service, collected by
Lee, Pincombe and Welsh (2005) for their study of document similarity. It is natural text
(edited news prose, one article per line, no markup), about 75k SmolLM2 tokens, and it sits
in a pinned wheel, so every machine scores the same bytes: the hash below is checked. gensim is
installed without its dependencies (`pip install --no-deps gensim==4.4.0`): only the file is
read, gensim is never imported.

A corpus may also be a UTF-8 file of one document per line. The first third of the documents
(rounded up) is the eval set, the rest the fit set (the unigram floor and a tuned lens are fitted
on it): in file order, so the split is the same everywhere and the two never share a document."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import PlanError

LEE = "lee"
LEE_PACKAGE = "gensim"
LEE_VERSION = "4.4.0"
LEE_FILE = "test/test_data/lee_background.cor"
LEE_SHA256 = "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"
LEE_SOURCE = (
    "Lee background corpus: 300 ABC news articles (Lee, Pincombe & Welsh 2005), shipped as "
    f"{LEE_PACKAGE}=={LEE_VERSION}:{LEE_FILE}, LGPL-2.1"
)
MIN_DOCUMENTS = 2  # an eval set and a fit set of at least one document each


@dataclass(frozen=True)
class Corpus:
    name: str
    source: str  # where the documents came from, and under which licence
    eval_docs: tuple[str, ...]
    fit_docs: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """What a run keeps of its corpus: the documents themselves, so that baseline,
        coordinator and a resume read the same bytes whatever happens to the source later."""
        return {"name": self.name, "source": self.source, "eval": list(self.eval_docs), "fit": list(self.fit_docs)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Corpus:
        for key, typ in (("name", str), ("source", str), ("eval", list), ("fit", list)):
            if not isinstance(data.get(key), typ):
                raise ValueError(f"corpus {key}: {type(data.get(key)).__name__}, expected a {typ.__name__}")
        docs = [*data["eval"], *data["fit"]]
        if not all(isinstance(d, str) and d.strip() for d in docs):
            raise ValueError("corpus documents: expected non-empty strings")
        return cls(data["name"], data["source"], tuple(data["eval"]), tuple(data["fit"]))

    def identity(self) -> dict[str, Any]:
        """Name, source, sizes and hashes of both sets: enough to tell two corpora apart."""
        return {
            "name": self.name,
            "source": self.source,
            "eval_documents": len(self.eval_docs),
            "fit_documents": len(self.fit_docs),
            "eval_sha256": documents_sha256(self.eval_docs),
            "fit_sha256": documents_sha256(self.fit_docs),
            "split": "the first third of the documents (rounded up) is the eval set, the rest the fit set",
        }


def documents_sha256(docs: tuple[str, ...] | list[str]) -> str:
    """sha256 of the documents joined by newlines, as UTF-8."""
    return hashlib.sha256("\n".join(docs).encode("utf-8")).hexdigest()


def lee_path() -> Path:
    """The installed Lee background corpus, refused with the install command when it is missing."""
    spec = importlib.util.find_spec(LEE_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / LEE_FILE if locations else None
    if path is None or not path.is_file():
        raise PlanError(
            "--eval-corpus",
            LEE,
            f"{LEE_PACKAGE}=={LEE_VERSION} installed (`pip install --no-deps {LEE_PACKAGE}=={LEE_VERSION}`; "
            "make does it): it ships the Lee corpus",
        )
    return path


def read_corpus(spec: str, eval_documents: int | None = None) -> Corpus:
    """`lee` or a UTF-8 file of one document per line, split into eval and fit sets; the eval
    set cut to its first `eval_documents` when given (the fit set is unchanged)."""
    if spec == LEE:
        path = lee_path()
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != LEE_SHA256:
            raise PlanError("--eval-corpus", f"{path} (sha256 {digest})", f"the file of {LEE_PACKAGE}=={LEE_VERSION}")
        name, source = LEE, LEE_SOURCE
    else:
        path = Path(spec)
        what = "lee, or a UTF-8 file of one document per line"
        if not path.is_file():
            raise PlanError("--eval-corpus", spec, f"{what} ({'a directory' if path.is_dir() else 'no such file'})")
        data = path.read_bytes()
        name, source = path.name, f"{path.resolve()} (sha256 {hashlib.sha256(data).hexdigest()})"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlanError("--eval-corpus", spec, f"UTF-8 text (not UTF-8 at byte {exc.start})") from None
    docs = [line.strip() for line in text.splitlines() if line.strip()]
    if len(docs) < MIN_DOCUMENTS:
        raise PlanError("--eval-corpus", spec, f"at least {MIN_DOCUMENTS} documents, one per line (it has {len(docs)})")
    cut = -(-len(docs) // 3)
    eval_docs, fit_docs = docs[:cut], docs[cut:]
    if eval_documents is not None:
        if not 1 <= eval_documents <= len(eval_docs):
            raise PlanError("--eval-documents", eval_documents, f"1..{len(eval_docs)} (the eval set of {spec})")
        eval_docs = eval_docs[:eval_documents]
    return Corpus(name, source, tuple(eval_docs), tuple(fit_docs))
