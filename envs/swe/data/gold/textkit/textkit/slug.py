"""URL slugs."""

import re
import unicodedata

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def to_ascii(text):
    """Drop accents and any character that has no ASCII form."""
    decomposed = unicodedata.normalize("NFKD", text)
    return decomposed.encode("ascii", "ignore").decode("ascii")


def slugify(text, sep="-"):
    """Return a lowercase ASCII slug of ``text``, words joined by ``sep``.

    >>> slugify("Hello World")
    'hello-world'
    """
    if not sep:
        raise ValueError("sep must not be empty")
    slug = to_ascii(text).lower()
    return _NON_ALNUM.sub(sep, slug).strip(sep)
