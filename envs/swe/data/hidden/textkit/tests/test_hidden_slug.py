from textkit import slugify


def test_slugify_collapses_separator_runs():
    assert slugify("Hello,  World") == "hello-world"
    assert slugify("a -- b") == "a-b"
    assert slugify("rock & roll", sep="_") == "rock_roll"


def test_slugify_strips_leading_and_trailing_separators():
    assert slugify("  Hello World!  ") == "hello-world"
    assert slugify("(draft) notes") == "draft-notes"


def test_slugify_only_punctuation_is_empty():
    assert slugify("!!!") == ""
    assert slugify("") == ""


def test_slugify_keeps_existing_slug():
    assert slugify("already-a-slug") == "already-a-slug"


def test_slugify_digits_and_case():
    assert slugify("Route66") == "route66"
    assert slugify("ABC def") == "abc-def"
