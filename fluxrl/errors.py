"""User-facing errors: one clear sentence, no traceback on the CLI."""


class FluxrlError(Exception):
    """An error caused by the user's input (a file, a name, a flag). The CLI prints it and exits non-zero."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped a run between two compiled calls, after a checkpoint of that step."""

    def __init__(self, run_dir: str, step: int, signum: int):
        import signal

        self.run_dir, self.step, self.signum = run_dir, step, signum
        super().__init__(f"{signal.Signals(signum).name} at step {step}: saved a checkpoint of that step in {run_dir}")
