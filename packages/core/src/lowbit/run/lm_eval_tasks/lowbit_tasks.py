"""Datasets of lowbit's built-in lm-eval tasks, from text shipped inside lowbit (no download).

``lowbit_wikitext2`` is lm-eval's ``wikitext`` task (document-level rolling log-likelihood, word and
byte perplexity, the same detokenizer) over the WikiText-2 test split in ``lowbit/data``, cut into
articles at its top-level ``= Title =`` headings as EleutherAI's ``wikitext_document_level`` is.
"""

from __future__ import annotations

import re

from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa: F401


def wikitext2_articles(text: str) -> list[str]:
    """The articles of a WikiText-2 split: each starts at a `` = Title = `` line (one ``=`` per side)."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if re.fullmatch(r" = [^=].* = \n?", line)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    bounds = starts + [len(lines)]
    return ["".join(lines[a:b]) for a, b in zip(bounds, bounds[1:]) if "".join(lines[a:b]).strip()]


def wikitext2(**_metadata):
    """``{"test": Dataset}`` of the shipped WikiText-2 test split, one row (``page``) per article."""
    import datasets

    from lowbit.calibration import EVAL_TEXT, builtin_text

    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"page": wikitext2_articles(
        builtin_text(EVAL_TEXT))})})
