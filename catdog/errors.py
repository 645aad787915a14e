"""The one exception type for mistakes a user can make (bad paths, bad config, bad data)."""


class CatdogError(Exception):
    """A problem with the user's input: jobs print it on one line and exit with code 2."""
