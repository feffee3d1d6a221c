"""Errors that reach the user as one line and exit code 2."""


class QpsaError(Exception):
    """A problem with the user's input (file, argument, text). The CLI prints it as one line, exit 2."""


class BadGGUFError(QpsaError):
    """A GGUF file that is malformed or unsafe to read.

    The message names the file, the field and the byte offset where the problem was found.
    """

    def __init__(self, path, field: str, offset: int, problem: str):
        self.path, self.field, self.offset, self.problem = str(path), field, offset, problem
        super().__init__(f"{path}: bad GGUF: {field} at byte {offset}: {problem}")
