"""How an exception becomes the one-line message a user sees (no imports: the CLI, the
backends and the training side all use it)."""

LIMIT = 300


def one_line(e: BaseException | str, limit: int = LIMIT) -> str:
    """`e`'s text with its whitespace runs (newlines included) collapsed to single spaces,
    cut at `limit` characters with a trailing "..." when it was longer; the exception's type
    name when it has no text."""
    text = " ".join(str(e).split())
    if not text and isinstance(e, BaseException):
        text = type(e).__name__
    return text[:limit] + ("..." if len(text) > limit else "")
