"""User-facing errors.

Anything a user can cause (a wrong path, a bad file, an unknown option) raises a subclass of `RanprmError`. The
CLI entry points print such errors as one line and exit non-zero; `HYDRA_FULL_ERROR=1` shows the traceback.
Programming errors stay ordinary exceptions so they are never hidden.
"""


class RanprmError(Exception):
    """An error the user can fix; its message names the file or option and says what to do."""


class DataError(RanprmError):
    """A dataset folder, split, image, annotation or mask is missing or malformed."""


class ConfigError(RanprmError):
    """A configuration value is invalid."""


class CheckpointError(RanprmError):
    """A checkpoint or weight file cannot be used with this model."""


class PredictionsError(RanprmError):
    """A predictions (COCO results) file is malformed or does not match the dataset."""
