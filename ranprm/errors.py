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


class RunFolderError(ConfigError):
    """A run or output folder already holds results that this command would replace, or cannot be resumed."""


class FolderBusyError(RunFolderError):
    """Another live ranprm process holds the run or output folder (`ranprm.cli.run_dir.hold_folder`)."""


class RunInterrupted(Exception):  # noqa: N818  (a state, not an error: the run saved what it had and stopped)
    """A training run stopped on a signal (SIGTERM, Ctrl+C) after saving a checkpoint to resume from.

    Not a `RanprmError`: nothing is wrong with the input. The CLI exits with `exit_code` (128 + the signal number,
    the shell's convention), so schedulers and sweeps never record the run as finished.
    """

    def __init__(self, message: str, signal_name: str, exit_code: int, checkpoint: str | None) -> None:
        super().__init__(message)
        self.signal_name = signal_name
        self.exit_code = exit_code
        self.checkpoint = checkpoint
