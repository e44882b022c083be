"""The OCR metric of Flow-GRPO: normalised, capped edit distance to the quoted target text.

Pure Python. An OCR engine plug-in reads an image into lines of text; the caller joins them
(with ``""`` as upstream does, or ``" "``: spaces are removed anyway) and this module scores the
result against the text the prompt asked for. The same rule is the OCR benchmark metric and
the OCR training reward.

Upstream reference (facts re-implemented, not copied): ``yifan123/flow_grpo``
``flow_grpo/ocr.py`` (``OcrScorer``): target = ``prompt.split('"')[1]``; recognised lines with
confidence > 0 joined by ``""``; ``" "`` removed from and ``.lower()`` applied to BOTH strings;
a target contained in the recognised text has distance 0, otherwise the Levenshtein distance is
capped at the (normalised) target length; reward = ``1 - dist / len(target)``.
"""

from __future__ import annotations

__all__ = ["levenshtein", "normalize_ocr_text", "ocr_reward", "ocr_target"]


def ocr_target(prompt: str) -> str:
    """The text inside the FIRST pair of double quotes of ``prompt``, verbatim.

    ``'a sign that says "Hello World" and "Bye"'`` -> ``"Hello World"``. Only the ASCII double
    quote ``"`` counts. Equivalent to upstream's ``prompt.split('"')[1]`` whenever the prompt
    has a closing quote; unlike upstream, an unclosed quote is an error rather than "the rest
    of the prompt".

    Raises:
        ValueError: the prompt has no complete pair of double quotes.
    """
    start = prompt.find('"')
    end = prompt.find('"', start + 1) if start >= 0 else -1
    if end < 0:
        raise ValueError(f"OCR prompt has no text in double quotes to render: {prompt!r}")
    return prompt[start + 1 : end]


def levenshtein(a: str, b: str) -> int:
    """Edit distance between ``a`` and ``b``: insertions, deletions, substitutions cost 1.

    Classic two-row dynamic programme, O(len(a) * len(b)) time, O(min) memory; case- and
    space-sensitive (normalise first, see :func:`normalize_ocr_text`).
    """
    if len(a) < len(b):
        a, b = b, a  # keep the row over the shorter string
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(
                min(
                    previous[j] + 1,  # delete ca
                    current[j - 1] + 1,  # insert cb
                    previous[j - 1] + (ca != cb),
                )
            )  # substitute (free if equal)
        previous = current
    return previous[-1]


def normalize_ocr_text(text: str) -> str:
    """Flow-GRPO's normalisation: drop every ASCII space ``" "`` and lowercase.

    Only U+0020 is removed, as upstream (tabs and newlines stay), so join recognised lines with
    ``""`` or ``" "``, never ``"\\n"``.
    """
    return text.replace(" ", "").lower()


def ocr_reward(recognized: str, target: str) -> float:
    """OCR score in [0, 1] of ``recognized`` text against the ``target`` text.

    Both strings are normalised with :func:`normalize_ocr_text`. If the normalised target is a
    substring of the normalised recognised text the distance is 0 (extra text around it is not
    penalised); otherwise it is the Levenshtein distance, capped at the normalised target length
    (so reading lots of unrelated text cannot go below 0). Reward = ``1 - dist / len(target)``
    with that normalised length. Empty recognised text scores 0.0.

    Raises:
        ValueError: the target is empty after removing spaces (upstream would divide by zero).
    """
    want = normalize_ocr_text(target)
    if not want:
        raise ValueError(f"OCR target text is empty after removing spaces: {target!r}")
    got = normalize_ocr_text(recognized)
    distance = 0 if want in got else min(levenshtein(got, want), len(want))
    return 1.0 - distance / len(want)
