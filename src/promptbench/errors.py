"""The one exception type that carries a message meant for the user, not a traceback."""


class PromptbenchError(Exception):
    """Bad input or an unusable environment: the message says what is wrong and how to fix it."""
