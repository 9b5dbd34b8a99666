"""The project's errors: the ground floor, importing nothing of the project.

Every error a user can cause with an option, a data file, a model folder or an adapter is a `NapoError` whose
message is one line naming the flag, file or row and what to do. The entry scripts (cli.run) print it as
`error: ...` and exit with status 2, without a traceback (NAPO_TRACEBACK=1 adds it, for debugging the code).
"""


class NapoError(ValueError):
    """The project's errors for bad input (options, data files, models, adapters): one line."""


class OptionError(NapoError):
    """A bad command-line option: unknown flag, wrong type, out of range, a path that does not exist."""


class DataError(NapoError):
    """Bad input data or option; the message is one line naming the file, row or flag."""


class ModelError(NapoError):
    """A bad --base_model, model cache entry or adapter; one line naming the folder or file."""


class ScoringInputError(NapoError):
    """Malformed prompts/answers given to scoring.answer_logps."""


class NAPOLossError(NapoError):
    """Bad input to a function of napo_losses.py."""


class SASRecError(NapoError):
    """A bad SASRec checkpoint or option; the message is one line naming the file or flag."""


class BenchmarkError(NapoError):
    """A bad benchmark option or a failed measurement; one line."""
